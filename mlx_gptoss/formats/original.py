"""OpenAI's `original/` layout (one `model.safetensors`, its own names and config keys).

It differs from the hub layout only in names and in the fused `attn.qkv` projection (rows q,
then k, then v); the MXFP4 expert bytes and their gate/up interleaving are the hub's. So this
module is a name view onto the hub mapping, not a second mapping.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import mlx.core as mx

from ..config import ModelConfig
from ..safetensors_io import TensorInfo
from . import hf
from .hf import FLOAT, Spec, check_against

# Hub name suffix -> original name suffix, per layer (qkv is handled separately).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn.norm.scale",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embedding.weight",
                 "lm_head.weight": "unembedding.weight",
                 "model.norm.weight": "norm.scale"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def source_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, n, rest = hf_name.split(".", 3)
    return f"block.{n}.{_LAYER_NAMES[rest]}"


def expected_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, Spec] = {}
    for name, spec in hf.expected_tensors(cfg).items():
        if ".self_attn." in name and name.split(".")[-2] in _QKV:
            continue
        out[source_name(name)] = spec
    for n in range(cfg.num_hidden_layers):
        out[f"block.{n}.attn.qkv.weight"] = ((q + 2 * kv, cfg.hidden_size), FLOAT)
        out[f"block.{n}.attn.qkv.bias"] = ((q + 2 * kv,), FLOAT)
    return out


def validate(cfg: ModelConfig, infos: Mapping[str, TensorInfo]) -> None:
    check_against(expected_tensors(cfg), infos)


class _AsHub:
    """The original tensors under hub names; q/k/v are row slices of the fused qkv."""

    def __init__(self, cfg: ModelConfig, tensors):
        self.tensors = tensors
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self._rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}

    def __getitem__(self, hf_name: str) -> mx.array:
        parts = hf_name.split(".")
        if len(parts) == 6 and parts[3] == "self_attn" and parts[4] in self._rows:
            start, stop = self._rows[parts[4]]
            return self.tensors[f"block.{parts[2]}.attn.qkv.{parts[5]}"][start:stop]
        return self.tensors[source_name(hf_name)]


def to_canonical(cfg: ModelConfig, tensors) -> Iterator[tuple[str, mx.array]]:
    return hf.to_canonical(cfg, _AsHub(cfg, tensors))

