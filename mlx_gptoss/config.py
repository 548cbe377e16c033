"""The one model config: every constant the model uses comes from here, read from the file.

Two source shapes are accepted: a Hugging Face `config.json` (the hub's `rope_scaling` +
`rope_theta`, or transformers 5's `rope_parameters`) and the `config.json` of OpenAI's
`original/` folder. Defaults are the ones transformers' `GptOssConfig` applies, so a config
that leaves a key out means the same thing here as in the reference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .env import read_json
from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters; `type` is "yarn" for every released gpt-oss."""

    type: str = "yarn"
    theta: float = 150000.0
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    # transformers treats a missing `truncate` as True; the gpt-oss checkpoints set False.
    truncate: bool = True
    attention_factor: float | None = None


# What `--quantize` quantizes unless told otherwise; "router" is opt-in.
DEFAULT_QUANTIZED_MODULES = ("attention", "embeddings", "lm_head")
QUANTIZABLE_MODULE_NAMES = DEFAULT_QUANTIZED_MODULES + ("router",)
# mode: (default bits, default group size, bits MLX accepts, group sizes MLX accepts). Checked
# before MLX sees them: MLX 0.32 divides by a zero group size (SIGFPE) instead of raising.
QUANTIZATION_MODES: dict[str, tuple[int, int, tuple[int, ...], tuple[int, ...]]] = {
    "affine": (4, 64, (1, 2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": (4, 32, (4,), (32,)),
    "mxfp8": (8, 32, (8,), (32,)),
    "nvfp4": (4, 16, (4,), (16,)),
}


@dataclass(frozen=True)
class QuantizationConfig:
    """How the converter quantized the non-expert linears (experts are always MXFP4).

    Invalid settings raise `ConfigError` on construction, whether they come from the
    command line or from a config.json."""

    mode: str
    bits: int
    group_size: int
    # Which modules were quantized: a subset of QUANTIZABLE_MODULE_NAMES.
    modules: tuple[str, ...] = DEFAULT_QUANTIZED_MODULES

    def __post_init__(self) -> None:
        if self.mode not in QUANTIZATION_MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}; use one of "
                              f"{', '.join(QUANTIZATION_MODES)}")
        _, _, bits, groups = QUANTIZATION_MODES[self.mode]
        for what, value, allowed in (("bits", self.bits, bits),
                                     ("group size", self.group_size, groups)):
            if isinstance(value, bool) or value not in allowed:
                options = ", ".join(map(str, allowed[:-1])) + " or " * (len(allowed) > 1) + \
                    str(allowed[-1])
                raise ConfigError(f"{self.mode} quantization takes {what} {options}, "
                                  f"got {value!r}")
        unknown = set(self.modules) - set(QUANTIZABLE_MODULE_NAMES)
        if unknown:
            raise ConfigError(f"unknown quantized modules {sorted(unknown)}; use some of "
                              f"{', '.join(QUANTIZABLE_MODULE_NAMES)}")


# How the experts' weights are stored: MXFP4 as released, or what `fuse --experts` writes.
EXPERT_FORMATS = ("mxfp4", "dense", "affine")


@dataclass(frozen=True)
class ExpertsConfig:
    """The experts' storage: "mxfp4" (the checkpoints'), "dense" floats, or "affine" with
    `bits`/`group_size`. Only the expert matmul differs between them (see `model.py`); a fused
    LoRA update survives dense or 8-bit storage, not a re-quantization to MXFP4 (`fuse.py`)."""

    format: str = "mxfp4"
    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.format not in EXPERT_FORMATS:
            raise ConfigError(f"unknown expert format {self.format!r}; use one of "
                              f"{', '.join(EXPERT_FORMATS)}")
        if self.format == "affine":
            QuantizationConfig(mode="affine", bits=self.bits, group_size=self.group_size)
        elif (self.bits, self.group_size) != (None, None):
            raise ConfigError(f"{self.format} experts take no bits or group size")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_id: tuple[int, ...] = (200002,)
    pad_token_id: int | None = 199999
    quantization: QuantizationConfig | None = None
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    # ---- derived -------------------------------------------------------------------------
    @property
    def sliding_layers(self) -> list[bool]:
        return [t == SLIDING for t in self.layer_types]

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from either config shape; `source` names the file in error messages."""
        if "model_type" not in raw and "num_experts" in raw and "experts_per_token" in raw:
            return _from_original(raw, source)
        return _from_hf(raw, source)

    def rope_parameters(self) -> dict[str, Any]:
        """The rope section in transformers 5's `rope_parameters` form."""
        r = self.rope
        out: dict[str, Any] = {"rope_type": r.type, "rope_theta": r.theta}
        if r.type == "yarn":
            out.update(
                factor=r.factor,
                beta_fast=r.beta_fast,
                beta_slow=r.beta_slow,
                original_max_position_embeddings=r.original_max_position_embeddings,
                truncate=r.truncate,
            )
            if r.attention_factor is not None:
                out["attention_factor"] = r.attention_factor
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face style config.json (rope_parameters form) that `from_dict` reads back."""
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": True,
            "rope_parameters": self.rope_parameters(),
            "eos_token_id": list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.quantization is not None:
            q = asdict(self.quantization)
            q["modules"] = list(q["modules"])
            out["mlx_quantization"] = q
        if self.experts != ExpertsConfig():
            out["mlx_experts"] = self.experts.to_dict()
        return out


def load_config(model_dir: str | Path) -> ModelConfig:
    if not Path(model_dir).is_dir():
        raise ConfigError(f"{model_dir}: model directory not found")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json (is this a gpt-oss model directory?)")
    raw = read_json(path, expect=dict, error=ConfigError)
    return ModelConfig.from_dict(raw, str(path))


# ---- generation_config.json ----------------------------------------------------------------
GENERATION_CONFIG = "generation_config.json"
_SAMPLING_FIELDS = (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float))


@dataclass(frozen=True)
class GenerationConfig:
    """What a checkpoint says about generating: its eos token ids and sampling defaults.

    The eos ids come from generation_config.json (gpt-oss: <|return|>, <|endoftext|>,
    <|call|>), else from config.json's `eos_token_id`. Sampling fields the file leaves out are
    None, meaning "off" (see `sampling.py`); `do_sample: false` means greedy.
    """

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None

    def sampling_fields(self) -> dict[str, float | int]:
        """The sampling defaults that are set, as `SamplingParams` keyword arguments."""
        return {k: getattr(self, k) for k, _ in _SAMPLING_FIELDS if getattr(self, k) is not None}

    def stop_tokens(self, tokenizer) -> list[int]:
        """Where generation stops: harmony's own stops (<|return|>, <|call|>), which the format
        needs whatever the file says, then the checkpoint's other eos ids, in order."""
        stops = list(tokenizer.stop_token_ids)
        for token in self.eos_token_ids:
            if token not in stops and 0 <= token < tokenizer.vocab_size:
                stops.append(token)
        return stops


def load_generation_config(model_dir: str | Path | None,
                           model_config: ModelConfig | None = None) -> GenerationConfig:
    """`model_dir`'s generation_config.json; without one, the eos ids of `model_config`."""
    fallback = tuple(model_config.eos_token_id) if model_config is not None else ()
    path = Path(model_dir) / GENERATION_CONFIG if model_dir is not None else None
    if path is None or not path.is_file():
        return GenerationConfig(eos_token_ids=fallback)
    data = read_json(path, expect=dict, error=ConfigError)
    fields: dict[str, Any] = {}
    for key, kind in _SAMPLING_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or (kind is int and value != int(value)):
            raise ConfigError(f"{path}: {key} must be a{'n integer' if kind is int else ' number'}"
                              f", got {value!r}")
        fields[key] = kind(value)
    if data.get("do_sample") is False:
        fields["temperature"] = 0.0
    eos = data.get("eos_token_id")
    return GenerationConfig(eos_token_ids=fallback if eos is None else _token_ids(eos, path),
                            **fields)


def _token_ids(value: Any, source: Any) -> tuple[int, ...]:
    """`eos_token_id` as a tuple: one id or a list of them, each a non-negative integer."""
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them, "
                          f"got {value!r}")
    return tuple(ids)


# ---- the two source shapes --------------------------------------------------------------
def _require(raw: dict[str, Any], key: str, source: str, kind: type = int) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{source}: missing required key {key!r}")
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {key!r} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
    return value


def _rope_from_hf(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if params is None:
        # transformers' GptOssConfig default when neither key is present.
        params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                  "truncate": False, "original_max_position_embeddings": 4096}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_scaling/rope_parameters must be an object")
    theta = params.get("rope_theta", theta)
    theta = 150000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(type="default", theta=theta)
    if rope_type != "yarn":
        raise ConfigError(f"{source}: unsupported rope type {rope_type!r} (gpt-oss uses 'yarn')")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"{source}: yarn rope needs 'original_max_position_embeddings'")
    factor = params.get("factor")
    if factor is None:  # transformers derives it from the two context lengths
        factor = raw.get("max_position_embeddings", 131072) / original
    return RopeConfig(
        type="yarn",
        theta=theta,
        factor=float(factor),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        original_max_position_embeddings=int(original),
        truncate=bool(params.get("truncate", True)),
        attention_factor=params.get("attention_factor"),
    )


def _from_hf(raw: dict[str, Any], source: str) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type != "gpt_oss":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gpt_oss'")
    n_layers = _require(raw, "num_hidden_layers", source)
    n_heads = _require(raw, "num_attention_heads", source)
    hidden = _require(raw, "hidden_size", source)
    layer_types = raw.get("layer_types") or [
        SLIDING if i % 2 == 0 else FULL for i in range(n_layers)
    ]
    eos = raw.get("eos_token_id", 200002)
    cfg = ModelConfig(
        vocab_size=_require(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size", source),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or hidden // n_heads,
        num_local_experts=raw.get("num_local_experts", raw.get("num_experts", 0)),
        num_experts_per_tok=raw.get("num_experts_per_tok", raw.get("experts_per_token", 4)),
        sliding_window=raw.get("sliding_window") or 0,
        layer_types=tuple(layer_types),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=_rope_from_hf(raw, source),
        eos_token_id=_token_ids(eos, source),
        pad_token_id=raw.get("pad_token_id"),
        quantization=_quantization_from_hf(raw.get("mlx_quantization"), source),
        experts=_experts_from_hf(raw.get("mlx_experts"), source),
    )
    _validate(cfg, source)
    return cfg


def _quantization_from_hf(quant: Any, source: str) -> QuantizationConfig | None:
    """The converter's `mlx_quantization` section, checked (a bad one would crash MLX)."""
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: mlx_quantization must be an object")
    for key in ("mode", "bits", "group_size"):
        if key not in quant:
            raise ConfigError(f"{source}: mlx_quantization has no {key!r}")
    modules = quant.get("modules", DEFAULT_QUANTIZED_MODULES)
    if not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{source}: mlx_quantization.modules must be a list of names")
    try:
        return QuantizationConfig(mode=quant["mode"], bits=quant["bits"],
                                  group_size=quant["group_size"], modules=tuple(modules))
    except ConfigError as e:
        raise ConfigError(f"{source}: mlx_quantization: {e}") from None


def _experts_from_hf(section: Any, source: str) -> ExpertsConfig:
    """The `mlx_experts` section `fuse --experts` records (absent: MXFP4), checked."""
    if section is None:
        return ExpertsConfig()
    if not isinstance(section, dict) or set(section) - {"format", "bits", "group_size"}:
        raise ConfigError(f"{source}: mlx_experts must be an object with format, bits, "
                          "group_size")
    try:
        return ExpertsConfig(**section)
    except ConfigError as e:
        raise ConfigError(f"{source}: mlx_experts: {e}") from None


def _from_original(raw: dict[str, Any], source: str) -> ModelConfig:
    """OpenAI's `original/config.json`: even layers slide, YaRN is never truncated."""
    n_layers = _require(raw, "num_hidden_layers", source)
    context = int(raw.get("initial_context_length", 4096))
    factor = float(raw.get("rope_scaling_factor", 1.0))
    rope = RopeConfig(
        type="yarn" if factor > 1.0 else "default",
        theta=float(raw.get("rope_theta", 150000.0)),
        factor=factor,
        beta_fast=float(raw.get("rope_ntk_beta", 32.0)),
        beta_slow=float(raw.get("rope_ntk_alpha", 1.0)),
        original_max_position_embeddings=context,
        truncate=False,
    )
    cfg = ModelConfig(
        vocab_size=_require(raw, "vocab_size", source),
        hidden_size=_require(raw, "hidden_size", source),
        intermediate_size=_require(raw, "intermediate_size", source),
        num_hidden_layers=n_layers,
        num_attention_heads=_require(raw, "num_attention_heads", source),
        num_key_value_heads=_require(raw, "num_key_value_heads", source),
        head_dim=_require(raw, "head_dim", source),
        num_local_experts=_require(raw, "num_experts", source),
        num_experts_per_tok=_require(raw, "experts_per_token", source),
        sliding_window=_require(raw, "sliding_window", source),
        layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        max_position_embeddings=int(context * factor),
        rope=rope,
    )
    _validate(cfg, source)
    return cfg


def _validate(cfg: ModelConfig, source: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_local_experts", "num_experts_per_tok"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(f"{name} must be a positive integer, got {value!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise bad("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.num_experts_per_tok > cfg.num_local_experts:
        raise bad("num_experts_per_tok exceeds num_local_experts")
    if cfg.hidden_size % 32 or cfg.intermediate_size % 32:
        raise bad("hidden_size and intermediate_size must be multiples of 32 (MXFP4 groups)")
    if cfg.head_dim % 2:
        raise bad("head_dim must be even for RoPE")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise bad(f"layer_types has {len(cfg.layer_types)} entries for "
                  f"{cfg.num_hidden_layers} layers")
    unknown = set(cfg.layer_types) - {SLIDING, FULL}
    if unknown:
        raise bad(f"unknown layer types {sorted(unknown)}")
    if SLIDING in cfg.layer_types and cfg.sliding_window <= 0:
        raise bad("sliding layers need a positive sliding_window")
    if not (cfg.rms_norm_eps > 0 and math.isfinite(cfg.swiglu_limit) and cfg.swiglu_limit > 0):
        raise bad("rms_norm_eps and swiglu_limit must be positive")
