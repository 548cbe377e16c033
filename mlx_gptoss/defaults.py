"""Defaults shared by the library and the command line, defined once.

The CLI's `--max-tokens`, `--max-tool-rounds` and `--reasoning-effort` show these values in
their help, and the library's functions default to them, so the two cannot drift apart.
(Quantization defaults live with the quantization settings, in `config.py`.)
"""
from __future__ import annotations

DEFAULT_MAX_TOKENS = 4096  # tokens per generation
DEFAULT_TOOL_ROUNDS = 8  # tool calls answered per chat turn before it stops
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING_EFFORT = "medium"
