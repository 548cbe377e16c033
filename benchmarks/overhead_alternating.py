"""Per-token decode overhead with the implementations taking turns in one process.

`mlx-gptoss bench --overhead` runs each sample in a fresh process; on a shared machine whose
speed drifts over minutes that compares moments as much as code. Here this checkout, mlx-lm
and optionally another checkout of mlx-gptoss (`--other DIR`, e.g. a worktree of an earlier
commit) decode in turn, round after round, on the same tiny-width weights, so a drift hits
all of them alike. Per implementation: the median wall ms per token and the median CPU ms of
MLX's main thread (the Python thread) and of its other threads, from
`/proc/self/task/*/schedstat` (Linux only).

    python benchmarks/overhead_alternating.py [--layers 36] [--rounds 12] [--tokens 32]
                                              [--other DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

from mlx_gptoss.benchmark import (MlxLm, OVERHEAD_WIDTHS, Ours, Settings, decode, model_dirs,
                                  prompt)


def thread_cpu_ns() -> dict[int, int]:
    """CPU nanoseconds run so far by each thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            out[int(tid)] = int(f.read().split()[0])
    return out


def other_checkout_runner(root: Path) -> type:
    """`Ours` from the mlx_gptoss package under `root`, imported under another name."""
    package = root / "mlx_gptoss"
    spec = importlib.util.spec_from_file_location(
        "mlx_gptoss_other", package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mlx_gptoss_other"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("mlx_gptoss_other.benchmark").Ours


def alternate(layers: int, rounds: int, tokens: int, other: Path | None, cache_dir: Path
              ) -> dict[str, dict[str, list[float]]]:
    """{implementation: {"wall" | "main" | "other threads": ms per token, one per round}}."""
    source, converted = model_dirs(Settings(layers=layers, widths=OVERHEAD_WIDTHS,
                                            cache_dir=cache_dir))
    runners = {"this": Ours(None)}
    if other is not None:
        runners["other"] = other_checkout_runner(other)(None)
    runners["mlx-lm"] = MlxLm(None)
    for name, runner in runners.items():
        runner.load(source if name == "mlx-lm" else converted)
    ids = prompt(64, OVERHEAD_WIDTHS["vocab_size"], 0)
    main_thread = os.getpid()  # the Python thread, which drives MLX's eval
    results = {name: {"wall": [], "main": [], "other threads": []} for name in runners}
    for round_ in range(rounds + 1):  # round 0 warms up (traces, allocations)
        for name, runner in runners.items():
            cache = runner.make_cache()
            logits = runner.prefill(ids, cache)
            before = thread_cpu_ns()
            per_token = decode(runner, cache, logits, tokens)
            after = thread_cpu_ns()
            if round_ == 0:
                continue
            per = 1e6 * (tokens + 1)  # ns -> ms per token (decode runs tokens + 1 steps)
            spent = {t: after[t] - before.get(t, 0) for t in after}
            results[name]["wall"].append(1000 * per_token)
            results[name]["main"].append(spent.pop(main_thread) / per)
            results[name]["other threads"].append(sum(spent.values()) / per)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--other", type=Path, help="another mlx-gptoss checkout to compare")
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()
    results = alternate(args.layers, args.rounds, args.tokens, args.other, args.cache_dir)
    print(f"{args.layers} layers, {args.rounds} rounds of {args.tokens} tokens, ms per token "
          "(median): wall, main-thread CPU, other threads' CPU")
    medians = {name: {k: statistics.median(v) for k, v in r.items()}
               for name, r in results.items()}
    for name, m in medians.items():
        ratio = m["wall"] / medians["mlx-lm"]["wall"]
        print(f"  {name:>7}: {m['wall']:7.2f} {m['main']:7.2f} {m['other threads']:7.2f}"
              f"   / mlx-lm {ratio:.3f}")


if __name__ == "__main__":
    main()
