"""Distributed inference at 1, 2 and 3 local ranks (issue 16): prefill and decode tok/s.

    python benchmarks/distributed.py [--ranks 1,2,3] [--strategies expert,pipeline]
        [--layers 2] [--prompt 32] [--decode 4] [--repeats 2] [--dtype D]
        [--cache-dir .bench-cache] [--out benchmarks/results/distributed-cpu-L2.json]

The checkpoint is the bench harness's (`mlx_gptoss.benchmark.synthetic_checkpoint`: random
weights at gpt-oss-20b's real widths, `--layers` blocks, hub layout). Each configuration starts
its ranks as separate processes on this machine joined by the ring backend over 127.0.0.1
(MLX_RANK/MLX_HOSTFILE, what `mlx.launch --backend ring -n N` sets), loads each rank's share
with `distributed.load`, and times on rank 0: the prefill of a `--prompt`-token prompt and the
greedy, pipelined decode after it (`benchmark.decode`), medians over `--repeats` after a
warm-up; then the same collectives a decode step issues, alone (no model), per token. All ranks share this machine's cores, so the figures measure the collectives' cost
over loopback, not a speed-up. Bytes exchanged per token are the payloads each decode step
hands to the collectives (from their shapes; the ring backend moves about 2(N-1)/N times an
all_sum's payload per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def exchanged_bytes(strategy: str, ranks: int, layers: int, hidden: int, itemsize: int,
                    tokens: int = 1) -> int:
    """Payload bytes of the collectives in a forward pass of `tokens` tokens.

    expert: each rank's all_sum buffers (one per layer); pipeline: the N-1 hand-offs between
    stages plus one rank's buffer of the final all_sum."""
    if ranks == 1:
        return 0
    activation = tokens * hidden * itemsize
    if strategy == "expert":
        return layers * activation
    return (ranks - 1) * activation + activation


def collectives_only(strategy: str, group, layers: int, hidden: int, dtype, steps: int = 50
                     ) -> float:
    """Seconds per decode token of the collectives alone, issued as a decode step issues them
    (expert: one all_sum of the hidden state per layer; pipeline: the neighbour hand-offs,
    then the final all_sum), each step evaluated before the next like the real loop."""
    import mlx.core as mx

    rank, size = group.rank(), group.size()
    x = mx.zeros((1, 1, hidden), dtype)

    def step(x):
        if strategy == "expert":
            for _ in range(layers):
                x = mx.distributed.all_sum(x, group=group)
            return x
        if rank > 0:
            x = mx.distributed.recv_like(x, rank - 1, group=group)
        if rank < size - 1:
            mx.eval(mx.distributed.send(x, rank + 1, group=group))
        return mx.distributed.all_sum(x, group=group)

    mx.eval(step(x))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        x = step(x) * 0  # keep the values small
        mx.eval(x)
    return (time.perf_counter() - start) / steps


def worker(path: str, strategy: str, prompt_tokens: int, decode_tokens: int, repeats: int,
           dtype: str | None, out: str) -> None:
    import mlx.core as mx

    from mlx_gptoss import distributed
    from mlx_gptoss.benchmark import Ours, decode, prompt
    from mlx_gptoss.loading import parameter_bytes

    group = distributed.init_group()
    start = time.perf_counter()
    model, _ = distributed.load(path, dtype, group=group, parallel=strategy)
    load_s = time.perf_counter() - start
    runner = Ours(dtype)
    runner.model = model
    tokens = prompt(prompt_tokens, model.config.vocab_size, seed=0)
    mx.eval(tokens)
    prefill_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first is the warm-up
        cache = runner.make_cache()
        t0 = time.perf_counter()
        logits = runner.prefill(tokens, cache)
        prefill_s.append(time.perf_counter() - t0)
        decode_s.append(decode(runner, cache, logits, decode_tokens))
    cfg = model.config
    activation = model.embed(mx.array([[0]])).dtype
    collective_s = collectives_only(strategy, group, cfg.num_hidden_layers, cfg.hidden_size,
                                    activation) if group.size() > 1 else 0.0
    if group.rank() == 0:
        itemsize = activation.size
        Path(out).write_text(json.dumps({
            "strategy": strategy if group.size() > 1 else "single", "ranks": group.size(),
            "prefill_tps": prompt_tokens / statistics.median(prefill_s[1:]),
            "decode_tps": 1 / statistics.median(decode_s[1:]),
            "load_s": load_s, "rank0_parameter_bytes": parameter_bytes(model),
            "bytes_per_decode_token": exchanged_bytes(strategy, group.size(),
                                                      cfg.num_hidden_layers, cfg.hidden_size,
                                                      itemsize),
            "activation_dtype": str(activation),
            "collectives_ms_per_token": collective_s * 1e3,
        }))


def run_ranks(n: int, strategy: str, args: argparse.Namespace, path: Path, tmp: Path) -> dict:
    out = tmp / f"{strategy}-{n}.json"
    from mlx_gptoss.distributed import local_hostfile

    hostfile = local_hostfile(n, tmp / f"hosts-{n}.json")
    argv = [sys.executable, __file__, "--worker", str(path), strategy, str(args.prompt),
            str(args.decode), str(args.repeats), args.dtype or "", str(out)]
    procs = []
    for r in range(n):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if n > 1:
            env.update(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{strategy} on {n} ranks failed: exit codes {codes}")
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    lines = ["| ranks | strategy | prefill tok/s | decode tok/s | vs 1 rank | collectives alone, "
             "ms/token | collective payload bytes/token | rank 0 parameter GB |",
             "|---|---|---|---|---|---|---|---|"]
    single = next(r["decode_tps"] for r in rows if r["ranks"] == 1)
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['strategy']} | {r['prefill_tps']:.1f} | "
                     f"{r['decode_tps']:.2f} | {r['decode_tps'] / single:.2f}x | "
                     f"{r['collectives_ms_per_token']:.2f} | "
                     f"{r['bytes_per_decode_token']} | {r['rank0_parameter_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        path, strategy, p, d, r, dtype, out = sys.argv[2:9]
        worker(path, strategy, int(p), int(d), int(r), dtype or None, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,3")
    parser.add_argument("--strategies", default="expert,pipeline")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-cache")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/distributed-cpu-L2.json")
    args = parser.parse_args()

    import tempfile

    from mlx_gptoss.benchmark import Settings, machine, synthetic_checkpoint

    path = synthetic_checkpoint(Settings(layers=args.layers, cache_dir=args.cache_dir))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.ranks.split(",")]:
            for strategy in (["auto"] if n == 1 else args.strategies.split(",")):
                if strategy == "pipeline" and 2 * n > args.layers:  # both kinds per stage
                    print(f"skipped: pipeline over {n} ranks needs {2 * n} layers", flush=True)
                    continue
                rows.append(run_ranks(n, strategy, args, path, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                    "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
