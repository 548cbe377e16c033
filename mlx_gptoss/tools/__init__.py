"""Tools the model can call: function tools (`functions`) and the python sandbox (`python`)."""
