"""Before/after rows for each speed change in mlx_gptoss/model.py, on the bench checkpoint.

Each change is undone by a patch applied to the loaded model's classes, so one process
measures every variant on the same weights, in alternation, median over repeats:

    python benchmarks/ablations.py --layers 2 --size 128 --decode 4 --repeats 2

Variants: the current code; without the compiled one-token step; without window-blocked sliding
attention; with the head run on every prefill row (the old `prefill`); with 512-token prefill
chunks; and, where `--dtypes` names several, each compute dtype.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gptoss import benchmark, model as model_module  # noqa: E402
from mlx_gptoss.model import Attention, Model, TransformerBlock, attention_mask  # noqa: E402
from mlx_gptoss.synthetic import TINY  # noqa: E402


def _plain_windowed(self, q, k, v, offset, history, sinks):
    """One masked call over the whole chunk (the code before window blocks)."""
    mask = attention_mask(q.shape[2], offset, history, self.window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask,
                                                sinks=sinks)


def _block_uncompiled(self, x, mask, cache, last_only=False):
    """A block with every call, one-token steps included, built op by op in Python."""
    offset = cache.offset if cache is not None else 0
    attended = self.self_attn.attend(*self._attention_inputs(x, offset), mask, cache)
    if last_only:
        x, attended = x[:, -1:, :], attended[:, :, -1:, :]
    return self._outputs(x, attended)


def _prefill_with_head_everywhere(model, tokens, cache, chunk_size=512):
    """The original prefill: every chunk's logits for all its rows, then the last row."""
    logits = None
    for start in range(0, tokens.shape[1], chunk_size):
        logits = model(tokens[:, start:start + chunk_size], cache=cache)[:, -1, :]
        mx.eval(logits, [c.state for c in cache])
    return logits


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def _uncompiled_step():
    """Neither the whole-model compiled step nor the per-block compiled functions."""
    with patched(Model, "_fixed_step_ready", staticmethod(lambda caches: False)), \
            patched(TransformerBlock, "__call__", _block_uncompiled):
        yield


VARIANTS = {
    "current": nullcontext,
    "no compiled one-token step": lambda: _uncompiled_step(),
    "no window blocks": lambda: patched(Attention, "_windowed", _plain_windowed),
    "head on every prefill row": lambda: patched(model_module, "prefill",
                                                 _prefill_with_head_everywhere),
    "prefill chunk 512": lambda: patched(model_module, "PREFILL_CHUNK", 512),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="default", help="comma list, e.g. float32,bfloat16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache-dir", type=Path, default=Path(".bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ablations.json"))
    ap.add_argument("--tiny", action="store_true",
                    help="tiny widths: every op is small, so a step costs its overhead alone")
    ap.add_argument("--mlx-lm", action="store_true", help="add mlx-lm as a row")
    args = ap.parse_args()
    widths = ({k: v for k, v in TINY.items() if k != "num_hidden_layers"} if args.tiny
              else dict(benchmark.REAL_WIDTHS))
    settings = benchmark.Settings(layers=args.layers, prompt_sizes=(args.size,),
                                  decode_tokens=args.decode, cache_dir=args.cache_dir,
                                  widths=widths)
    source, path = benchmark.model_dirs(settings)
    vocab = widths["vocab_size"]
    names = args.variants.split(",")
    rows: dict[str, list[dict]] = {}
    runners = []
    for dtype in args.dtypes.split(","):
        r = benchmark.Ours(None if dtype == "default" else dtype)
        r.load(path)
        runners.append((dtype, r))
        benchmark.measure_workload(r, 8, settings, vocab, 0)  # warm-up
    if args.mlx_lm:
        theirs = benchmark.MlxLm(None)
        theirs.load(source)
        benchmark.measure_workload(theirs, 8, settings, vocab, 0)
    for rep in range(args.repeats):
        if args.mlx_lm:
            m = benchmark.measure_workload(theirs, args.size, settings, vocab, 0)
            rows.setdefault("mlx-lm [as loaded]", []).append(m)
        for dtype, r in runners:
            for name in (names if rep % 2 == 0 else names[::-1]):
                if name == "current" or dtype == runners[0][0]:
                    with VARIANTS[name]():
                        m = benchmark.measure_workload(r, args.size, settings, vocab, 0)
                    label = f"{name} [{dtype}]"
                    rows.setdefault(label, []).append(m)
                    print(f"{label}: prefill {m['prefill_s']:.3f}s decode "
                          f"{1 / m['decode_s']:.2f} tok/s", file=sys.stderr, flush=True)
    table = ["| variant | prefill tok/s | decode tok/s | peak GiB |", "|---|---|---|---|"]
    results = {}
    for label, ms in rows.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        results[label] = med
        table.append(f"| {label} | {args.size / med['prefill_s']:.1f} | "
                     f"{1 / med['decode_s']:.2f} | {med['peak_bytes'] / (1 << 30):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": benchmark.machine(), "size": args.size,
                                    "layers": args.layers, "widths": widths,
                                    "results": results}, indent=2))
    print("\n".join(table))
    print(f"\n{args.layers} layers, hidden {widths['hidden_size']}, prompt {args.size}, "
          f"device {mx.default_device()}")


if __name__ == "__main__":
    main()
