"""mlx-gptoss: OpenAI's gpt-oss models on Apple's MLX."""
from __future__ import annotations

from .errors import GptOssError
from .loading import load

__all__ = ["GptOssError", "load"]
__version__ = "0.1.0"
