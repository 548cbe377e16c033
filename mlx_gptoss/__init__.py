"""mlx-gptoss: OpenAI's gpt-oss models on Apple's MLX."""
from __future__ import annotations

from .chat import Chat, Reply, ToolResult
from .errors import GptOssError
from .generate import GenerationResult, GenerationStats, generate, stream_generate
from .harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)
from .hub import load
from .sampling import SamplingParams
from .tools.functions import FunctionTool, function_tool

__all__ = [
    "Chat", "Conversation", "DeveloperContent", "FunctionTool", "GenerationResult",
    "GenerationStats", "GptOssError", "Message", "ReasoningEffort", "Reply", "Role",
    "SamplingParams", "SystemContent", "ToolDescription", "ToolResult", "function_tool",
    "generate", "load", "stream_generate",
]
__version__ = "0.1.0"
