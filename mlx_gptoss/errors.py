"""User-facing errors.

Anything a user can cause (a bad checkpoint, a wrong config, a malformed conversation, a missing
vocabulary) raises a subclass of `GptOssError` with a one-line message that names the file,
tensor or message at fault. The CLI prints that line and exits with code 2; any other exception
is a bug and keeps its traceback. Every such class is defined here (the modules that raise
them re-export theirs, so `from mlx_gptoss.converter import ConversionError` still works).
"""
from __future__ import annotations


class GptOssError(Exception):
    """Base class for errors caused by input, not by a bug."""


class ConfigError(GptOssError):
    """The model's config.json is missing, unreadable or not a gpt-oss config."""


class CheckpointError(GptOssError):
    """A checkpoint file or tensor is missing, truncated, or has the wrong shape or dtype."""


class VocabularyError(GptOssError):
    """The o200k_base vocabulary cannot be found, or its SHA-256 does not match."""


class HarmonyError(GptOssError):
    """A conversation or token stream breaks the harmony format."""


class DistributedError(GptOssError):
    """The distributed group cannot be formed or split as asked, or a peer rank was lost."""


class SchemaError(GptOssError):
    """A JSON Schema for constrained output is invalid, or cannot be compiled to a constraint."""


class ConversionError(GptOssError):
    """The destination cannot be written, or the requested conversion is impossible."""


class VerificationError(GptOssError):
    """A converted directory is malformed or does not match its source."""


class ToolsFileError(GptOssError):
    """A --tools file is unreadable or not a list of function tools."""


class KVQuantizationError(GptOssError):
    """The requested KV-cache quantization (bits, group size) is impossible for this model."""


class ContextLengthError(GptOssError):
    """A prompt or generation would run past the model's `max_position_embeddings`."""


class DataError(GptOssError):
    """A training data file or row is malformed."""
