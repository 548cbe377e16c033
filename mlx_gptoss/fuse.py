"""Fuse a LoRA adapter into a converted model directory: `W' = W + s · B A`.

The attention projections and the router are dense, so their merge is exact up to the dtype
written (`dtype="float32"` keeps it exact; the default keeps the checkpoint's bf16, as PEFT's
`merge_and_unload` does). The experts are MXFP4, whose steps are far coarser than a typical
LoRA update: re-quantizing a merged expert to MXFP4 loses the update (a 2% update comes back
with relative error ~1.0, finetune-notes.md). So an expert adapter is merged only by an
explicit choice of a storage that keeps it (`experts=`, see `expert_storage`): dense bf16 (or
float32, exact), 8-bit affine (close; half bf16's size, twice MXFP4's), or MXFP4 again,
warned with the measured loss. Without a choice it is refused: serve it unfused
(`load(path, adapter=DIR)`, `--adapter DIR`), which costs two small `gather_mm` per expert layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from .config import ExpertsConfig, load_config
from .converter import ConversionReport, convert
from .env import read_json
from .errors import ConfigError, GptOssError
from .formats import canonical_tensors
from .loading import build_model, resolve_dtype
from .lora import EXPERTS, load_adapter, lora_modules, peft_keys
from .mxfp4 import BITS, GROUP_SIZE, MODE

Tensors = Iterator[tuple[str, mx.array]]


class FuseError(GptOssError):
    """The adapter cannot be fused into this model as asked."""


@dataclass(frozen=True)
class ExpertStorage:
    """How fused experts are written: dense in `dtype`, or quantized (`config`)."""

    config: ExpertsConfig
    dtype: mx.Dtype = mx.bfloat16


def expert_storage(choice: str, hidden: int, intermediate: int) -> ExpertStorage:
    """`--experts` -> its storage. 8-bit uses groups of 64 where the widths allow (gpt-oss's
    2880 does), else 32."""
    group = 64 if hidden % 64 == 0 and intermediate % 64 == 0 else 32
    storages = {
        "bf16": ExpertStorage(ExpertsConfig("dense"), mx.bfloat16),
        "float32": ExpertStorage(ExpertsConfig("dense"), mx.float32),
        "8bit": ExpertStorage(ExpertsConfig("affine", bits=8, group_size=group)),
        "mxfp4": ExpertStorage(ExpertsConfig()),
    }
    if choice not in storages:
        raise FuseError(f"unknown expert storage {choice!r}; use one of {', '.join(storages)}")
    return storages[choice]


EXPERTS_REFUSED = ("the adapter adapts the MXFP4 experts ({where}); re-quantizing a merged "
                   "expert to MXFP4 loses typical LoRA updates: use the adapter unfused "
                   "(--adapter DIR), or fuse into dense or 8-bit experts (--experts bf16 or "
                   "--experts 8bit)")

REQUANTIZED_WARNING = ("warning: the expert updates were re-quantized to MXFP4, which loses "
                       "typical LoRA updates: relative error of the realized update {worst:.2f} "
                       "(worst of {count} tensors; 0 keeps it, 1 loses it); prefer --experts "
                       "bf16 or 8bit, or the adapter unfused")


def adapter_deltas(model_path: Path, adapter: str | Path, experts_fused: bool
                   ) -> dict[str, mx.array]:
    """Canonical weight name -> its float32 LoRA update (lazy), checked against the shapes.

    The adapter is applied to the module graph alone (no weights are read), which reuses the
    adapter reader's validation. The updates stay lazy: a 20b expert layer's is 2 GB.
    """
    cfg = load_config(model_path)
    skeleton = build_model(cfg)
    load_adapter(skeleton, adapter)
    experts = [path for path, (_, _, target) in peft_keys(skeleton).items() if target in EXPERTS]
    if experts and cfg.experts.format == "mxfp4" and not experts_fused:
        raise FuseError(EXPERTS_REFUSED.format(where=f"{len(experts)} modules, e.g. {experts[0]}"))
    return {f"{path}.weight": module.delta() for path, module in lora_modules(skeleton)}


def _is_mxfp4_expert(name: str) -> bool:
    return ".mlp.experts." in name and name.rsplit(".", 1)[1] in ("weight", "scales")


def requantization_error(weight: mx.array, scales: mx.array, delta: mx.array) -> float:
    """Relative error of the update MXFP4 re-quantization realizes:
    `|(Q(W + Δ) - W) - Δ| / |Δ|` (0: kept exactly; 1: as if never fused)."""
    base = _dequantized(weight, scales)
    merged = mx.dequantize(*mx.quantize(base + delta, group_size=GROUP_SIZE, bits=BITS,
                                        mode=MODE), group_size=GROUP_SIZE, bits=BITS, mode=MODE,
                           dtype=mx.float32)
    error = mx.linalg.norm((merged - base - delta).flatten()) / mx.linalg.norm(delta.flatten())
    return error.item()


def _dequantized(weight: mx.array, scales: mx.array) -> mx.array:
    return mx.dequantize(weight, scales, group_size=GROUP_SIZE, bits=BITS, mode=MODE,
                         dtype=mx.float32)


def _stored_experts(module: str, merged: mx.array, storage: ExpertStorage) -> Tensors:
    """A merged float32 expert weight `[E, out, in]` in the chosen storage, as named tensors."""
    cfg = storage.config
    if cfg.format == "dense":
        yield f"{module}.weight", merged.astype(storage.dtype)
        return
    if cfg.format == "affine":
        weight, scales, biases = mx.quantize(merged.astype(mx.bfloat16), group_size=cfg.group_size,
                                             bits=cfg.bits, mode="affine")
        yield from ((f"{module}.weight", weight), (f"{module}.scales", scales),
                    (f"{module}.biases", biases))
        return
    weight, scales = mx.quantize(merged, group_size=GROUP_SIZE, bits=BITS, mode=MODE)
    yield from ((f"{module}.weight", weight), (f"{module}.scales", scales))


def fusing_transform(deltas: dict[str, mx.array], dtype: mx.Dtype | None,
                     storage: ExpertStorage | None) -> Callable[[Tensors], Tensors]:
    """The converter's stream transform: dense weights get their update added; with a
    `storage`, each MXFP4 expert weight (its packed words and scales, in whichever order they
    come) is dequantized, gets its update, and is written in that storage."""

    def merged_dense(name: str, array: mx.array) -> mx.array:
        delta = deltas.get(name)
        if delta is None:
            return array
        if not mx.issubdtype(array.dtype, mx.floating):
            raise FuseError(f"{name} is quantized in the source; fuse into the unquantized "
                            "checkpoint (then quantize with --quantize)")
        return (array.astype(mx.float32) + delta).astype(dtype or array.dtype)

    def transform(tensors: Tensors) -> Tensors:
        pending: dict[str, dict[str, mx.array]] = {}
        for name, array in tensors:
            if storage is None or not _is_mxfp4_expert(name):
                yield name, merged_dense(name, array)
                continue
            module, leaf = name.rsplit(".", 1)
            parts = pending.setdefault(module, {})
            parts[leaf] = array
            if len(parts) < 2:
                continue
            del pending[module]
            merged = _dequantized(parts["weight"], parts["scales"])
            delta = deltas.get(f"{module}.weight")
            yield from _stored_experts(module, merged if delta is None else merged + delta,
                                       storage)
        if pending:
            raise FuseError(f"{next(iter(pending))}: packed weight without scales (or scales "
                            "without weight) in the source")

    return transform


def _measure_requantization(model_path: Path, deltas: dict[str, mx.array]) -> tuple[float, int]:
    """(worst relative error, tensors) of re-quantizing the adapted experts to MXFP4."""
    cfg = load_config(model_path)
    raw = read_json(model_path / "config.json", expect=dict, error=ConfigError)
    _, tensors = canonical_tensors(model_path, cfg, raw)
    arrays = dict(tensors)
    errors = [requantization_error(arrays[name], arrays[name.removesuffix("weight") + "scales"],
                                   delta)
              for name, delta in deltas.items() if ".mlp.experts." in name]
    return max(errors), len(errors)


def fuse(model_path: str | Path, adapter: str | Path, mlx_path: str | Path, *,
         dtype: str | None = None, experts: str | None = None, force: bool = False,
         progress: bool = True, log: Callable[[str], None] | None = None,
         **convert_options) -> ConversionReport:
    """Write `mlx_path`: the model converted with the adapter merged into its weights.

    `model_path` is any directory `convert` reads; `dtype` the dtype of the merged dense
    tensors (default: the source's). `experts` ("bf16", "float32", "8bit", "mxfp4"; see
    `expert_storage`) also merges an expert adapter, rewriting every expert in that storage,
    recorded in config.json for `load()`. Other options (quantization...) go to `convert`.
    """
    model_path = Path(model_path)
    log = log or (lambda line: None)
    cfg = load_config(model_path)
    storage = None
    if experts is not None:
        if cfg.experts.format != "mxfp4":
            raise FuseError(f"{model_path}: the experts are already stored as "
                            f"{cfg.experts.format}; --experts applies to MXFP4 experts")
        storage = expert_storage(experts, cfg.hidden_size, cfg.intermediate_size)
    deltas = adapter_deltas(model_path, adapter, experts_fused=storage is not None)
    if storage is not None and storage.config.format == "mxfp4" and any(
            ".mlp.experts." in name for name in deltas):
        worst, count = _measure_requantization(model_path, deltas)
        log(REQUANTIZED_WARNING.format(worst=worst, count=count))
    target = None if dtype is None else resolve_dtype(dtype)
    report = convert(model_path, mlx_path, force=force, progress=progress, log=log,
                     transform=fusing_transform(deltas, target, storage),
                     experts=None if storage is None else storage.config, **convert_options)
    config_file = Path(mlx_path) / "config.json"
    raw = json.loads(config_file.read_text())
    raw["mlx_gptoss_fused_adapter"] = {"adapter": str(adapter), "tensors": len(deltas),
                                       "experts": experts}
    config_file.write_text(json.dumps(raw, indent=2))
    return report
