"""Many concurrent streams: our batched `Engine` against mlx-lm's `BatchGenerator`, same weights.

    python benchmarks/batch.py [--quick] [--streams 1,2,4,8] [--prompt 8] [--decode 4]
                               [--repeats 1] [--layers 2] [--out benchmarks/results/batch.json]

One run measures, for both implementations, on the cached 2-layer 20b-width checkpoint of
`mlx_gptoss.benchmark` (ours loads its converted dir, mlx-lm the hub dir, as `mlx-gptoss bench`):

- aggregate decode tokens/s with 1, 2, 4 and 8 streams decoding together;
- p50/p95 time between tokens of a stream at that concurrency;
- time to first token of a request that arrives while 7 others decode.

Both drivers are stepped the same way (`Driver.step` returns the tokens delivered by one engine
step; the clock is read when it returns) and greedy. The steady state is the window in which
every stream of the configuration is decoding: from the step where the last one got its first
token to the step where the first one got its last (ours admits one prompt per step, so its
streams start a step apart; mlx-lm prefills them as one batch). Warm-up runs the same
configuration with short prompts first, so no compilation lands in the window.

Each (configuration, implementation) runs in a fresh process that loads only that model: two
20b-width models at once do not fit beside the other work on a small shared machine, and a fresh
process cannot inherit the other implementation's compiled kernels or allocator state. The
implementations alternate and the order flips each repeat, so machine noise hits both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gptoss.benchmark import (  # noqa: E402
    MLX_LM, OURS, MlxLm, Ours, Settings, machine, model_dirs, write_results)
from mlx_gptoss.synthetic import REAL_WIDTHS  # noqa: E402

WARMUP_PROMPT = 2  # prompt tokens of the warm-up streams: the decode shapes, cheaply
ARRIVAL_SETTLE = 2  # tokens every early stream has before the late request arrives


@dataclass
class BatchSettings:
    """What to measure; the defaults fit a 2-core CPU in about ten minutes."""

    streams: tuple[int, ...] = (1, 2, 4, 8)
    arrival_others: int = 7  # streams decoding when the late request arrives
    prompt_tokens: int = 8  # every stream's prompt (same length for all: no padding)
    decode_tokens: int = 4  # steady-state steps measured per configuration (at least)
    repeats: int = 1
    layers: int = 2
    dtype: str | None = None  # ours; None = the loader's per-device default
    mlx_lm_dtype: str | None = None  # None = mlx-lm's own (the checkpoint's bf16)
    compare: bool = True
    cache_dir: Path = Path(".bench-cache")
    widths: dict[str, Any] = field(default_factory=lambda: dict(REAL_WIDTHS))
    seed: int = 0

    def harness(self) -> Settings:
        """The side-by-side harness's settings for the same checkpoint."""
        return Settings(layers=self.layers, dtype=self.dtype, mlx_lm_dtype=self.mlx_lm_dtype,
                        cache_dir=self.cache_dir, widths=self.widths, seed=self.seed)


QUICK = dict(streams=(1, 4), arrival_others=3, prompt_tokens=4, decode_tokens=2)


# --------------------------------------------------------------------------- drivers

class Driver:
    """One implementation's continuous batcher behind a common face: add a token prompt,
    step, get the `(stream, token)` pairs that step delivered."""

    def add(self, prompt: list[int], max_tokens: int) -> int:
        raise NotImplementedError

    def step(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OursDriver(Driver):
    """`mlx_gptoss.engine.Engine`, greedy, no prompt-cache pool (the prompts share nothing)."""

    def __init__(self, model, max_batch: int):
        from mlx_gptoss.engine import Engine

        self.engine = Engine(model, None, max_batch=max_batch, cache_pool=None)
        self.requests: list[Any] = []
        self.delivered: list[tuple[int, int]] = []

    def add(self, prompt: list[int], max_tokens: int) -> int:
        from mlx_gptoss.engine import Request
        from mlx_gptoss.sampling import SamplingParams

        stream = len(self.requests)
        request = Request(prompt, SamplingParams(temperature=0.0), max_tokens)
        request.on_token = lambda token: self.delivered.append((stream, token))
        self.requests.append(self.engine.add(request))
        return stream

    def step(self) -> list[tuple[int, int]]:
        self.delivered = []
        self.engine.step()
        failed = [r.error for r in self.requests if r.error is not None]
        if failed:
            raise failed[0]
        return self.delivered

    def close(self) -> None:
        self.engine.close()


class MlxLmDriver(Driver):
    """`mlx_lm.generate.BatchGenerator` with its defaults (greedy sampler, prefill batches of
    up to 8, 2048-token prefill steps), one `next()` per step."""

    def __init__(self, model, max_batch: int):
        from mlx_lm.generate import BatchGenerator

        self.generator = BatchGenerator(model, completion_batch_size=max_batch,
                                        prefill_batch_size=min(8, max_batch))
        self.streams: dict[int, int] = {}

    def add(self, prompt: list[int], max_tokens: int) -> int:
        (uid,) = self.generator.insert([prompt], [max_tokens])
        self.streams[uid] = len(self.streams)
        return self.streams[uid]

    def step(self) -> list[tuple[int, int]]:
        _, generated = self.generator.next()
        return [(self.streams[r.uid], r.token) for r in generated]

    def close(self) -> None:
        self.generator.close()


DRIVERS = {OURS: OursDriver, MLX_LM: MlxLmDriver}


# --------------------------------------------------------------------------- scenarios

@dataclass
class Trace:
    """When each stream's tokens arrived (perf_counter seconds) and what they were."""

    added: list[float] = field(default_factory=list)
    times: list[list[float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    def record(self, delivered: list[tuple[int, int]], now: float) -> None:
        for stream, token in delivered:
            self.times[stream].append(now)
            self.tokens[stream].append(token)


def add_stream(driver: Driver, trace: Trace, prompt: list[int], max_tokens: int) -> int:
    stream = driver.add(prompt, max_tokens)
    trace.added.append(time.perf_counter())
    trace.times.append([])
    trace.tokens.append([])
    return stream


def run_concurrent(driver: Driver, prompts: Sequence[list[int]], max_tokens: int) -> Trace:
    """All prompts queued at once; step until the first stream has its `max_tokens` (the end
    of the steady window: what the others do after it is not measured)."""
    trace = Trace()
    for p in prompts:
        add_stream(driver, trace, p, max_tokens)
    while all(len(t) < max_tokens for t in trace.tokens):
        trace.record(driver.step(), time.perf_counter())
    return trace


def run_until_decoding(driver: Driver, prompts: Sequence[list[int]], trace: Trace,
                       settle: int = ARRIVAL_SETTLE) -> None:
    """Queue `prompts` (no length limit) and step until each has `settle` tokens: all of them
    then decode together."""
    for p in prompts:
        add_stream(driver, trace, p, 1 << 20)
    while any(len(t) < settle for t in trace.tokens):
        trace.record(driver.step(), time.perf_counter())


def run_arrival(driver: Driver, early: Sequence[list[int]], late: list[int]) -> Trace:
    """`early` streams decode, then `late` arrives; step until it has its first token. The
    last stream of the trace is the late one."""
    trace = Trace()
    run_until_decoding(driver, early, trace)
    late_stream = add_stream(driver, trace, late, 1 << 20)
    while not trace.tokens[late_stream]:
        trace.record(driver.step(), time.perf_counter())
    return trace


def steady_window(trace: Trace) -> tuple[float, float]:
    """(start, end) of the span in which every stream decodes: the last stream's first token
    to the first stream's last token."""
    return max(t[0] for t in trace.times), min(t[-1] for t in trace.times)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def concurrency_figures(trace: Trace) -> dict[str, Any]:
    """Aggregate decode tokens/s and the time between tokens inside the steady window."""
    start, end = steady_window(trace)
    if end <= start:
        raise ValueError("no steady window: every stream needs more tokens than there are "
                         "streams (decode_tokens too small)")
    tokens = sum(1 for times in trace.times for t in times if start < t <= end)
    gaps = [b - a for times in trace.times for a, b in zip(times, times[1:])
            if start <= a and b <= end]
    return {"streams": len(trace.times), "window_s": end - start, "window_tokens": tokens,
            "aggregate_tok_s": tokens / (end - start),
            "per_stream_tok_s": tokens / (end - start) / len(trace.times),
            "tbt_p50_s": percentile(gaps, 50), "tbt_p95_s": percentile(gaps, 95),
            "tbt_samples": len(gaps),
            "ttft_s": [times[0] - added for times, added in zip(trace.times, trace.added)]}


def arrival_figures(trace: Trace) -> dict[str, Any]:
    late = len(trace.times) - 1
    arrived, first = trace.added[late], trace.times[late][0]
    early_gaps = [b - a for times in trace.times[:late] for a, b in zip(times, times[1:])
                  if b > arrived and a < first]  # the gaps that overlap its wait
    return {"others": late, "ttft_s": first - arrived,
            # the others' gap while the newcomer is prefilled: what its arrival costs them
            "others_max_gap_during_arrival_s": max(early_gaps, default=0.0)}


def random_prompts(n: int, size: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(size)] for _ in range(n)]


# --------------------------------------------------------------------------- one configuration

def measure(impl: str, model, config: str, settings: BatchSettings, vocab: int
            ) -> dict[str, Any]:
    """One configuration ("streams=N" or "arrival") on a loaded model: warm up on short
    prompts, then measure. This is the core the worker process runs."""
    if config == "arrival":
        n = settings.arrival_others + 1
    else:
        n = int(config.removeprefix("streams="))
    max_tokens = settings.decode_tokens + n  # ours' streams start up to n - 1 steps apart
    make = DRIVERS[impl]
    seed = settings.seed + 1000 * n + (7 if config == "arrival" else 0)
    warm = random_prompts(n, WARMUP_PROMPT, vocab, seed + 1)
    prompts = random_prompts(n, settings.prompt_tokens, vocab, seed)

    driver = make(model, n)
    try:
        if config == "arrival":
            late = random_prompts(1, settings.prompt_tokens, vocab, seed + 2)[0]
            run_arrival(driver, warm[:-1], late)  # the late prompt's prefill shape
        else:
            run_until_decoding(driver, warm, Trace())  # every decode batch size up to n
    finally:
        driver.close()
    driver = make(model, n)
    try:
        if config == "arrival":
            trace = run_arrival(driver, prompts[:-1], prompts[-1])
            figures = arrival_figures(trace)
        else:
            trace = run_concurrent(driver, prompts, max_tokens)
            figures = concurrency_figures(trace)
    finally:
        driver.close()
    figures["prompts"] = prompts
    figures["tokens"] = trace.tokens
    figures["token_times_s"] = [[t - trace.added[0] for t in times] for times in trace.times]
    figures["added_s"] = [t - trace.added[0] for t in trace.added]
    return figures


def load(impl: str, settings: BatchSettings):
    """The model of `impl` from the harness's cached checkpoint, loaded by the harness's runner
    (ours from the converted dir, mlx-lm from the hub dir)."""
    harness = settings.harness()
    source, converted = model_dirs(harness)
    runner = Ours(harness.dtype) if impl == OURS else MlxLm(harness.mlx_lm_dtype)
    runner.load(converted if impl == OURS else source)
    return runner.model


def worker(impl: str, config: str, settings: BatchSettings) -> dict[str, Any]:
    import mlx.core as mx

    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    start = time.perf_counter()
    model = load(impl, settings)
    loaded = time.perf_counter() - start
    vocab = settings.widths.get("vocab_size", REAL_WIDTHS["vocab_size"])
    mx.reset_peak_memory()
    figures = measure(impl, model, config, settings, vocab)
    figures["load_s"] = loaded
    figures["peak_memory_bytes"] = mx.get_peak_memory()
    figures["load_average_1min"] = [load_before[0], os.getloadavg()[0]]
    return figures


# --------------------------------------------------------------------------- the run

def configs(settings: BatchSettings) -> list[str]:
    return [f"streams={n}" for n in settings.streams] + ["arrival"]


def run(settings: BatchSettings, log=print) -> dict[str, Any]:
    """Every configuration for both implementations, each in a fresh worker process."""
    source, converted = model_dirs(settings.harness())  # written once, before any timing
    log(f"checkpoint: {source} (converted: {converted})")
    impls = [OURS, MLX_LM] if settings.compare else [OURS]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        i: {c: [] for c in configs(settings)} for i in impls}
    started = time.perf_counter()
    for config in configs(settings):
        for rep in range(settings.repeats):
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                figures = spawn(impl, config, settings)
                raw[impl][config].append(figures)
                log(f"  {impl:>10} {config:<10} rep {rep}: {summary(figures)}"
                    f"  [{time.perf_counter() - started:.0f}s]")
    return {"machine": machine(), "settings": settings_json(settings),
            "checkpoints": {OURS: str(converted), MLX_LM: str(source)},
            "implementations": {i: {c: median_figures(runs) for c, runs in raw[i].items()}
                                for i in impls},
            "runs": raw}


def spawn(impl: str, config: str, settings: BatchSettings) -> dict[str, Any]:
    """Run one configuration in a fresh process; its last stdout line is the figures' JSON."""
    spec = json.dumps({"impl": impl, "config": config, "settings": settings_json(settings)})
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", spec],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def settings_json(settings: BatchSettings) -> dict[str, Any]:
    return {**asdict(settings), "cache_dir": str(settings.cache_dir)}


def settings_from_json(data: dict[str, Any]) -> BatchSettings:
    data = dict(data)
    data["streams"] = tuple(data["streams"])
    data["cache_dir"] = Path(data["cache_dir"])
    return BatchSettings(**data)


def summary(f: dict[str, Any]) -> str:
    if "aggregate_tok_s" in f:
        return (f"{f['aggregate_tok_s']:.2f} tok/s aggregate, between tokens p50 "
                f"{f['tbt_p50_s'] * 1e3:.0f} ms p95 {f['tbt_p95_s'] * 1e3:.0f} ms")
    return f"TTFT {f['ttft_s']:.2f} s beside {f['others']} decoding streams"


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every scalar figure over the repeats; lists (tokens, TTFTs) from the first."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def format_table(results: dict[str, Any]) -> str:
    """Markdown: each figure for both implementations, and ours over mlx-lm (above 1 = ours
    better), plus ours at N streams over ours at 1."""
    impls = results["implementations"]
    names = list(impls)
    head = ["metric", *names] + (["ratio"] if MLX_LM in impls else [])
    rows: list[list[str]] = []

    def row(label: str, key: str, config: str, scale: float, fmt: str, higher_better: bool):
        values = [impls[n][config][key] for n in names]
        cells = [label, *(format(v * scale, fmt) for v in values)]
        if MLX_LM in impls:
            ours, other = values
            num, den = (ours, other) if higher_better else (other, ours)
            cells.append(f"{num / den:.2f}x" if den > 0 else "-")
        rows.append(cells)

    streams = results["settings"]["streams"]
    for n in streams:
        row(f"{n} streams: aggregate decode tok/s", "aggregate_tok_s", f"streams={n}", 1,
            ".2f", True)
    for n in streams:
        c = f"streams={n}"
        row(f"{n} streams: time between tokens p50 ms", "tbt_p50_s", c, 1e3, ".0f", False)
        row(f"{n} streams: time between tokens p95 ms", "tbt_p95_s", c, 1e3, ".0f", False)
    others = results["settings"]["arrival_others"]
    row(f"TTFT of a request arriving while {others} decode, s", "ttft_s", "arrival", 1, ".2f",
        False)
    row(f"  the {others} others' longest gap meanwhile, s", "others_max_gap_during_arrival_s",
        "arrival", 1, ".2f", False)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    ours = impls[OURS]
    single = ours.get("streams=1", {}).get("aggregate_tok_s")
    if single:
        lines.append("")
        lines.append("ours at N streams over ours at 1: " + ", ".join(
            f"{n}: {ours[f'streams={n}']['aggregate_tok_s'] / single:.2f}x" for n in streams))
    s = results["settings"]
    m = results["machine"]
    lines.append(f"device: {m['device']} ({m['processor']}, {m['platform']}); mlx {m['mlx']}, "
                 f"mlx-lm {m.get('mlx_lm', '-')}; {s['layers']} layers at hidden "
                 f"{s['widths']['hidden_size']}, vocab {s['widths']['vocab_size']}; prompts of "
                 f"{s['prompt_tokens']} tokens, >= {s['decode_tokens']} steady steps, "
                 f"{s['repeats']} repeat(s)")
    loads = [x for runs in results.get("runs", {}).values() for rs in runs.values()
             for r in rs for x in r.get("load_average_1min", ())]
    if loads:
        lines.append(f"1-minute load average while the workers ran: {min(loads):.1f} to "
                     f"{max(loads):.1f} ({os.cpu_count()} CPUs)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 and 4 streams, arrival beside 3, 4-token prompts, 2 steady steps")
    p.add_argument("--streams", help="comma-separated concurrencies (default 1,2,4,8; "
                   "'' for the arrival test alone)")
    p.add_argument("--prompt", type=int, help="prompt tokens per stream (default 8)")
    p.add_argument("--decode", type=int, help="steady-state steps measured (default 4)")
    p.add_argument("--repeats", type=int, help="runs of each configuration (default 1)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", help="our compute dtype (default: the loader's per device)")
    p.add_argument("--mlx-lm-dtype", help="cast mlx-lm's floating weights (default: its bf16)")
    p.add_argument("--no-compare", action="store_true", help="ours only")
    p.add_argument("--cache-dir", type=Path, default=Path(".bench-cache"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/batch-latest.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    chosen: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.streams is not None:
        chosen["streams"] = tuple(int(n) for n in args.streams.split(",") if n.strip())
    for key, value in (("prompt_tokens", args.prompt), ("decode_tokens", args.decode),
                       ("repeats", args.repeats)):
        if value is not None:
            chosen[key] = value
    return BatchSettings(layers=args.layers, dtype=args.dtype, mlx_lm_dtype=args.mlx_lm_dtype,
                         compare=not args.no_compare, cache_dir=args.cache_dir, **chosen)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        figures = worker(spec["impl"], spec["config"], settings_from_json(spec["settings"]))
        print(json.dumps(figures))
        return
    results = run(settings_from_args(args), log=lambda line: print(line, flush=True))
    write_results(results, args.out)
    print(format_table(results))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
