"""Source checkpoint formats. Each maps its on-disk tensors to the model's parameter names and
layouts (the canonical tensors), lazily, one tensor at a time; `load()` and the converter both
go through here, so there is exactly one mapping per format."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..config import ModelConfig
from ..errors import CheckpointError
from ..safetensors_io import LazyTensors, TensorInfo, open_tensor_dir
from . import hf, mlx_dir

CONVERTED_MARKER = "mlx_gptoss"


def detect_format(path: Path, raw_config: dict, infos: dict[str, TensorInfo]) -> str:
    """'mlx' (written by our converter) or 'hf' (Hugging Face hub layout)."""
    if CONVERTED_MARKER in raw_config:
        return "mlx"
    if any(name.endswith("_blocks") for name in infos):
        return "hf"
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (no MXFP4 expert blocks)")


def canonical_tensors(path: Path, cfg: ModelConfig, raw_config: dict
                      ) -> tuple[str, Iterator[tuple[str, mx.array]]]:
    """The detected format and an iterator over (parameter name, lazy array)."""
    infos = open_tensor_dir(path)
    fmt = detect_format(path, raw_config, infos)
    module = {"hf": hf, "mlx": mlx_dir}[fmt]
    module.validate(cfg, infos)
    return fmt, module.to_canonical(cfg, LazyTensors(infos))
