"""Synthetic gpt-oss checkpoints in the exact Hugging Face on-disk format, with random weights.

No real weights can be downloaded where this project is tested, so tests, the demo and the
benchmarks write their own: sharded safetensors with an index (one layer deliberately split
across two shards), bf16 dense tensors, MXFP4 expert blocks and scales drawn per the OCP MX
definition, and the hub's config keys. Written tensor by tensor, so even the full 20b shapes
(13.8 GB) never need more than one tensor's rows in memory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .config import FULL, SLIDING
from .safetensors_io import INDEX_NAME, SafetensorsWriter

# The real per-layer widths of gpt-oss-20b/120b.
REAL_WIDTHS: dict[str, Any] = dict(
    hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
    head_dim=64, sliding_window=128, vocab_size=201088,
)
TINY: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, sliding_window=8, vocab_size=256, num_hidden_layers=3, num_local_experts=4,
    num_experts_per_tok=2,
)


def hf_config(num_hidden_layers: int = 24, num_local_experts: int = 32,
              rope_form: str = "rope_scaling", **overrides: Any) -> dict[str, Any]:
    """A gpt-oss config.json as the hub writes it (or transformers 5's `rope_parameters`)."""
    cfg: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
        "experts_per_token": 4, "num_experts_per_tok": 4, "hidden_act": "silu",
        "initial_context_length": 4096, "initializer_range": 0.02,
        "layer_types": [SLIDING if i % 2 == 0 else FULL for i in range(num_hidden_layers)],
        "max_position_embeddings": 131072, "num_hidden_layers": num_hidden_layers,
        "num_local_experts": num_local_experts, "output_router_logits": False,
        "pad_token_id": 199999, "rms_norm_eps": 1e-05, "router_aux_loss_coef": 0.9,
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "use_cache": True,
        "quantization_config": {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4",
        },
        **REAL_WIDTHS,
    }
    rope = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False}
    if rope_form == "rope_parameters":
        cfg["rope_parameters"] = {**rope, "rope_theta": 150000.0}
    else:
        cfg["rope_scaling"], cfg["rope_theta"] = rope, 150000.0
    if "num_experts_per_tok" in overrides:
        overrides.setdefault("experts_per_token", overrides["num_experts_per_tok"])
    cfg.update(overrides)
    if cfg["vocab_size"] <= 200002 and "pad_token_id" not in overrides:
        # A small test vocabulary cannot hold the real special ids.
        cfg["pad_token_id"], cfg["eos_token_id"] = None, cfg["vocab_size"] - 1
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        n = cfg["num_hidden_layers"]
        cfg["layer_types"] = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    return cfg


GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True,
                     "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


_ITEMSIZE = {"BF16": 2, "U8": 1, "F32": 4}
# A tensor to write: name, safetensors dtype, shape, and a row generator.
_Tensor = tuple[str, str, tuple[int, ...], Callable[[], Iterator[np.ndarray]]]


def _tensors(cfg: dict[str, Any], rng: np.random.Generator, expert_gain: float
             ) -> list[_Tensor]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    e, nq, nkv, hd = (cfg["num_local_experts"], cfg["num_attention_heads"],
                      cfg["num_key_value_heads"], cfg["head_dim"])
    seed = rng.integers(2**31)

    def normal(shape, std, mean=0.0, seed_offset=0):
        def rows():
            local = np.random.default_rng([seed, seed_offset])
            step = max(1, (1 << 24) // max(1, int(np.prod(shape[1:]))))
            for start in range(0, shape[0], step):
                n = min(step, shape[0] - start)
                chunk = local.standard_normal((n, *shape[1:]), dtype=np.float32) * std + mean
                yield to_bf16_bits(chunk)
        return rows

    def mxfp4(shape, fan_in, seed_offset):
        """Random codes, and scales sized so values have std ~ expert_gain / sqrt(fan_in)."""
        *lead, groups, _ = shape
        # E2M1 codes drawn uniformly have RMS ~2.93.
        centre = 127 + round(math.log2(expert_gain / (2.93 * math.sqrt(fan_in))))

        def blocks():
            local = np.random.default_rng([seed, seed_offset, 0])
            for _ in range(lead[0]):
                yield local.integers(0, 256, size=(1, *shape[1:]), dtype=np.uint8)

        def scales():
            local = np.random.default_rng([seed, seed_offset, 1])
            for _ in range(lead[0]):
                yield local.integers(centre - 1, centre + 2, size=(1, *lead[1:], groups),
                                     dtype=np.uint8)
        return blocks, scales

    out: list[_Tensor] = []
    k = 0

    def add_normal(name, shape, std, mean=0.0):
        nonlocal k
        k += 1
        out.append((name, "BF16", shape, normal(shape, std, mean, k)))

    add_normal("model.embed_tokens.weight", (v, h), 1.0)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        add_normal(p + "input_layernorm.weight", (h,), 0.1, 1.0)
        add_normal(p + "self_attn.q_proj.weight", (nq * hd, h), 1 / math.sqrt(h))
        add_normal(p + "self_attn.q_proj.bias", (nq * hd,), 0.1)
        add_normal(p + "self_attn.k_proj.weight", (nkv * hd, h), 1 / math.sqrt(h))
        add_normal(p + "self_attn.k_proj.bias", (nkv * hd,), 0.1)
        add_normal(p + "self_attn.v_proj.weight", (nkv * hd, h), 1 / math.sqrt(h))
        add_normal(p + "self_attn.v_proj.bias", (nkv * hd,), 0.1)
        add_normal(p + "self_attn.o_proj.weight", (h, nq * hd), 0.5 / math.sqrt(nq * hd))
        add_normal(p + "self_attn.o_proj.bias", (h,), 0.1)
        add_normal(p + "self_attn.sinks", (nq,), 1.0)
        add_normal(p + "post_attention_layernorm.weight", (h,), 0.1, 1.0)
        add_normal(p + "mlp.router.weight", (e, h), 1 / math.sqrt(h))
        add_normal(p + "mlp.router.bias", (e,), 0.1)
        for proj, rows, cols, gain in (("gate_up_proj", 2 * i, h, expert_gain),
                                       ("down_proj", h, i, 0.5)):
            k += 1
            blocks, scales = mxfp4((e, rows, cols // 32, 16), cols, k)
            q = p + "mlp.experts." + proj
            out.append((q + "_blocks", "U8", (e, rows, cols // 32, 16), blocks))
            out.append((q + "_scales", "U8", (e, rows, cols // 32), scales))
            add_normal(q + "_bias", (e, rows), 0.1)
    add_normal("model.norm.weight", (h,), 0.1, 1.0)
    if not cfg.get("tie_word_embeddings", False):
        add_normal("lm_head.weight", (v, h), 1 / math.sqrt(h))
    return out


def write_hf_checkpoint(path: str | Path, config: dict[str, Any], *, seed: int = 0,
                        num_shards: int = 3, expert_gain: float = 3.0) -> Path:
    """Write a random-weight checkpoint in the hub layout; returns `path`.

    Shards are cut by byte count, so at least one layer straddles two shards whenever
    `num_shards > 1`, as in the real 20b/120b repos.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(config, np.random.default_rng(seed), expert_gain)
    _write_shards(path, tensors, num_shards)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    return path


def _write_shards(path: Path, tensors: list[_Tensor], num_shards: int) -> None:
    sizes = [int(np.prod(shape)) * _ITEMSIZE[dtype] for _, dtype, shape, _ in tensors]
    total = sum(sizes)
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    running = 0
    for index, size in enumerate(sizes):
        shard = min(num_shards - 1, running * num_shards // max(total, 1))
        shards[shard].append(index)
        running += size
    shards = [s for s in shards if s]
    weight_map: dict[str, str] = {}
    for n, members in enumerate(shards):
        file = f"model-{n:05d}-of-{len(shards) - 1:05d}.safetensors"
        entries = [(tensors[j][0], tensors[j][1], tensors[j][2]) for j in members]
        with SafetensorsWriter(path / file, entries, {"format": "pt"}) as writer:
            for j in members:
                name, _, _, rows = tensors[j]
                for chunk in rows():
                    writer.write(name, memoryview(np.ascontiguousarray(chunk)).cast("B"))
                weight_map[name] = file
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))


# ---- the other source layouts the converter reads, from the same random tensors ----------
def _write_single(path: Path, tensors: list[_Tensor]) -> None:
    entries = [(name, dtype, shape) for name, dtype, shape, _ in tensors]
    with SafetensorsWriter(path / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, _, _, rows in tensors:
            for chunk in rows():
                writer.write(name, memoryview(np.ascontiguousarray(chunk)).cast("B"))


def original_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `original/config.json` equivalent of a hub config (alternating layers assumed)."""
    rope = config.get("rope_parameters") or config["rope_scaling"]
    return {
        "num_hidden_layers": config["num_hidden_layers"],
        "num_experts": config["num_local_experts"],
        "experts_per_token": config["num_experts_per_tok"],
        "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "swiglu_limit": config["swiglu_limit"], "head_dim": config["head_dim"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "sliding_window": config["sliding_window"],
        "initial_context_length": rope["original_max_position_embeddings"],
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 150000.0)),
        "rope_scaling_factor": rope["factor"], "rope_ntk_alpha": rope["beta_slow"],
        "rope_ntk_beta": rope["beta_fast"],
    }


def write_original_checkpoint(path: str | Path, config: dict[str, Any], *, seed: int = 0,
                              expert_gain: float = 3.0) -> Path:
    """The same random weights as `write_hf_checkpoint(config, seed)`, in OpenAI's
    `original/` layout: one file, block.N names, fused q/k/v rows, original config keys."""
    from .formats.original import source_name

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {t[0]: t for t in _tensors(config, np.random.default_rng(seed), expert_gain)}
    out: list[_Tensor] = []
    for name, (_, dtype, shape, rows) in tensors.items():
        parts = name.split(".")
        if len(parts) == 6 and parts[4] in ("q_proj", "k_proj", "v_proj"):
            if parts[4] != "q_proj":
                continue
            fused = [tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            rows_total = sum(t[2][0] for t in fused)

            def chained(fused=fused):
                for t in fused:
                    yield from t[3]()
            out.append((f"block.{parts[2]}.attn.qkv.{parts[5]}", dtype,
                        (rows_total, *shape[1:]), chained))
            continue
        out.append((source_name(name), dtype, shape, rows))
    _write_single(path, out)
    (path / "config.json").write_text(json.dumps(original_config(config), indent=2))
    (path / "dtypes.json").write_text(json.dumps(
        {t[0]: {"BF16": "BF16", "U8": "UE8" if "scales" in t[0] else "FP4"}[t[1]] for t in out}))
    return path


def write_dense_checkpoint(path: str | Path, config: dict[str, Any], *, seed: int = 0,
                           num_shards: int = 2, expert_gain: float = 3.0,
                           dtype: str = "BF16", blocks_names: bool = False) -> Path:
    """The same random weights as `write_hf_checkpoint(config, seed)` with the experts
    dequantized (exactly) to x @ W float tensors, as fine-tuning tools export them;
    `blocks_names` keeps the `_blocks` names and drops `_scales` like transformers 5.23."""
    from .mxfp4 import dequantize_reference

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(config, np.random.default_rng(seed), expert_gain)
    by_name = {t[0]: t for t in tensors}
    out: list[_Tensor] = []
    for name, t_dtype, shape, rows in tensors:
        if name.endswith("_scales"):
            continue
        if not name.endswith("_blocks"):
            out.append((name, t_dtype, shape, rows))
            continue
        e, n_out, groups, _ = shape
        scales = by_name[name[: -len("_blocks")] + "_scales"][3]

        def dense_rows(blocks=rows, scales=scales):
            for b, s in zip(blocks(), scales()):
                w = dequantize_reference(b, s).transpose(0, 2, 1)  # x @ W: [1, in, out]
                yield to_bf16_bits(w) if dtype == "BF16" else w.astype(np.float32)
        dense_name = name if blocks_names else name[: -len("_blocks")]
        out.append((dense_name, dtype, (e, groups * 32, n_out), dense_rows))
    _write_shards(path, out, num_shards)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    return path
