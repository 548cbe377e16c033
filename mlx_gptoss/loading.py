"""`load(path)`: a model directory (Hugging Face hub layout or converted) -> (model, tokenizer).

Weights stay lazy (memory-mapped safetensors) until the single `mx.eval` at the end, so each
tensor is read once and only the repacked expert rows are ever materialised anew.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, load_config
from .env import read_json
from .errors import CheckpointError, ConfigError, GptOssError
from .formats import canonical_tensors
from .model import Model

# The module groups `QuantizationConfig.modules` may name, by parameter path.
QUANTIZABLE_MODULES = {
    "attention": lambda path: ".self_attn." in path,
    "embeddings": lambda path: path.endswith("embed_tokens"),
    "lm_head": lambda path: path == "lm_head",
    "router": lambda path: path.endswith("mlp.router"),
}


_VOCAB_MATRICES = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """The compute dtype; None picks the fastest per device, as measured (benchmarks/README.md).

    MLX's CPU backend multiplies MXFP4 experts by float32 activations 8-19x faster than by
    bf16 ones, so the CPU computes in float32 (the bf16 weights upcast exactly); GPUs keep
    the checkpoints' bf16.
    """
    if dtype is None:
        return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    if isinstance(dtype, mx.Dtype):
        return dtype
    names = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float16": mx.float16,
             "fp16": mx.float16, "float32": mx.float32, "fp32": mx.float32}
    if dtype not in names:
        raise GptOssError(f"unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def build_model(cfg: ModelConfig, model: Model | None = None) -> Model:
    """The module graph for `cfg` (or `model`, e.g. a pipeline stage), with the converter's
    quantization applied if it recorded one."""
    model = Model(cfg) if model is None else model
    q = cfg.quantization
    if q is not None:
        wanted = [QUANTIZABLE_MODULES[m] for m in q.modules]
        nn.quantize(
            model, group_size=q.group_size, bits=q.bits, mode=q.mode,
            class_predicate=lambda path, module: isinstance(module, (nn.Linear, nn.Embedding))
            and any(match(path) for match in wanted),
        )
    return model


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None,
               shard: Any = None) -> tuple[Model, str]:
    """The model alone, and the checkpoint format it was read from.

    `shard` (a `distributed.Shard`) builds one rank's share instead, and reads only its
    tensors: `shard.experts` rows of the expert tensors, those `shard.local_name` keeps."""
    path = Path(path)
    if not path.is_dir():
        raise GptOssError(f"{path}: model directory not found")
    cfg = load_config(path)
    raw = read_json(path / "config.json", expect=dict, error=ConfigError)
    compute = resolve_dtype(dtype)
    # By default on the CPU the activations are float32 (fast MXFP4 products), but the two
    # vocabulary matrices keep the checkpoint's dtype: half the memory, and MLX's CPU
    # matrix-vector product is faster in bf16 than through its reference float32 BLAS.
    keep = _VOCAB_MATRICES if dtype is None and compute == mx.float32 else frozenset()
    fmt, tensors = canonical_tensors(path, cfg, raw,
                                     experts=shard.experts if shard is not None else None)
    weights = []
    for name, value in tensors:
        if shard is not None and (name := shard.local_name(name)) is None:
            continue  # another rank's layer: never read
        if mx.issubdtype(value.dtype, mx.floating) and name not in keep:
            value = value.astype(compute)
        weights.append((name, value))
    model = shard.build(cfg) if shard is not None else build_model(cfg)
    model.load_weights(weights, strict=True)
    if keep:
        model.activation_dtype = compute
    try:
        mx.eval(model.parameters())
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: failed to read weights ({e})") from None
    model.eval()
    return model, fmt


def load(path: str | Path, dtype: str | mx.Dtype | None = None,
         adapter: str | Path | None = None, shard: Any = None) -> tuple[Model, Any]:
    """Load a gpt-oss model directory: returns `(model, tokenizer)`.

    `dtype` sets the compute dtype of the non-quantized weights and so of the activations
    (e.g. "float32"); the default is float32 activations on the CPU (vocabulary matrices kept
    in bf16) and bf16 on a GPU (see `resolve_dtype`). MXFP4 experts stay packed. `adapter` is
    a LoRA adapter directory (PEFT's format, see `lora.py`) applied unfused. `shard`: see
    `load_model` (`distributed.load` passes it).
    """
    model, _ = load_model(path, dtype, shard)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter)
        model.eval()
    return model, load_tokenizer_for(Path(path))


def load_tokenizer_for(path: Path) -> Any:
    from .harmony import load_tokenizer

    return load_tokenizer(model_dir=path)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (any MLX module: ours or mlx-lm's)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
