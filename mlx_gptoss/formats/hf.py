"""The Hugging Face hub layout: MXFP4 expert blocks/scales, everything else bf16.

The only differences from the model's own names are the experts:
`mlp.experts.gate_up_proj_{blocks,scales,bias}` -> `mlp.experts.gate_up.{weight,scales,bias}`
(rows regrouped gate-first, so the SwiGLU splits a contiguous half) and
`mlp.experts.down_proj_*` -> `mlp.experts.down.*`. Blocks become MLX's uint32 packing by
reinterpretation: the bytes are never dequantized.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import mlx.core as mx

from ..config import ModelConfig
from ..errors import CheckpointError
from ..mxfp4 import blocks_to_mlx, deinterleave_rows
from ..safetensors_io import TensorInfo

FLOAT = frozenset({"BF16", "F16", "F32"})
BYTES = frozenset({"U8"})
Spec = tuple[tuple[int, ...], frozenset]


def dense_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    """Every non-expert tensor, with its shape and allowed dtypes, in HF names."""
    h, v = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    e = cfg.num_local_experts
    spec: dict[str, Spec] = {"model.embed_tokens.weight": ((v, h), FLOAT),
                             "model.norm.weight": ((h,), FLOAT)}
    if not cfg.tie_word_embeddings:
        spec["lm_head.weight"] = ((v, h), FLOAT)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        spec.update({
            p + "input_layernorm.weight": ((h,), FLOAT),
            p + "post_attention_layernorm.weight": ((h,), FLOAT),
            p + "self_attn.q_proj.weight": ((q, h), FLOAT),
            p + "self_attn.q_proj.bias": ((q,), FLOAT),
            p + "self_attn.k_proj.weight": ((kv, h), FLOAT),
            p + "self_attn.k_proj.bias": ((kv,), FLOAT),
            p + "self_attn.v_proj.weight": ((kv, h), FLOAT),
            p + "self_attn.v_proj.bias": ((kv,), FLOAT),
            p + "self_attn.o_proj.weight": ((h, q), FLOAT),
            p + "self_attn.o_proj.bias": ((h,), FLOAT),
            p + "self_attn.sinks": ((cfg.num_attention_heads,), FLOAT),
            p + "mlp.router.weight": ((e, h), FLOAT),
            p + "mlp.router.bias": ((e,), FLOAT),
        })
    return spec


def expected_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    spec = dense_tensors(cfg)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}.mlp.experts."
        spec.update({
            p + "gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), BYTES),
            p + "gate_up_proj_scales": ((e, 2 * i, h // 32), BYTES),
            p + "gate_up_proj_bias": ((e, 2 * i), FLOAT),
            p + "down_proj_blocks": ((e, h, i // 32, 16), BYTES),
            p + "down_proj_scales": ((e, h, i // 32), BYTES),
            p + "down_proj_bias": ((e, h), FLOAT),
        })
    return spec


def check_against(expected: Mapping[str, Spec], infos: Mapping[str, TensorInfo]) -> None:
    """Missing, unknown, misshapen or mistyped tensors -> one error naming file and tensor."""
    for name, (shape, dtypes) in expected.items():
        info = infos.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name}")
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, "
                                  f"expected {list(shape)}")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, "
                                  f"expected {'/'.join(sorted(dtypes))}")
    for name, info in infos.items():
        if name not in expected:
            raise CheckpointError(f"{info.file}: unknown tensor {name} "
                                  "(does config.json match this checkpoint?)")


def validate(cfg: ModelConfig, infos: Mapping[str, TensorInfo]) -> None:
    check_against(expected_tensors(cfg), infos)


def to_canonical(cfg: ModelConfig, tensors) -> Iterator[tuple[str, mx.array]]:
    """(model parameter name, lazy array) in checkpoint order, layer by layer."""
    dense = dense_tensors(cfg)
    for name in dense:
        if ".layers." not in name:
            yield name, tensors[name]
    for n in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{n}."
        for name in dense:
            if name.startswith(prefix):
                yield name, tensors[name]
        src, dst = prefix + "mlp.experts.", prefix + "mlp.experts."
        yield dst + "gate_up.weight", deinterleave_rows(
            blocks_to_mlx(tensors[src + "gate_up_proj_blocks"]))
        yield dst + "gate_up.scales", deinterleave_rows(tensors[src + "gate_up_proj_scales"])
        yield dst + "gate_up.bias", deinterleave_rows(tensors[src + "gate_up_proj_bias"])
        yield dst + "down.weight", blocks_to_mlx(tensors[src + "down_proj_blocks"])
        yield dst + "down.scales", tensors[src + "down_proj_scales"]
        yield dst + "down.bias", tensors[src + "down_proj_bias"]
