"""LoRA adapters over the frozen model, interchangeable with PEFT's for `GptOssForCausalLM`.

Linear layers (attention q/k/v/o, the router) get `y = W x + s · B (A dropout(x))` with PEFT's
`s = alpha / r` (`alpha / √r` with rsLoRA). The MXFP4 experts get one low-rank pair per expert,
applied to each token's routed experts with `gather_mm` beside the base's `gather_qmm`: the base
is never dequantized, and the experts' gradient flows through `gather_qmm`'s VJP in `x` only.

Adapters are saved and read as PEFT's `adapter_config.json` + `adapter_model.safetensors`:
attention through `target_modules`, the router and experts through `target_parameters`
(`mlp.router.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). PEFT stores the
expert factors as `lora_A.weight [r·E, in]` (expert-major rows) and `lora_B.weight [out, r·E]`
(experts fastest in the columns), for transformers' `x @ W` layout whose gate_up columns
alternate gate, up; here each expert's factors are `[r, in]` and `[out, r]` with the gate_up
rows regrouped gate-first like the base (`formats/hf.py`). The conversion is an exact
re-indexing, so values and gradients carry over bit for bit.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import blas
from .errors import CheckpointError, GptOssError
from .model import Model, SwitchLinear
from .mxfp4 import deinterleave_rows, interleave_rows

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("gate_up_proj", "down_proj")
TARGETS = ATTENTION + ("router",) + EXPERTS
TARGET_GROUPS = {"attention": ATTENTION, "experts": EXPERTS, "all": TARGETS}
# Our module path (under a layer) and PEFT's target_parameters suffix for each non-linear target.
_OUR_PATH = {**{t: f"self_attn.{t}" for t in ATTENTION}, "router": "mlp.router",
             "gate_up_proj": "mlp.experts.gate_up", "down_proj": "mlp.experts.down"}
_PEFT_PARAMETER = {"router": "mlp.router.weight", "gate_up_proj": "mlp.experts.gate_up_proj",
                   "down_proj": "mlp.experts.down_proj"}


class AdapterError(GptOssError):
    """An adapter directory is unreadable, or its tensors do not fit the model."""


@dataclass
class LoraConfig:
    """What to adapt and how. `layers=None` adapts every layer; `targets` names from `TARGETS`
    (or the groups "attention", "experts", "all")."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False
    # Per-target overrides read from PEFT's rank_pattern / alpha_pattern (by target name).
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = expand_targets(self.targets)
        if self.rank < 1:
            raise GptOssError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptOssError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and set(self.targets) & set(EXPERTS):
            # PEFT refuses this too: dropout cannot be factored out of a merged expert delta.
            raise GptOssError("LoRA dropout cannot apply to the experts (PEFT's expert adapters "
                              "take none); use --dropout 0 or leave the experts out")

    def rank_of(self, target: str) -> int:
        return self.ranks.get(target, self.rank)

    def scale_of(self, target: str, rank: int) -> float:
        alpha = self.alphas.get(target, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def expand_targets(targets: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in targets:
        for t in TARGET_GROUPS.get(name, (name,)):
            if t not in TARGETS:
                raise GptOssError(f"unknown LoRA target {t!r}; choose from "
                                  f"{', '.join(TARGETS)} or {', '.join(TARGET_GROUPS)}")
            if t not in out:
                out.append(t)
    if not out:
        raise GptOssError("no LoRA targets given")
    return tuple(out)


# --------------------------------------------------------------------------- layers


def _linear_dims(base: nn.Module) -> tuple[int, int]:
    """(input, output) features of a dense or quantized linear layer."""
    out, packed = base.weight.shape
    if isinstance(base, nn.QuantizedLinear):
        return packed * 32 // base.bits, out
    return packed, out


def _switch_dims(base: SwitchLinear) -> tuple[int, int, int]:
    """(experts, input, output) features of an expert layer, whatever its storage."""
    return base.num_experts, base.input_dims, base.output_dims


class LoRALinear(nn.Module):
    """A frozen linear layer plus `scale · B A`; A `[r, in]`, B `[out, r]` as in PEFT."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        in_dims, out_dims = _linear_dims(base)
        bound = 1.0 / math.sqrt(in_dims)  # PEFT's default init: kaiming-uniform A, zero B
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.lora_b = mx.zeros((out_dims, rank))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        y = self._base(x)
        h = self.dropout(x) if self.dropout is not None else x
        z = (h @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * z).astype(y.dtype)

    def _base(self, x: mx.array) -> mx.array:
        """The frozen layer: through numpy's BLAS when training on the CPU device (see
        `blas`: 1.7-3.3 GFLOP/s in MLX there, ~100 in numpy), else the layer itself."""
        base = self.base
        if (self.training and type(base) is nn.Linear and base.weight.dtype == mx.float32
                and x.dtype == mx.float32 and blas.layers_may_use()):
            return blas.frozen_linear(x, base.weight, base.get("bias"))
        return base(x)

    def delta(self) -> mx.array:
        """The dense update `scale · B A` `[out, in]` (for fusing)."""
        return self.scale * (self.lora_b @ self.lora_a)


class LoRASwitchLinear(nn.Module):
    """Frozen experts (MXFP4, or dense / 8-bit after a fuse) plus a per-expert `scale · B_e A_e` on each token's routed experts.

    A `[E, r, in]`, B `[E, out, r]`; the low-rank products use `gather_mm` with the same expert
    indices (and sortedness) as the base's `gather_qmm`, so only routed experts are touched.
    """

    def __init__(self, base: SwitchLinear, rank: int, scale: float):
        super().__init__()
        self.base = base
        experts, in_dims, out_dims = _switch_dims(base)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (experts, rank, in_dims))
        self.lora_b = mx.zeros((experts, out_dims, rank))
        self.scale = scale

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool,
                 rows: mx.array | None = None, bias: bool = True) -> mx.array:
        y = self.base(x, experts, sorted_experts, rows, bias)
        z = mx.gather_mm(x, self.lora_a.swapaxes(-1, -2), lhs_indices=rows,
                         rhs_indices=experts, sorted_indices=sorted_experts)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=experts,
                         sorted_indices=sorted_experts)
        return y + (self.scale * z).astype(y.dtype)

    @property
    def bias(self) -> mx.array:
        return self.base.bias

    def bias_rows(self, experts: mx.array) -> mx.array:
        return self.base.bias_rows(experts)

    def delta(self) -> mx.array:
        """The dense per-expert update `[E, out, in]` (for fusing)."""
        return self.scale * (self.lora_b @ self.lora_a)


LORA_LAYERS = (LoRALinear, LoRASwitchLinear)


# --------------------------------------------------------------------------- apply / remove


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of a dotted module path."""
    *parents, leaf = path.split(".")
    node = root
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else getattr(node, p)
    return node, leaf


def sites(model: Model, config: LoraConfig) -> Iterator[tuple[int, str, str]]:
    """(layer, target, our module path) for every module the config adapts."""
    n = len(model.layers)
    layers = range(n) if config.layers is None else config.layers
    for i in layers:
        if not 0 <= i < n:
            raise GptOssError(f"LoRA layer {i} does not exist (the model has {n} layers)")
        for t in config.targets:
            yield i, t, f"model.layers.{i}.{_OUR_PATH[t]}"


def apply_lora(model: Model, config: LoraConfig) -> Model:
    """Freeze the model and wrap the configured modules with fresh adapters (in place).

    Adapters are float32 whatever the model's dtype: small, and their updates are tiny.
    """
    if lora_modules(model):
        raise GptOssError("the model already has LoRA adapters; remove_lora first")
    model.freeze()
    for _, target, path in sites(model, config):
        parent, leaf = _resolve(model, path)
        base = getattr(parent, leaf)
        rank = config.rank_of(target)
        scale = config.scale_of(target, rank)
        if target in EXPERTS:
            layer = LoRASwitchLinear(base, rank, scale)
        else:
            layer = LoRALinear(base, rank, scale, config.dropout)
        layer.base.freeze()
        layer.train(model.training)  # a new module trains by default; follow the model's mode
        setattr(parent, leaf, layer)
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)]


def remove_lora(model: Model) -> Model:
    """Put the base modules back (discarding the adapters)."""
    for name, module in lora_modules(model):
        parent, leaf = _resolve(model, name)
        setattr(parent, leaf, module.base)
    model.lora_config = None
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# --------------------------------------------------------------------------- PEFT layout


def _peft_module(layer: int, target: str) -> str:
    if target in ATTENTION:
        return f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{target}"
    if target == "router":
        return f"{PEFT_PREFIX}model.layers.{layer}.mlp.router"
    return f"{PEFT_PREFIX}model.layers.{layer}.mlp.experts"


def _expert_nesting(targets: Iterable[str]) -> dict[str, str]:
    """The key infix of each adapted expert parameter of one layer.

    PEFT (0.21) wraps one `ParamWrapper` per targeted parameter of a module, in the module's
    parameter order whatever the order of `target_parameters`: with both adapted, gate_up is
    the inner wrapper (`experts.base_layer.lora_A`) and down the outer (`experts.lora_A`).
    """
    chosen = [t for t in EXPERTS if t in targets]
    return {t: "base_layer." * (len(chosen) - 1 - k) for k, t in enumerate(chosen)}


def to_peft(target: str, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Our (A, B) -> PEFT's (lora_A.weight, lora_B.weight)."""
    if target not in EXPERTS:
        return a, b
    e, r, i = a.shape
    if target == "gate_up_proj":
        b = interleave_rows(b, axis=1)
    out = b.shape[1]
    return a.reshape(e * r, i), b.transpose(1, 2, 0).reshape(out, r * e)


def from_peft(target: str, a: mx.array, b: mx.array, experts: int) -> tuple[mx.array, mx.array]:
    """PEFT's (lora_A.weight, lora_B.weight) -> our (A, B)."""
    if target not in EXPERTS:
        return a, b
    rows, i = a.shape
    r = rows // experts
    out = b.shape[0]
    a = a.reshape(experts, r, i)
    b = b.reshape(out, r, experts).transpose(2, 0, 1)
    if target == "gate_up_proj":
        b = deinterleave_rows(b, axis=1)
    return a, b


def peft_config(config: LoraConfig, num_layers: int, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it (the keys PEFT reads; the rest take defaults)."""
    every_layer = config.layers is None or sorted(config.layers) == list(range(num_layers))
    modules = [t for t in config.targets if t in ATTENTION]
    params = [t for t in config.targets if t not in ATTENTION]
    params.sort(key=lambda t: ("gate_up_proj", "down_proj", "router").index(t))
    if every_layer:
        target_modules = modules or None
        target_parameters = [_PEFT_PARAMETER[t] for t in params]
    else:
        layers = sorted(config.layers)
        alternatives = "|".join(str(i) for i in layers)
        target_modules = (rf"model\.layers\.({alternatives})\.self_attn\.({'|'.join(modules)})"
                          if modules else None)
        target_parameters = [f"{i}.{_PEFT_PARAMETER[t]}" for t in params for i in layers]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "target_modules": target_modules, "target_parameters": target_parameters or None,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
        "auto_mapping": {"base_model_class": "GptOssForCausalLM",
                         "parent_library": "transformers.models.gpt_oss.modeling_gpt_oss"},
    }


def peft_keys(model: Model) -> dict[str, tuple[str, str, str]]:
    """Each adapted module's path -> (PEFT lora_A key, lora_B key, target)."""
    targets_by_path = {path: t for t, path in _OUR_PATH.items()}
    adapted: dict[int, dict[str, str]] = {}
    for path, _ in lora_modules(model):
        _, _, layer, rest = path.split(".", 3)
        adapted.setdefault(int(layer), {})[targets_by_path[rest]] = path
    out = {}
    for layer, targets in sorted(adapted.items()):
        nesting = _expert_nesting(targets)
        for target, path in targets.items():
            prefix = _peft_module(layer, target) + "." + nesting.get(target, "")
            out[path] = (prefix + "lora_A.weight", prefix + "lora_B.weight", target)
    return out


def adapter_tensors(model: Model) -> dict[str, mx.array]:
    """Every adapter factor under PEFT's key names, float32."""
    modules = dict(lora_modules(model))
    out: dict[str, mx.array] = {}
    for path, (a_key, b_key, target) in peft_keys(model).items():
        a, b = to_peft(target, modules[path].lora_a, modules[path].lora_b)
        out[a_key], out[b_key] = a.astype(mx.float32), b.astype(mx.float32)
    return out


def set_adapter_tensors(model: Model, tensors: dict[str, mx.array], source: str) -> None:
    """Set the adapters from PEFT-named tensors that must match the model's adapters exactly
    (a checkpoint of the same run)."""
    ours = adapter_tensors(model)
    if set(tensors) != set(ours) or any(tensors[k].shape != v.shape for k, v in ours.items()):
        raise AdapterError(f"{source}: the adapter does not match this model's adapters "
                           "(another --rank, --targets or --num-layers?)")
    modules = dict(lora_modules(model))
    for path, (a_key, b_key, target) in peft_keys(model).items():
        modules[path].lora_a, modules[path].lora_b = from_peft(
            target, tensors[a_key], tensors[b_key], model.config.num_local_experts)


def save_adapter(model: Model, path: str | Path, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's format) into `path`."""
    path = Path(path)
    config = getattr(model, "lora_config", None)
    if config is None:
        raise GptOssError("the model has no LoRA adapters to save")
    tensors = adapter_tensors(model)
    try:
        path.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path / ADAPTER_WEIGHTS), tensors, metadata={"format": "pt"})
        (path / ADAPTER_CONFIG).write_text(
            json.dumps(peft_config(config, len(model.layers), base_model), indent=2) + "\n")
    except OSError as e:
        raise AdapterError(f"{path}: cannot write the adapter ({e.strerror or e})") from None
    return path


# --------------------------------------------------------------------------- reading PEFT adapters

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\."
                  r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.router|mlp\.experts)\."
                  r"((?:base_layer\.)*)lora_([AB])(?:\.default)?\.weight$")


def _read_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: not an adapter directory (no {ADAPTER_CONFIG})") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"{file}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key, bad in (("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True)):
        if raw.get(key) is bad:
            raise AdapterError(f"{file}: {key} adapters are not supported")
    if raw.get("modules_to_save"):
        raise AdapterError(f"{file}: modules_to_save ({raw['modules_to_save']}) is not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key, 8), (int, float)) or isinstance(raw.get(key), bool):
            raise AdapterError(f"{file}: {key} must be a number")
    return raw


def read_adapter_tensors(path: Path) -> dict[str, mx.array]:
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}")
    from .safetensors_io import read_header

    try:
        read_header(file)  # names the file and the fault on truncation or a bad header
        return mx.load(str(file))
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    except (RuntimeError, ValueError, OSError) as e:
        raise AdapterError(f"{file}: unreadable ({e})") from None


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches as a dotted suffix or regex."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _classify_experts(model: Model, raw: dict, entries: dict[str, dict[str, mx.array]]
                      ) -> dict[str, str]:
    """Nesting infix -> expert target, for one layer's expert factors.

    The shapes decide: gate_up's factors are A `[r·E, hidden]`, B `[2·intermediate, r·E]`,
    down's A `[r·E, intermediate]`, B `[hidden, r·E]`, never both alike. Factors that fit
    neither (an adapter for another model) are named by their nesting (`_expert_nesting`) so
    that the shape check reports them.
    """
    cfg = model.config
    shapes = {(cfg.hidden_size, 2 * cfg.intermediate_size): "gate_up_proj",
              (cfg.intermediate_size, cfg.hidden_size): "down_proj"}
    by_depth = sorted(entries, key=len, reverse=True)  # the innermost wrapper first
    names = {}
    for k, nest in enumerate(by_depth):
        a, b = entries[nest].get("A"), entries[nest].get("B")
        shape = (a.shape[-1] if a is not None else None, b.shape[0] if b is not None else None)
        names[nest] = shapes.get(shape) or EXPERTS[min(k, 1) if len(by_depth) > 1 else 0]
    return names


def load_adapter(model: Model, path: str | Path) -> Model:
    """Read a PEFT (or our) adapter directory and apply it to `model` (in place)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    raw = _read_config(path)
    tensors = read_adapter_tensors(path)
    pairs: dict[tuple[int, str], dict[str, mx.array]] = {}
    experts: dict[int, dict[str, dict[str, mx.array]]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {key} "
                               "(not a LoRA factor of a gpt-oss module)")
        layer, module, attn, nest, which = int(m[1]), m[2], m[3], m[4], m[5]
        if attn:
            target = attn
        elif module == "mlp.router":
            target = "router"
        else:
            experts.setdefault(layer, {}).setdefault(nest, {})[which] = value
            continue
        pairs.setdefault((layer, target), {})[which] = value
    for layer, entries in experts.items():
        names = _classify_experts(model, raw, entries)
        for nest, factors in entries.items():
            pairs[(layer, names[nest])] = factors
    if not pairs:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: no LoRA tensors")
    n = len(model.layers)
    targets = sorted({t for _, t in pairs}, key=TARGETS.index)
    layers = sorted({i for i, _ in pairs})
    if layers[-1] >= n:
        raise AdapterError(f"{path}: the adapter has layer {layers[-1]}, the model only {n} "
                           "layers (an adapter for another model?)")
    # Per-layer target sets may differ (PEFT allows it): exactly what is there is applied.
    rank = int(raw.get("r", 8))
    alpha = float(raw.get("lora_alpha", 8))
    config = LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=tuple(targets),
                        layers=tuple(layers), use_rslora=bool(raw.get("use_rslora", False)))
    _apply_pairs(model, path, raw, config, pairs)
    return model


def _apply_pairs(model: Model, path: Path, raw: dict, config: LoraConfig,
                 pairs: dict[tuple[int, str], dict[str, mx.array]]) -> None:
    """Check every pair against the model first, then wrap: a bad adapter changes nothing."""
    if lora_modules(model):
        raise GptOssError("the model already has LoRA adapters; remove_lora first")
    num_experts = model.config.num_local_experts
    wrapped = []
    for (layer, target), factors in sorted(pairs.items()):
        where = f"{path}: layer {layer} {target}"
        if set(factors) != {"A", "B"}:
            raise AdapterError(f"{where}: lora_{'B' if 'A' in factors else 'A'} is missing")
        a, b = factors["A"], factors["B"]
        experts = num_experts if target in EXPERTS else 1
        parent, leaf = _resolve(model, f"model.layers.{layer}.{_OUR_PATH[target]}")
        base = getattr(parent, leaf)
        if target in EXPERTS:
            _, in_dims, out_dims = _switch_dims(base)
        else:
            in_dims, out_dims = _linear_dims(base)
        rank = a.shape[0] // experts if a.ndim == 2 else 0
        if (a.ndim != 2 or b.ndim != 2 or rank < 1 or a.shape[0] != rank * experts
                or a.shape[1] != in_dims or b.shape != (out_dims, a.shape[0])):
            per = f"r·{experts}" if experts > 1 else "r"
            raise AdapterError(
                f"{where}: adapter shapes A {list(a.shape)}, B {list(b.shape)} do not fit the "
                f"model (expects A [{per}, {in_dims}], B [{out_dims}, {per}]): an adapter for "
                "another model?")
        peft_key = _peft_module(layer, target).removeprefix(PEFT_PREFIX)
        alpha = float(_pattern_value(raw.get("alpha_pattern"), peft_key, config.alpha))
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        module = (LoRASwitchLinear(base, rank, scale) if target in EXPERTS
                  else LoRALinear(base, rank, scale, 0.0))
        module.lora_a, module.lora_b = from_peft(target, a.astype(mx.float32),
                                                 b.astype(mx.float32), num_experts)
        wrapped.append((parent, leaf, module))
    model.freeze()
    for parent, leaf, module in wrapped:
        module.base.freeze()
        module.train(model.training)
        setattr(parent, leaf, module)
    model.lora_config = config
    mx.eval(model.trainable_parameters())


def adapter_summary(model: Model) -> str:
    config = model.lora_config
    return (f"LoRA rank {config.rank}, alpha {config.alpha:g}, targets {','.join(config.targets)}, "
            f"{len(config.layers) if config.layers is not None else len(model.layers)} layers, "
            f"{trainable_count(model):,} trainable parameters")
