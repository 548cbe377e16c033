"""Tools the model can call: function tools (`functions`) and the opt-in python tool (`python`:
its own resource-limited process, not a security sandbox)."""
