"""Hugging Face exports with plain float experts (fine-tuning tools, "bf16" repos).

The experts are `mlp.experts.gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H] in x @ W
layout (gate/up interleaved along the last axis); transformers 5.23's `save_pretrained` writes
the same tensors under the `_blocks` names with no `_scales` ("blocks" variant). Everything
else is the hub layout. The experts are quantized to MXFP4 here (OCP nearest value, one expert
at a time, eagerly, when the hub mapping asks for a projection's blocks) and presented to the
hub mapping as blocks and scales, so the mapping stays one.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import mlx.core as mx

from ..config import ModelConfig
from ..mxfp4 import quantize_blocks
from ..safetensors_io import TensorInfo
from . import hf
from .hf import FLOAT, Spec, check_against

PROJECTIONS = ("gate_up_proj", "down_proj")


def expert_names(cfg: ModelConfig, blocks_variant: bool) -> dict[str, Spec]:
    """The dense expert tensors, x @ W layout, in the export's names."""
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    suffix = "_blocks" if blocks_variant else ""
    spec: dict[str, Spec] = {}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}.mlp.experts."
        spec.update({
            p + "gate_up_proj" + suffix: ((e, h, 2 * i), FLOAT),
            p + "gate_up_proj_bias": ((e, 2 * i), FLOAT),
            p + "down_proj" + suffix: ((e, i, h), FLOAT),
            p + "down_proj_bias": ((e, h), FLOAT),
        })
    return spec


def is_blocks_variant(infos: Mapping[str, TensorInfo]) -> bool:
    return any(name.endswith("_blocks") for name in infos)


def validate(cfg: ModelConfig, infos: Mapping[str, TensorInfo]) -> None:
    check_against({**hf.dense_tensors(cfg), **expert_names(cfg, is_blocks_variant(infos))},
                  infos)


class _AsHub:
    """Dense experts presented as hub blocks/scales, quantized lazily one expert at a time.

    The hub mapping asks for a projection's blocks and then its scales; both come from one
    quantization, kept until the scales are taken.
    """

    def __init__(self, tensors, blocks_variant: bool):
        self.tensors = tensors
        self.suffix = "_blocks" if blocks_variant else ""
        self._pending: dict[str, mx.array] = {}

    def __getitem__(self, hf_name: str) -> mx.array:
        if hf_name.endswith("_scales"):
            return self._pending.pop(hf_name)
        if not hf_name.endswith("_blocks"):
            return self.tensors[hf_name]
        prefix = hf_name[: -len("_blocks")]
        dense = self.tensors[prefix + self.suffix]  # [E, in, out]
        pieces = []
        for e in range(dense.shape[0]):
            # Evaluated expert by expert: the float32 temporaries of one expert at a time,
            # instead of a whole layer's (several GB at the 20b widths).
            piece = quantize_blocks(dense[e].T)
            mx.eval(piece)
            pieces.append(piece)
        del dense
        self._pending = {prefix + "_scales": mx.stack([s for _, s in pieces])}
        return mx.stack([b for b, _ in pieces])


def to_canonical(cfg: ModelConfig, tensors) -> Iterator[tuple[str, mx.array]]:
    return hf.to_canonical(cfg, _AsHub(tensors, is_blocks_variant(tensors.infos)))
