"""Source checkpoint formats. Each maps its on-disk tensors to the model's parameter names and
layouts (the canonical tensors), lazily, one tensor at a time; `load()` and the converter both
go through here, so there is exactly one mapping per format."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..config import ModelConfig
from ..errors import CheckpointError
from ..safetensors_io import LazyTensors, TensorInfo, open_tensor_dir, read_rows
from . import dense, hf, mlx_dir, original

CONVERTED_MARKER = "mlx_gptoss"


FORMATS = {
    "mlx": "MLX model directory written by mlx-gptoss",
    "hf": "Hugging Face hub layout (MXFP4 experts)",
    "original": "OpenAI original/ layout (MXFP4 experts)",
    "hf-dense": "Hugging Face export with dense float experts",
    "hf-dense-blocks": "Hugging Face export with dense float experts under _blocks names "
                       "(transformers 5.23 save_pretrained)",
}
_MODULES = {"mlx": mlx_dir, "hf": hf, "original": original, "hf-dense": dense,
            "hf-dense-blocks": dense}


def detect_format(path: Path, raw_config: dict, infos: dict[str, TensorInfo]) -> str:
    """One of `FORMATS`, decided from the config marker and the tensor names and dtypes."""
    if CONVERTED_MARKER in raw_config:
        return "mlx"
    blocks = [info for name, info in infos.items() if name.endswith("_blocks")]
    if blocks:
        has_scales = any(name.endswith("_scales") for name in infos)
        return "hf" if has_scales or blocks[0].dtype == "U8" else "hf-dense-blocks"
    if any(name.endswith("mlp.experts.gate_up_proj") for name in infos):
        return "hf-dense"
    if any(name.startswith("block.") for name in infos) or "embedding.weight" in infos:
        return "original"
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (no gpt-oss expert tensors)")


def is_expert_tensor(source_name: str) -> bool:
    """Whether a source tensor is per-expert (experts along its first axis), in any format."""
    return ".mlp.experts." in source_name or ".mlp.mlp1_" in source_name \
        or ".mlp.mlp2_" in source_name


class ExpertRows(LazyTensors):
    """`LazyTensors` whose expert tensors hold only the experts `rows`, read from disk alone
    (a distributed rank's share); every other tensor is whole."""

    def __init__(self, infos: dict[str, TensorInfo], rows: range):
        super().__init__(infos)
        self.rows = rows

    def __getitem__(self, name: str) -> mx.array:
        if is_expert_tensor(name):
            return read_rows(self.infos[name], self.rows.start, self.rows.stop)
        return super().__getitem__(name)


def canonical_tensors(path: Path, cfg: ModelConfig, raw_config: dict, streaming: bool = False,
                      experts: range | None = None
                      ) -> tuple[str, Iterator[tuple[str, mx.array]]]:
    """The detected format and an iterator over (parameter name, lazy array).

    `streaming` keeps no source tensor alive between accesses (see `LazyTensors`); `experts`
    yields expert tensors holding those experts only (see `ExpertRows`)."""
    infos = open_tensor_dir(path)
    fmt = detect_format(path, raw_config, infos)
    module = _MODULES[fmt]
    module.validate(cfg, infos)
    tensors = LazyTensors(infos, streaming=streaming) if experts is None \
        else ExpertRows(infos, experts)
    return fmt, module.to_canonical(cfg, tensors)
