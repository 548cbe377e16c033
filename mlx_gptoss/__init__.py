"""mlx-gptoss: OpenAI's gpt-oss models on Apple's MLX.

The public names resolve lazily (PEP 562): `import mlx_gptoss` costs nothing, and the command
line can set up its process (signal handling, see `cli/interrupts.py`) before MLX, NumPy and
their thread pools start.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "Chat": "chat", "Reply": "agent", "ToolResult": "agent", "run_turn": "agent",
    "Engine": "engine", "batch_generate": "engine",
    "GptOssError": "errors",
    "GenerationResult": "generate", "GenerationStats": "generate", "generate": "generate",
    "stream_generate": "generate",
    "Conversation": "harmony", "DeveloperContent": "harmony", "Message": "harmony",
    "ReasoningEffort": "harmony", "Role": "harmony", "SystemContent": "harmony",
    "ToolDescription": "harmony",
    "load": "hub",
    "SamplingParams": "sampling",
    "FunctionTool": "tools.functions", "function_tool": "tools.functions",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_gptoss' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`mlx_gptoss.generate` is the function, as with an eager `from .generate import generate`,
    even after the import system binds the submodule of the same name to the package."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .agent import Reply, ToolResult, run_turn
    from .chat import Chat
    from .engine import Engine, batch_generate
    from .errors import GptOssError
    from .generate import GenerationResult, GenerationStats, generate, stream_generate
    from .harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role,
                          SystemContent, ToolDescription)
    from .hub import load
    from .sampling import SamplingParams
    from .tools.functions import FunctionTool, function_tool
