"""Side-by-side speed of this project and mlx-lm's gpt_oss on the same synthetic weights.

No real weights can be downloaded here, so the harness writes (once, cached) a random-weight
checkpoint with gpt-oss-20b's real widths and a chosen number of layers: per-token cost scales
with the layer count, so a few layers measure the same kernels as the full model. Both
implementations load that directory, then run the same workloads in alternation (so machine
noise hits both), and every figure is a median over repeats after a warm-up.

Nothing here branches on the platform: the same code runs on MLX's CPU, Metal and CUDA
backends, and `mx.default_device()` decides.
"""
from __future__ import annotations

import gc
import hashlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .synthetic import REAL_WIDTHS, TINY, hf_config, write_hf_checkpoint

OURS, MLX_LM = "mlx-gptoss", "mlx-lm"


@dataclass
class Settings:
    """What to measure. The defaults are the issue's; shrink them on slow machines."""

    layers: int = 2
    prompt_sizes: tuple[int, ...] = (128, 1024, 4096)
    decode_tokens: int = 16
    repeats: int = 3
    second_turn_tokens: int = 64
    history: int | None = None  # first turn of the second-turn test; None = largest size
    dtype: str | None = None  # ours; None = the loader's per-device default
    chunk: int | None = None  # ours: prefill chunk; None = model.PREFILL_CHUNK
    mlx_lm_dtype: str | None = None  # None = mlx-lm's own choice (the checkpoint's bf16)
    compare: bool = True  # also run mlx-lm
    breakdown: bool = True
    cache_dir: Path = Path(".bench-cache")
    widths: dict[str, Any] = field(default_factory=lambda: dict(REAL_WIDTHS))
    seed: int = 0


# --------------------------------------------------------------------------- checkpoint

def synthetic_checkpoint(settings: Settings) -> Path:
    """The cached hub-layout checkpoint for these widths and layers; written once, atomically."""
    cfg = hf_config(num_hidden_layers=settings.layers, **settings.widths)
    # Every config value is in the name (hashed): two width sets that share the hidden size,
    # experts and vocabulary but not the heads or window must not share a directory.
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    key = f"hf-L{settings.layers}-H{cfg['hidden_size']}-E{cfg['num_local_experts']}" \
          f"-V{cfg['vocab_size']}-s{settings.seed}-{digest}"
    path = settings.cache_dir / key
    if (path / "config.json").exists():
        return path
    tmp = settings.cache_dir / (key + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier write
    write_hf_checkpoint(tmp, cfg, seed=settings.seed)
    tmp.rename(path)
    return path


def model_dirs(settings: Settings) -> tuple[Path, Path]:
    """(the hub-layout dir mlx-lm reads, our converted dir): the same weights, each
    implementation in the layout its users load; the conversion is cached beside the source."""
    from .converter import convert

    source = synthetic_checkpoint(settings)
    converted = source.with_name(source.name + "-mlx")
    if not (converted / "config.json").exists():
        convert(source, converted, progress=False)
    return source, converted


# --------------------------------------------------------------------------- implementations

class Runner:
    """One implementation behind a common face: load, fresh cache, prefill, one decode step."""

    name: str

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def make_cache(self) -> list:
        return self.model.make_cache()

    def prefill(self, tokens: mx.array, cache: list) -> mx.array:
        """Logits `[1, vocab]` of the last prompt position, with every cache evaluated."""
        raise NotImplementedError

    def step(self, token: mx.array, cache: list) -> mx.array:
        return self.model(token.reshape(1, 1), cache=cache)[:, -1, :]

    def unload(self) -> None:
        self.model = None

    @property
    def parameter_bytes(self) -> int:
        from .loading import parameter_bytes

        return parameter_bytes(self.model)


class Ours(Runner):
    name = OURS

    def __init__(self, dtype: str | None, chunk: int | None = None):
        self.dtype = dtype
        self.chunk = chunk

    def load(self, path: Path) -> None:
        from .loading import load_model

        self.model, _ = load_model(path, self.dtype)

    def prefill(self, tokens: mx.array, cache: list) -> mx.array:
        from .model import PREFILL_CHUNK, prefill

        return prefill(self.model, tokens, cache, self.chunk or PREFILL_CHUNK)


class MlxLm(Runner):
    """mlx-lm's own loader (sanitize + MXFP4 `QuantizedSwitchLinear`) and its prefill pattern."""

    name = MLX_LM
    prefill_step_size = 2048  # mlx_lm.generate.generate_step's default

    def __init__(self, dtype: str | None):
        self.dtype = dtype

    def load(self, path: Path) -> None:
        from mlx_lm.utils import load_model

        model, _ = load_model(path, lazy=True)
        if self.dtype is not None:
            from .loading import resolve_dtype

            dtype = resolve_dtype(self.dtype)
            model.apply(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating)
                        else v)
        mx.eval(model.parameters())
        self.model = model

    def prefill(self, tokens: mx.array, cache: list) -> mx.array:
        # As mlx_lm.generate.generate_step: all but the last token in steps, caches only.
        tokens = tokens[0]
        while tokens.size > 1:
            n = min(self.prefill_step_size, tokens.size - 1)
            self.model(tokens[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            tokens = tokens[n:]
        logits = self.step(tokens, cache)
        mx.eval(logits)
        return logits


# --------------------------------------------------------------------------- measurement

def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def decode(runner: Runner, cache: list, logits: mx.array, n: int) -> float:
    """Greedy-decode `n` tokens after a prefill, pipelined as mlx-lm does; seconds per token."""
    y = mx.argmax(logits, axis=-1)
    nxt = mx.argmax(runner.step(y, cache), axis=-1)
    mx.async_eval(nxt)
    nxt.item()  # the first token pays for lazy setup; time the steady state
    start = time.perf_counter()
    y = nxt
    for _ in range(n):
        nxt = mx.argmax(runner.step(y, cache), axis=-1)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    return (time.perf_counter() - start) / n


def prompt(size: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, vocab, (1, size), key=mx.random.key(seed))


def measure_workload(runner: Runner, size: int, settings: Settings, vocab: int,
                     resident_other: int) -> dict[str, float]:
    """Prefill `size` tokens, decode after it, and the peak memory of both (own weights in)."""
    tokens = prompt(size, vocab, settings.seed + size)
    mx.eval(tokens)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    cache = runner.make_cache()
    prefill_s, logits = _clock(lambda: runner.prefill(tokens, cache))
    per_token = decode(runner, cache, logits, settings.decode_tokens)
    peak = mx.get_peak_memory() - resident_other
    return {"prefill_s": prefill_s, "decode_s": per_token, "peak_bytes": peak}


def measure_second_turn(runner: Runner, history: int, settings: Settings, vocab: int
                        ) -> dict[str, float]:
    """Time to first token of a second turn: reuse the first turn's cache, or start over."""
    first = prompt(history, vocab, settings.seed + 1)
    second = prompt(settings.second_turn_tokens, vocab, settings.seed + 2)
    cache = runner.make_cache()
    runner.prefill(first, cache)
    cached_s, _ = _clock(lambda: runner.prefill(second, cache))
    fresh_s, _ = _clock(lambda: runner.prefill(mx.concatenate([first, second], axis=1),
                                               runner.make_cache()))
    return {"ttft_cached_s": cached_s, "ttft_uncached_s": fresh_s}


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s the framework streams from memory: the best of a reduction and a copy."""
    x = mx.random.uniform(shape=(megabytes * (1 << 20) // 4 // 4096, 4096))
    mx.eval(x)
    results = []
    for fn, moved in ((lambda: x.sum(axis=0), x.nbytes), (lambda: x + 1.0, 2 * x.nbytes)):
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            t, _ = _clock(lambda: mx.eval(fn()))
            times.append(t)
        results.append(moved / statistics.median(times))
    return max(results)


def decode_bytes(model: nn.Module, context: int) -> int:
    """Bytes a decode step must read: every weight used once, plus the KV cache it attends to.

    Experts count only the `k` chosen of each layer; the embedding only one row.
    """
    cfg = model_args(model)
    total = 0
    for name, value in tree_flatten(model.parameters()):
        if ".experts." in name:
            total += value.nbytes * cfg["top_k"] // cfg["experts"]
        elif "embed_tokens" in name:
            total += value.nbytes // cfg["vocab"]
        else:
            total += value.nbytes
    kv_row = 2 * cfg["kv_heads"] * cfg["head_dim"] * cfg["kv_itemsize"]
    for sliding in cfg["sliding_layers"]:
        total += kv_row * (min(context, cfg["window"]) if sliding else context)
    return total


def model_args(model: nn.Module) -> dict[str, Any]:
    """The few config values `decode_bytes` needs, from either implementation."""
    if hasattr(model, "config"):  # ours
        cfg = model.config
        sliding = [b.sliding for b in model.layers]
        n_experts, top_k, window = cfg.num_local_experts, cfg.num_experts_per_tok, \
            cfg.sliding_window
        vocab, kv_heads, head_dim = cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim
    else:  # mlx-lm
        args = model.args
        sliding = [t == "sliding_attention" for t in model.model.layer_types]
        n_experts, top_k, window = args.num_local_experts, args.num_experts_per_tok, \
            args.sliding_window
        vocab, kv_heads, head_dim = args.vocab_size, args.num_key_value_heads, args.head_dim
    return {"experts": n_experts, "top_k": top_k, "window": window, "vocab": vocab,
            "kv_heads": kv_heads, "head_dim": head_dim, "sliding_layers": sliding,
            "kv_itemsize": model.model.norm.weight.dtype.size}  # the activations' dtype


def breakdown(runner: Runner, context: int, settings: Settings, vocab: int
              ) -> dict[str, float]:
    """Seconds per decoded token by component, each timed at the decode shape.

    A component runs for every layer at once (batch 1, one token, `context` keys cached) under
    one `mx.eval`, so a GPU pays one synchronisation per component, not one per layer. `step`
    is a whole unpipelined decode step timed the same way; `overhead` is what the components
    leave of it: graph building, kernel dispatch along the layer chain, the argmax.
    """
    model = runner.model
    cache = runner.make_cache()
    runner.prefill(prompt(context, vocab, settings.seed + 3), cache)
    # Ours embeds and projects through the model's own methods (they apply its dtype policy).
    embed = model.embed if runner.name == OURS else model.model.embed_tokens
    head = model.head if runner.name == OURS else model.lm_head
    x = embed(mx.array([[1]]))
    flat = x.reshape(-1, x.shape[-1])
    layers = list(zip(model.layers, cache))
    chosen = [mx.argpartition(-layer.mlp.router(flat), kth=mlp_top_k(layer.mlp) - 1,
                              axis=-1)[:, :mlp_top_k(layer.mlp)] for layer in model.layers]
    mx.eval(x, chosen)

    def median_time(fn: Callable[[], Any], n: int = 5) -> float:
        mx.eval(fn())
        return statistics.median(_clock(lambda: mx.eval(fn()))[0] for _ in range(n))

    def experts(layer: nn.Module, c: mx.array) -> mx.array:
        if runner.name == OURS:
            return layer.mlp.experts(flat, c)
        return layer.mlp.experts(x, c[None])  # mlx-lm's SwitchGLU takes [B, T, k]

    # Each timed attention call appends one position: a few on top of `context` change nothing.
    parts = {
        "attention": median_time(lambda: [layer.self_attn(x, None, c) for layer, c in layers]),
        "norms": median_time(lambda: [f(x) for layer in model.layers for f in (
            layer.input_layernorm, layer.post_attention_layernorm)]),
        "router": median_time(lambda: [_route(layer.mlp, flat) for layer in model.layers]),
        "experts": median_time(lambda: [experts(layer, c)
                                        for layer, c in zip(model.layers, chosen)]),
        "lm_head": median_time(lambda: head(model.model.norm(x))),
        "embedding": median_time(lambda: embed(mx.array([[1]]))),
    }
    step_s = median_time(lambda: mx.argmax(runner.step(mx.array([1]), cache), axis=-1))
    parts["overhead"] = max(0.0, step_s - sum(parts.values()))
    parts["step"] = step_s
    return parts


def mlp_top_k(mlp: nn.Module) -> int:
    return getattr(mlp, "top_k", None) or mlp.num_experts_per_tok


def _route(mlp: nn.Module, flat: mx.array) -> mx.array:
    logits = mlp.router(flat)
    k = mlp_top_k(mlp)
    chosen = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    return mx.softmax(mx.take_along_axis(logits, chosen, axis=-1), axis=-1, precise=True)


# --------------------------------------------------------------------------- the run

def run(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything in `settings`; returns the results as plain data (see `format_table`)."""
    source, converted = model_dirs(settings)
    vocab = settings.widths.get("vocab_size", REAL_WIDTHS["vocab_size"])
    runners: list[Runner] = [Ours(settings.dtype, settings.chunk)]
    if settings.compare:
        runners.append(MlxLm(settings.mlx_lm_dtype))

    paths = {OURS: converted, MLX_LM: source}
    log(f"checkpoint: {source} (converted: {converted})")
    load_times: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_ in range(2):  # the first round also warms the OS file cache
        for r in runners:
            gc.collect()
            mx.clear_cache()
            t, _ = _clock(lambda r=r: r.load(paths[r.name]))
            load_times[r.name].append(t)
            if round_ == 0:
                r.unload()
    resident = {r.name: r.parameter_bytes for r in runners}
    total_resident = sum(resident.values())

    log("warm-up")
    for r in runners:
        for size in sorted({min(8, *settings.prompt_sizes), min(32, *settings.prompt_sizes)}):
            measure_workload(r, size, settings, vocab, 0)  # decode and sorted-prefill kernels

    raw: dict[str, dict[int, list[dict[str, float]]]] = {
        r.name: {s: [] for s in settings.prompt_sizes} for r in runners}
    for size in settings.prompt_sizes:
        for rep in range(settings.repeats):
            order = runners if rep % 2 == 0 else runners[::-1]
            for r in order:
                m = measure_workload(r, size, settings, vocab, total_resident - resident[r.name])
                raw[r.name][size].append(m)
                log(f"  {r.name:>10} prompt {size:>5}  rep {rep}: prefill {m['prefill_s']:.3f}s"
                    f"  decode {1 / m['decode_s']:.2f} tok/s")

    history = settings.history or max(settings.prompt_sizes)
    turns: dict[str, list[dict[str, float]]] = {r.name: [] for r in runners}
    for rep in range(settings.repeats):
        for r in (runners if rep % 2 == 0 else runners[::-1]):
            turns[r.name].append(measure_second_turn(r, history, settings, vocab))

    bandwidth = memory_bandwidth()
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {**asdict(settings), "cache_dir": str(settings.cache_dir)},
        "checkpoints": {name: str(p) for name, p in paths.items()},
        "bandwidth_bytes_per_s": bandwidth,
        "implementations": {},
    }
    for r in runners:
        sizes = {}
        for size, ms in raw[r.name].items():
            med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
            bytes_read = decode_bytes(r.model, size)
            ceiling = bandwidth / bytes_read
            sizes[str(size)] = {
                "prefill_tok_s": size / med["prefill_s"],
                "prefill_s": med["prefill_s"],
                "decode_tok_s": 1 / med["decode_s"],
                "decode_bytes_per_token": bytes_read,
                "decode_ceiling_tok_s": ceiling,
                "decode_fraction_of_ceiling": (1 / med["decode_s"]) / ceiling,
                "peak_memory_bytes": max(m["peak_bytes"] for m in ms),
            }
        entry: dict[str, Any] = {
            "load_s": statistics.median(load_times[r.name][1:]),
            "parameter_bytes": resident[r.name],
            "dtypes": dtype_summary(r.model),
            "sizes": sizes,
            "second_turn": {
                "history_tokens": history, "new_tokens": settings.second_turn_tokens,
                **{k: statistics.median(t[k] for t in turns[r.name])
                   for k in turns[r.name][0]}},
        }
        if settings.breakdown:
            entry["decode_breakdown_s"] = breakdown(r, max(settings.prompt_sizes), settings,
                                                    vocab)
        results["implementations"][r.name] = entry
    return results


def dtype_summary(model: nn.Module) -> dict[str, int]:
    """Parameter bytes per dtype: shows which weights stayed packed (uint32/uint8)."""
    out: dict[str, int] = {}
    for _, v in tree_flatten(model.parameters()):
        key = str(v.dtype).replace("mlx.core.", "")
        out[key] = out.get(key, 0) + v.nbytes
    return out


def machine() -> dict[str, Any]:
    import mlx

    info = {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "python": platform.python_version(),
            "mlx": getattr(mlx.core, "__version__", "?"),
            "device": str(mx.default_device())}
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items()
                               if isinstance(v, (int, float, str))}
    except Exception:  # device_info differs by backend and version; it is only a label
        pass
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- overhead

# Widths at which every op is tiny, so a decode step costs its per-token overhead alone
# (graph building, dispatch along the layer chain): the regime GPU decode is in.
OVERHEAD_WIDTHS = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}
OVERHEAD_DEPTHS = (24, 36)  # gpt-oss-20b's and 120b's layer counts


@dataclass
class OverheadSettings:
    """The per-token overhead row: tiny widths, real depths, one fresh process per sample."""

    depths: tuple[int, ...] = OVERHEAD_DEPTHS
    prompt_tokens: int = 64
    decode_tokens: int = 64
    repeats: int = 5  # decode runs per process (median)
    processes: int = 3  # fresh processes per implementation and depth (median of medians)
    dtypes: tuple[str | None, ...] = (None, "bfloat16")  # ours; None = per-device default
    compare: bool = True
    cache_dir: Path = Path(".bench-cache")
    seed: int = 0
    rows: tuple[int, ...] = (1, 2, 4, 8)  # the batched step at these batch sizes (first depth)
    row_steps: int = 20


def _overhead_sample(name: str, path: str, dtype: str | None, prompt_tokens: int,
                     decode_tokens: int, repeats: int, seed: int) -> dict[str, Any]:
    """In this (fresh) process: load, warm up, then `repeats` pipelined greedy decodes after
    a `prompt_tokens` prefill; the median seconds per token."""
    runner = Ours(dtype) if name == OURS else MlxLm(dtype)
    runner.load(Path(path))
    vocab = runner.model.model.embed_tokens.weight.shape[0]
    tokens = prompt(prompt_tokens, vocab, seed)
    times, cpu_times = [], []
    for rep in range(repeats + 1):  # the first run warms up (traces, allocations)
        cache = runner.make_cache()
        logits = runner.prefill(tokens, cache)
        cpu_start = time.process_time()
        per_token = decode(runner, cache, logits, decode_tokens)
        if rep:
            times.append(per_token)
            # CPU seconds of all the process's threads: on a shared machine, less sensitive
            # to other jobs than the wall clock (it excludes the time spent waiting for a core).
            cpu_times.append((time.process_time() - cpu_start) / (decode_tokens + 1))
    return {"decode_s": statistics.median(times), "runs_s": times,
            "cpu_s": statistics.median(cpu_times), "dtypes": dtype_summary(runner.model)}


def _rows_sample(path: str, rows: list[int], stacked: bool, steps: int, seed: int
                 ) -> dict[str, Any]:
    """In this (fresh) process: the batched engine's decode call (`Model.step_rows`, then the
    argmax, evaluated: unpipelined, as the engine steps) for each batch size in `rows`, rows of
    different lengths; median ms per step. `stacked=False` makes each row attend on its own
    (`StackedRows.can_stack` refused), the per-row cost the stacked caches remove."""
    from .cache import StackedRows
    from .model import prefill

    if not stacked:
        StackedRows.can_stack = staticmethod(lambda caches: False)
    runner = Ours(None)
    runner.load(Path(path))
    model = runner.model
    vocab = model.model.embed_tokens.weight.shape[0]
    out: dict[str, Any] = {}
    for batch in rows:
        caches = []
        for r in range(batch):
            cache = model.make_cache()
            prefill(model, prompt(40 + 3 * r, vocab, seed + r), cache)
            caches.append(cache)
        tokens = mx.zeros((batch,), mx.int32)
        times, cpu_times = [], []
        for i in range(steps + 3):  # 3 warm-up steps (traces, the stack)
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens = mx.argmax(model.step_rows(tokens, caches), axis=-1)
            mx.eval(tokens)
            if i >= 3:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        out[str(batch)] = {"step_ms": 1000 * statistics.median(times),
                           "cpu_ms": 1000 * statistics.median(cpu_times)}
    return out


def _overhead_in_fresh_process(function: str = "_overhead_sample", **kwargs: Any
                               ) -> dict[str, Any]:
    """A sample function of this module in a new interpreter: nothing traced or cached
    carries over."""
    code = (f"import json, sys; from mlx_gptoss.benchmark import {function}; "
            f"print(json.dumps({function}(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"overhead sample failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_overhead(settings: OverheadSettings, log: Callable[[str], None] = print
                 ) -> dict[str, Any]:
    """Per-token decode time at tiny widths for each depth: ours (each dtype) and mlx-lm on
    the same weights, fresh processes in alternation, medians."""
    variants = [(OURS, d) for d in settings.dtypes] + ([(MLX_LM, None)] if settings.compare
                                                        else [])
    results: dict[str, Any] = {"machine": machine(), "mode": "overhead",
                               "settings": {**asdict(settings),
                                            "cache_dir": str(settings.cache_dir)},
                               "widths": OVERHEAD_WIDTHS, "depths": {}}
    for depth in settings.depths:
        source, converted = model_dirs(Settings(layers=depth, widths=OVERHEAD_WIDTHS,
                                                cache_dir=settings.cache_dir,
                                                seed=settings.seed))
        samples: dict[str, list[dict[str, Any]]] = {}
        for p in range(settings.processes):
            for name, dtype in (variants if p % 2 == 0 else variants[::-1]):
                label = variant_label(name, dtype)
                sample = _overhead_in_fresh_process(
                    name=name, path=str(converted if name == OURS else source), dtype=dtype,
                    prompt_tokens=settings.prompt_tokens, decode_tokens=settings.decode_tokens,
                    repeats=settings.repeats, seed=settings.seed)
                samples.setdefault(label, []).append(sample)
                log(f"  L{depth} {label:>24} process {p}: "
                    f"{1000 * sample['decode_s']:.2f} ms/token "
                    f"({1000 * sample['cpu_s']:.2f} ms CPU)")
        results["depths"][str(depth)] = {
            label: {"decode_ms": 1000 * statistics.median(s["decode_s"] for s in ss),
                    "process_ms": [1000 * s["decode_s"] for s in ss],
                    "cpu_ms": 1000 * statistics.median(s["cpu_s"] for s in ss),
                    "dtypes": ss[0]["dtypes"]}
            for label, ss in samples.items()}
    if settings.rows:
        results["rows"] = _rows_row(settings, log)
    return results


def _rows_row(settings: OverheadSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """The batched step at each of `settings.rows` batch sizes on the first depth, stacked
    and per-row, fresh processes alternating; medians over processes."""
    depth = settings.depths[0]
    _, converted = model_dirs(Settings(layers=depth, widths=OVERHEAD_WIDTHS,
                                       cache_dir=settings.cache_dir, seed=settings.seed))
    samples: dict[str, list[dict[str, Any]]] = {"stacked": [], "per-row": []}
    for p in range(settings.processes):
        for label in (("stacked", "per-row") if p % 2 == 0 else ("per-row", "stacked")):
            sample = _overhead_in_fresh_process(
                "_rows_sample", path=str(converted), rows=list(settings.rows),
                stacked=label == "stacked", steps=settings.row_steps, seed=settings.seed)
            samples[label].append(sample)
            log(f"  L{depth} rows {label:>8} process {p}: " + ", ".join(
                f"{b}: {v['step_ms']:.1f} ms" for b, v in sample.items()))
    return {"layers": depth, "steps": settings.row_steps, **{
        label: {str(b): {key: statistics.median(s[str(b)][key] for s in ss)
                         for key in ("step_ms", "cpu_ms")} for b in settings.rows}
        for label, ss in samples.items()}}


def variant_label(name: str, dtype: str | None) -> str:
    return name if name == MLX_LM else f"{name} [{dtype or 'default'}]"


def format_overhead_table(results: dict[str, Any]) -> str:
    """One row per depth: ms per token of each variant, and ours over mlx-lm's."""
    depths = results["depths"]
    labels = list(next(iter(depths.values())))
    ours = [label for label in labels if label != MLX_LM]
    head = ["layers", "clock", *(f"{label} ms/token" for label in labels)]
    if MLX_LM in labels:
        head += [f"{label} / mlx-lm" for label in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for depth, row in depths.items():
        for clock, key in (("wall", "decode_ms"), ("CPU", "cpu_ms")):
            cells = [depth, clock, *(f"{row[label][key]:.2f}" for label in labels)]
            if MLX_LM in labels:
                cells += [f"{row[label][key] / row[MLX_LM][key]:.2f}" for label in ours]
            lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    if "rows" in results:
        rows = results["rows"]
        lines += ["", f"| rows (batched step, {rows['layers']} layers) | "
                  + " | ".join(f"{b}" for b in rows["stacked"]) + " |",
                  "|---|" + "---|" * len(rows["stacked"])]
        for label in ("stacked", "per-row"):
            for clock, key in (("wall", "step_ms"), ("CPU", "cpu_ms")):
                lines.append(f"| {label} ms/step, {clock} | " + " | ".join(
                    f"{v[key]:.2f}" for v in rows[label].values()) + " |")
    lines.append("")
    lines.append(f"tiny widths (hidden {OVERHEAD_WIDTHS['hidden_size']}, vocab "
                 f"{OVERHEAD_WIDTHS['vocab_size']}), {s['prompt_tokens']}-token prompt, "
                 f"{s['decode_tokens']} pipelined greedy tokens, median of {s['repeats']} "
                 f"runs per process and of {s['processes']} fresh processes (CPU: the "
                 f"process's CPU seconds per token, all threads); "
                 f"device {results['machine']['device']}, mlx {results['machine']['mlx']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reporting

def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: each figure for both implementations and their ratio (ours / mlx-lm)."""
    impls = results["implementations"]
    ours = impls[OURS]
    other = impls.get(MLX_LM)
    names = [OURS] + ([MLX_LM] if other else [])
    head = ["metric", *names] + (["ratio"] if other else [])
    rows: list[list[str]] = []

    def row(label: str, get: Callable[[dict], float], fmt: str, higher_better: bool = True):
        values = [get(impls[n]) for n in names]
        cells = [label, *(format(v, fmt) for v in values)]
        if other:
            num, den = values if higher_better else values[::-1]
            cells.append(f"{num / den:.2f}x" if den > 0 else "-")
        rows.append(cells)

    gib = 1 << 30
    for size in ours["sizes"]:
        row(f"prefill {size} tok/s", lambda e, s=size: e["sizes"][s]["prefill_tok_s"], ".1f")
        row(f"decode after {size} tok/s", lambda e, s=size: e["sizes"][s]["decode_tok_s"],
            ".2f")
        row(f"decode ceiling after {size} (bandwidth/bytes) tok/s",
            lambda e, s=size: e["sizes"][s]["decode_ceiling_tok_s"], ".2f")
        row(f"decode fraction of ceiling after {size}",
            lambda e, s=size: e["sizes"][s]["decode_fraction_of_ceiling"], ".0%")
        row(f"peak memory at {size} GiB", lambda e, s=size: e["sizes"][s]["peak_memory_bytes"]
            / gib, ".2f", higher_better=False)
    row("load s", lambda e: e["load_s"], ".2f", higher_better=False)
    turn = ours["second_turn"]
    row(f"2nd turn TTFT, prompt cache ({turn['history_tokens']}+{turn['new_tokens']}) s",
        lambda e: e["second_turn"]["ttft_cached_s"], ".3f", higher_better=False)
    row("2nd turn TTFT, no prompt cache s", lambda e: e["second_turn"]["ttft_uncached_s"],
        ".3f", higher_better=False)
    if "decode_breakdown_s" in ours:
        for part in ours["decode_breakdown_s"]:
            if all(part in impls[n].get("decode_breakdown_s", {}) for n in names):
                row(f"decode ms: {part}", lambda e, p=part: 1000 * e["decode_breakdown_s"][p],
                    ".1f", higher_better=False)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    m = results["machine"]
    lines.append("")
    name = m.get("device_info", {}).get("device_name", m["processor"])
    lines.append(f"device: {m['device']} ({name}, {m['platform']}); mlx {m['mlx']}"
                 f", mlx-lm {m.get('mlx_lm', '-')}; memory bandwidth measured "
                 f"{results['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
                 f"{results['settings']['layers']} layers, hidden "
                 f"{results['settings']['widths']['hidden_size']}, vocab "
                 f"{results['settings']['widths']['vocab_size']}")
    lines.append("ratio: ours over mlx-lm for speeds, mlx-lm over ours for times and memory "
                 "(above 1 = ours better). dtypes: " + "; ".join(
                     f"{n}: {', '.join(impls[n]['dtypes'])}" for n in names))
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
