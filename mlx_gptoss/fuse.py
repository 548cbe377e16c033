"""Fuse a LoRA adapter into a converted model directory: `W' = W + s · B A`.

The attention projections and the router are dense, so their merge is exact up to the dtype
written (`dtype="float32"` keeps it exact; the default keeps the checkpoint's bf16, as PEFT's
`merge_and_unload` does). The experts are MXFP4: re-quantizing a merged expert loses typical
LoRA updates entirely (a 2% update comes back with relative error ~1.0, finetune-notes.md), and
this project's model keeps experts MXFP4 only, so an adapter that touches the experts is
refused: serve it unfused (`load(path, adapter=DIR)`, `--adapter DIR`), which costs two small
`gather_mm` per expert layer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .config import load_config
from .converter import ConversionReport, convert
from .errors import GptOssError
from .loading import build_model, resolve_dtype
from .lora import EXPERTS, LoRALinear, load_adapter, lora_modules, peft_keys


class FuseError(GptOssError):
    """The adapter cannot be fused into this model as asked."""


EXPERTS_REFUSED = ("the adapter adapts the MXFP4 experts ({where}); fusing would re-quantize "
                   "them to MXFP4, which loses typical LoRA updates, and dense experts are not "
                   "supported by this model: use the adapter unfused (--adapter DIR)")


def adapter_deltas(model_path: Path, adapter: str | Path) -> dict[str, mx.array]:
    """Canonical weight name -> its float32 LoRA update, checked against the model's shapes.

    The adapter is applied to the module graph alone (no weights are read), which reuses the
    adapter reader's validation.
    """
    skeleton = build_model(load_config(model_path))
    load_adapter(skeleton, adapter)
    experts = [path for path, (_, _, target) in peft_keys(skeleton).items() if target in EXPERTS]
    if experts:
        raise FuseError(EXPERTS_REFUSED.format(where=f"{len(experts)} modules, e.g. {experts[0]}"))
    deltas = {}
    for path, module in lora_modules(skeleton):
        assert isinstance(module, LoRALinear)
        deltas[f"{path}.weight"] = module.delta()
    mx.eval(list(deltas.values()))
    return deltas


def fusing_transform(deltas: dict[str, mx.array], dtype: mx.Dtype | None
                     ) -> Callable[[str, mx.array], mx.array]:
    def transform(name: str, array: mx.array) -> mx.array:
        delta = deltas.get(name)
        if delta is None:
            return array
        if not mx.issubdtype(array.dtype, mx.floating):
            raise FuseError(f"{name} is quantized in the source; fuse into the unquantized "
                            "checkpoint (then quantize with --quantize)")
        out = dtype or array.dtype
        return (array.astype(mx.float32) + delta).astype(out)

    return transform


def fuse(model_path: str | Path, adapter: str | Path, mlx_path: str | Path, *,
         dtype: str | None = None, force: bool = False, progress: bool = True,
         log: Callable[[str], None] | None = None, **convert_options) -> ConversionReport:
    """Write `mlx_path`: the model converted with the adapter merged into its dense weights.

    `model_path` is any directory `convert` reads; `dtype` the dtype of the merged tensors
    (default: the source's). Other options (quantization...) go to `convert`.
    """
    model_path = Path(model_path)
    deltas = adapter_deltas(model_path, adapter)
    target = None if dtype is None else resolve_dtype(dtype)
    report = convert(model_path, mlx_path, force=force, progress=progress, log=log,
                     transform=fusing_transform(deltas, target), **convert_options)
    config_file = Path(mlx_path) / "config.json"
    raw = json.loads(config_file.read_text())
    raw["mlx_gptoss_fused_adapter"] = {"adapter": str(adapter), "tensors": len(deltas)}
    config_file.write_text(json.dumps(raw, indent=2))
    return report
