"""The quantized KV cache (issue 17): accuracy, prefill memory, and decode speed vs mlx-lm.

    python benchmarks/kv_cache.py accuracy [--layers 2] [--prompt 64] [--tokens 2048]
                                           [--seconds 600] [--vocab 4096]
    python benchmarks/kv_cache.py memory   [--sizes 4096,8192,16384,32768]
    python benchmarks/kv_cache.py speed    [--contexts 4096,16384,32768] [--decode 16]

accuracy: a random-weight checkpoint at gpt-oss-20b's per-layer widths (hidden 2880, 64x64
  query heads, 8 kv heads, 32 experts top-4, window 128; the vocabulary shrunk to --vocab so
  the head does not dominate a CPU run) and --layers blocks (sliding, full, ...). After one
  prompt, the unquantized, 8-bit and 4-bit caches decode side by side (one `step_rows` batch)
  along the unquantized cache's greedy tokens. Teacher forcing makes the agreement exact:
  the 8-bit cache's free-running greedy tokens equal the unquantized ones up to the first
  step whose argmax differs. Reports |Δlogit| percentiles per bit width and that step.
memory: tiny widths (2 query heads, 1 kv head of 32, so a 32k prefill fits this CPU), one
  chunked prefill per size and cache (float32, kv_group_size 32), MLX's peak memory during it.
speed: tiny widths; the caches filled to each context (random keys/values written through
  each cache's own update_and_fetch: see `fill`), then pipelined greedy
  decode, ours (bf16-equivalent unquantized, 8-bit, 4-bit) beside mlx-lm's KVCache on the
  same weights (mlx-lm loads the hub layout; both in --dtype, bf16 by default).
Every mode prints JSON lines and writes them to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_gptoss.benchmark import Settings, decode, synthetic_checkpoint  # noqa: E402
from mlx_gptoss.cache import KVCache, QuantizedKVCache  # noqa: E402
from mlx_gptoss.loading import load_model  # noqa: E402
from mlx_gptoss.memory import kv_bytes_per_position  # noqa: E402
from mlx_gptoss.model import prefill  # noqa: E402
from mlx_gptoss.synthetic import REAL_WIDTHS, TINY  # noqa: E402

BITS = (None, 8, 4)
# Tiny widths with gpt-oss's head_dim (MLX quantizes groups of 32, 64 or 128 elements).
TINY_KV = {**{k: v for k, v in TINY.items() if k != "num_hidden_layers"}, "head_dim": 64}
# For 32k-token prefills on a 2-core CPU: the attention flops (quadratic) shrunk 8x.
# The real window (128): the sliding layers' blocks cost as in gpt-oss, not 16x more calls.
TINY_PREFILL = {**TINY_KV, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                "sliding_window": 128}


def label(bits: int | None) -> str:
    return "unquantized" if bits is None else f"{bits}-bit"


def emit(out: list, row: dict) -> None:
    print(json.dumps(row), flush=True)
    out.append(row)


def percentiles(x: np.ndarray) -> dict[str, float]:
    qs = np.percentile(x, [50, 90, 99, 99.9])
    return {"p50": float(qs[0]), "p90": float(qs[1]), "p99": float(qs[2]),
            "p99.9": float(qs[3]), "max": float(x.max()), "mean": float(x.mean())}


class RoundedKVCache(KVCache):
    """The unquantized cache with its keys and values stored in `dtype` (bf16): the reference
    lossy cache, the one the issue calls "the bf16 cache", under float32 compute."""

    def __init__(self, dtype=mx.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return super().update_and_fetch(keys.astype(self.dtype).astype(keys.dtype),
                                        values.astype(self.dtype).astype(values.dtype))


# The caches compared with the float32 one: label -> how to make each full layer's cache.
LOSSY = {"bf16": lambda: RoundedKVCache(), "8-bit": lambda: QuantizedKVCache(8, 64),
         "4-bit": lambda: QuantizedKVCache(4, 64)}


def accuracy(args, out: list) -> None:
    settings = Settings(layers=args.layers, cache_dir=Path(args.cache_dir),
                        widths={**REAL_WIDTHS, "vocab_size": args.vocab})
    model, _ = load_model(synthetic_checkpoint(settings), "float32")
    prompt = mx.array(np.random.default_rng(0).integers(0, args.vocab, (1, args.prompt)))
    caches = [model.make_cache()]
    for make in LOSSY.values():
        caches.append([make() if type(c) is KVCache else c
                       for c in model.make_cache()])
    logits = mx.concatenate([prefill(model, prompt, c) for c in caches])
    names = list(LOSSY)
    deltas: dict[str, list[np.ndarray]] = {n: [] for n in names}
    first = {n: None for n in names}  # first step whose argmax differs from float32's
    differ: dict[str, list[dict]] = {n: [] for n in names}  # every such step, teacher-forced
    tokens, spread, margins, start, steps = [], [], [], time.perf_counter(), 0
    while steps < args.tokens and time.perf_counter() - start < args.seconds:
        rows = np.array(logits, dtype=np.float64)
        best = rows.argmax(-1)
        top2 = np.sort(rows[0])[-2:]
        margins.append(top2[1] - top2[0])
        spread.append(rows[0].std())
        for i, name in enumerate(names, 1):
            deltas[name].append(np.abs(rows[i] - rows[0]).astype(np.float32))
            if best[i] != best[0]:
                first[name] = steps if first[name] is None else first[name]
                differ[name].append({"step": steps, "token": int(best[i]),
                                     "float32_token": int(best[0]),
                                     "top2_margin": float(margins[-1]),
                                     "max_abs_delta": float(deltas[name][-1].max())})
        tokens.append(int(best[0]))
        steps += 1
        if steps % 256 == 0:
            print(f"{steps} steps, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
        logits = model.step_rows(mx.array([int(best[0])] * len(caches)), caches)
    margins_np = np.array(margins)
    for name in names:
        emit(out, {"mode": "accuracy", "cache": name, "layers": args.layers,
                   "prompt": args.prompt, "steps": steps,
                   "greedy_equal_steps": steps if first[name] is None else first[name],
                   "teacher_forced_argmax_differs": differ[name],
                   "distinct_tokens": len(set(tokens)),
                   "logit_std": float(np.mean(spread)),
                   "top2_margin": {**percentiles(margins_np), "min": float(margins_np.min())},
                   "abs_delta_logit": percentiles(np.concatenate(deltas[name]))})


def tiny_model(args, widths=TINY_KV, name="kv-tiny"):
    # The harness names checkpoints by layers/hidden/experts/vocab only: one folder per widths.
    settings = Settings(layers=3, cache_dir=Path(args.cache_dir) / name, widths=dict(widths))
    path = synthetic_checkpoint(settings)
    return load_model(path, args.dtype)[0], path


def memory(args, out: list) -> None:
    args.dtype = "float32"  # the fast one on CPU; memory is what is measured
    model, _ = tiny_model(args, TINY_PREFILL, "kv-prefill")
    for size in (int(s) for s in args.sizes.split(",")):
        tokens = mx.array(np.random.default_rng(size).integers(0, 256, (1, size)))
        mx.eval(tokens)
        for bits in args.bits:
            cache = model.make_cache(kv_bits=bits, kv_group_size=32)
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            start = time.perf_counter()
            mx.eval(prefill(model, tokens, cache))
            emit(out, {"mode": "memory", "tokens": size, "cache": label(bits),
                       "peak_bytes": mx.get_peak_memory() - base,
                       "kv_bytes": sum(c.nbytes for c in cache),
                       "seconds": round(time.perf_counter() - start, 2)})
            del cache


class _Step:
    """What `benchmark.decode` drives: a model and its one-token step."""

    def __init__(self, model):
        self.model = model

    def step(self, token, cache):
        return self.model(token.reshape(1, 1), cache=cache)[:, -1, :]


def fill(cache: list, context: int, n_kv: int, head_dim: int, dtype) -> None:
    """Every layer's cache holding `context` positions of random keys and values, written
    through its own `update_and_fetch` (decode cost depends on how many positions are held,
    not on their values; a real 32k prefill would cost this CPU far longer than the decode)."""
    for layer in cache:
        for start in range(0, context, 4096):
            n = min(4096, context - start)
            k, v = (mx.random.normal((1, n_kv, n, head_dim), key=mx.random.key(start + i))
                    .astype(dtype) for i in (0, 1))
            layer.update_and_fetch(k, v)
            mx.eval(layer.state)


def speed(args, out: list) -> None:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as mlx_lm_load

    ours, path = tiny_model(args)
    theirs, _ = mlx_lm_load(path, lazy=True)
    dtype = ours.model.norm.weight.dtype  # the same compute dtype for both
    theirs.apply(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
    mx.eval(theirs.parameters())
    cfg = ours.config
    full_layers = sum(not s for s in cfg.sliding_layers)
    for context in (int(c) for c in args.contexts.split(",")):
        runs = [(label(b), ours, lambda b=b: ours.make_cache(kv_bits=b), b) for b in BITS]
        runs.append(("mlx-lm KVCache", theirs, lambda: make_prompt_cache(theirs), None))
        for name, model, make, bits in runs:
            cache = make()
            fill(cache, context - 1, cfg.num_key_value_heads, cfg.head_dim, dtype)
            logits = _Step(model).step(mx.array([7]), cache)
            seconds = decode(_Step(model), cache, logits, args.decode)
            emit(out, {"mode": "speed", "context": context, "cache": name,
                       "decode_tok_s": round(1 / seconds, 1),
                       "kv_bytes_per_token": full_layers * kv_bytes_per_position(
                           cfg, bits, 64, dtype.size),
                       "cache_bytes": sum(c.nbytes for c in cache)})
            del cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["accuracy", "memory", "speed"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sizes", default="4096,8192,16384,32768")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--bits", default="none,8,4", help="memory: the caches to measure",
                        type=lambda v: [None if b == "none" else int(b) for b in v.split(",")])
    parser.add_argument("--dtype", default="bfloat16", help="speed: compute dtype")
    parser.add_argument("--cache-dir", default=".bench-cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out: list = []
    {"accuracy": accuracy, "memory": memory, "speed": speed}[args.mode](args, out)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    main()
