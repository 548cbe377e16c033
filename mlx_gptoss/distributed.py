"""gpt-oss over several processes or machines with `mx.distributed`: expert parallel, pipeline.

Started by `mlx.launch` (or with `MLX_RANK`/`MLX_HOSTFILE` set by hand), every rank runs the
same program on the same input; `load(path, parallel=...)` gives each rank its share:

- **expert parallel** (`"expert"`): every rank holds a share of every layer's experts (whole
  experts, so MXFP4 scale groups never split) and everything else replicated. Each rank routes
  every token, runs the chosen experts it owns (the others contribute zero) and one `all_sum`
  per layer adds the shares. Splits need not be even.
- **pipeline** (`"pipeline"`): rank r holds a contiguous run of layers (rank 0 the first ones),
  receives the activations from rank r-1 and sends its output to rank r+1 (neighbours only, so
  it runs over the ring backend). The last rank's hidden state reaches every rank through one
  `all_sum` to which the others add zeros, which is exact.

Every rank thus ends each forward pass with bitwise identical logits (an all_sum gives every
rank the same sum), and `load` gives every rank the same random seed, so the unchanged
generation loop samples the same token on every rank, seeded or not, greedy or not. Each rank
reads only its own tensors from the safetensors files (`safetensors_io.read_rows` for its
experts' rows, nothing at all of other stages' layers).

Rank 0 does the printing: `rank_zero_output` silences the others' stdout and stderr, and turns
a lost peer (MLX's RuntimeError) into one `DistributedError` line.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import ModelConfig, load_config
from .errors import DistributedError
from .model import MLP, Experts, Model

STRATEGIES = ("auto", "expert", "pipeline")
# Variables through which a launcher hands a process its rank (ring, JACCL, MPI, NCCL).
_LAUNCH_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE",
                     "PMI_RANK", "MLX_WORLD_SIZE")


# --------------------------------------------------------------------------- the group


def init_group() -> mx.distributed.Group:
    """The global group; strict when a launcher set this process up, so a broken hostfile or
    an unreachable peer is an error rather than a silent single-process run."""
    launched = any(v in os.environ for v in _LAUNCH_VARIABLES)
    try:
        return mx.distributed.init(strict=launched)
    except RuntimeError as e:
        raise DistributedError(f"cannot join the distributed group ({e})") from None


def zeros_after(x: mx.array, shape: Sequence[int] | None = None) -> mx.array:
    """Zeros (of `x`'s shape unless given) that the graph computes only after `x`.

    A rank's share of a broadcast must keep the dependency: plain zeros would let that rank
    run the collective before the ones `x` comes from, while the root runs them in the
    other order, and the ranks would wait on each other forever (observed).
    """
    zeros = mx.zeros(x.shape if shape is None else tuple(shape), x.dtype)
    return mx.depends(zeros, x)


def local_hostfile(ranks: int, path: str | os.PathLike) -> Path:
    """Write the ring hostfile `mlx.launch --backend ring -n RANKS` would (127.0.0.1, free
    ports) to `path`: set `MLX_HOSTFILE` to it and `MLX_RANK` to 0...ranks-1 in each process."""
    sockets = [socket.socket() for _ in range(ranks)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    path = Path(path)
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    return path


def broadcast(x: mx.array, group: mx.distributed.Group, root: int = 0) -> mx.array:
    """`x` as `root` has it, on every rank: the others add zeros, so the sum is exact."""
    mine = x if group.rank() == root else zeros_after(x)
    return mx.distributed.all_sum(mine, group=group)


def synchronize_seed(group: mx.distributed.Group) -> None:
    """Seed every rank's global generator with rank 0's random draw (unseeded sampling then
    draws the same tokens everywhere); the exchange doubles as the end-of-load barrier."""
    seed = mx.array(secrets.randbits(31), dtype=mx.int32)
    seed = broadcast(seed, group).item()
    mx.random.seed(seed)


# --------------------------------------------------------------------------- sharded modules


class LocalExperts(Experts):
    """The experts `first ... first + count - 1` of a layer; others' outputs are zero."""

    def __init__(self, cfg: ModelConfig, experts: range):
        super().__init__(replace(cfg, num_local_experts=len(experts)))
        self.first = experts.start
        self.count = len(experts)

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        local = (experts >= self.first) & (experts < self.first + self.count)
        # A pair routed elsewhere runs through local expert 0 and is then dropped: shapes stay
        # static (no data-dependent gather), at the price of one extra expert's weights read.
        y = super().__call__(x, mx.where(local, experts - self.first, 0))
        return mx.where(local[..., None], y, mx.zeros_like(y))


class ExpertParallelMLP(MLP):
    """The MLP with this rank's experts; one all_sum adds every rank's share of each token."""

    def __init__(self, cfg: ModelConfig, mlp: MLP, experts: range, group: mx.distributed.Group):
        super().__init__(cfg)
        self.router = mlp.router  # keeps a converter-quantized router as it is
        self.experts = LocalExperts(cfg, experts)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class PipelineStage(Model):
    """Layers `layers` of the model (local indices 0...), between the neighbouring ranks.

    Embedding, final norm and head are kept on every rank: each rank computes the logits from
    the broadcast last hidden state, so all ranks sample the same token with no further message.
    """

    def __init__(self, cfg: ModelConfig, layers: range, group: mx.distributed.Group):
        super().__init__(cfg)
        self.model.layers = self.model.layers[layers.start:layers.stop]
        self.stage_layers = layers
        self.group = group

    def run_layers(self, x: mx.array, cache: list | None, last_only: bool,
                   wrap_layer=None) -> mx.array:
        rank, size = self.group.rank(), self.group.size()
        is_last = rank == size - 1
        if rank > 0:
            # The receive depends on nothing in the graph: evaluating the input first keeps
            # it after the previous step's collectives, as on the other ranks.
            mx.eval(x)
            x = mx.distributed.recv_like(x, rank - 1, group=self.group)
        x = super().run_layers(x, cache, last_only and is_last, wrap_layer)
        if not is_last:
            # Evaluated now: a caller that evaluates only the caches (prefill) or the logits
            # would otherwise never run the send, and the next rank would wait forever.
            mx.eval(mx.distributed.send(x, rank + 1, group=self.group))
            x = zeros_after(x, (x.shape[0], 1 if last_only else x.shape[1], x.shape[2]))
        return mx.distributed.all_sum(x, group=self.group)

    def step_rows(self, tokens: mx.array, caches) -> mx.array:
        """The batched engine's step would skip the hand-offs between stages: refuse it."""
        raise DistributedError("the batched engine does not run pipeline stages yet: use "
                               "--parallel expert (or one request at a time)")


# --------------------------------------------------------------------------- the plan


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` items over `parts` ranks, the first ranks taking one more when it is uneven."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def split_by_memory(total: int, memory: Sequence[float], minimum: int = 1) -> list[int]:
    """`total` layers over ranks in proportion to their `memory` (any unit: only the ratios
    count), each rank at least `minimum` (given first to the ranks whose share falls short,
    the rest shared among the others); the largest remainders take the leftover layers, the
    lower rank first on a tie, so equal memories give `split_evenly`'s counts."""
    counts = [0] * len(memory)
    free = list(range(len(memory)))
    remaining = total
    minimum = min(minimum, total // len(memory))
    while True:
        weight = sum(memory[r] for r in free)
        shares = {r: remaining * memory[r] / weight for r in free}
        short = [r for r in free if shares[r] < minimum]
        if not short:
            break
        for r in short:
            counts[r] = minimum
            remaining -= minimum
            free.remove(r)
    for r in free:
        counts[r] = int(shares[r])
    leftover = remaining - sum(counts[r] for r in free)
    for r in sorted(free, key=lambda r: (counts[r] - shares[r], r))[:leftover]:
        counts[r] += 1
    return counts


def parse_memory(memory: str | Sequence[float] | None) -> list[float] | None:
    """`--pipeline-memory`: per-rank sizes, "64,32" (GB) or fractions "0.67,0.33"."""
    if memory is None or isinstance(memory, (list, tuple)):
        values = memory
    else:
        try:
            values = [float(v) for v in str(memory).split(",")]
        except ValueError:
            values = None
    if values is not None and not all(v > 0 and v != float("inf") for v in values):
        values = None
    if values is None and memory is not None:
        raise DistributedError(f"--pipeline-memory must be positive numbers per rank, e.g. "
                               f"64,32 (GB) or 0.67,0.33, got {memory!r}")
    return None if values is None else [float(v) for v in values]


def measured_memory(group: mx.distributed.Group) -> list[float]:
    """Every rank's memory in GB, gathered from all of them: the GPU's (`mx.device_info()`:
    a Mac's unified memory, a CUDA device's), or the machine's RAM where the backend reports
    none (CPU)."""
    info = mx.device_info()
    size = info.get("memory_size") or info.get("total_memory")  # Metal, CUDA
    if not size:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mine = mx.array([size / 2**30], dtype=mx.float32)
    return [float(v) for v in mx.distributed.all_gather(mine, group=group).tolist()]


def parse_parallel(parallel: str) -> tuple[str, list[int] | None]:
    """`"auto"`, `"expert"`, `"pipeline"`, or a strategy with counts per rank (`"pipeline:10,14"`)."""
    strategy, _, counts = str(parallel).partition(":")
    if strategy not in STRATEGIES or (counts and strategy == "auto"):
        raise DistributedError(f"--parallel must be auto, expert or pipeline (optionally "
                               f"followed by :counts per rank, e.g. pipeline:10,14), got {parallel!r}")
    if not counts:
        return strategy, None
    try:
        sizes = [int(c) for c in counts.split(",")]
    except ValueError:
        raise DistributedError(f"--parallel {parallel!r}: counts must be integers") from None
    return strategy, sizes


@dataclass(frozen=True)
class Shard:
    """One rank's share of the model: what `loading.load_model(shard=...)` builds and reads."""

    strategy: str  # "expert" or "pipeline"
    group: mx.distributed.Group
    part: range  # this rank's experts (of every layer) or layers
    total: int  # experts per layer, or layers

    @property
    def experts(self) -> range | None:
        """The expert rows to read from every expert tensor (None: all of them)."""
        return self.part if self.strategy == "expert" else None

    def build(self, cfg: ModelConfig) -> Model:
        from .loading import build_model

        if self.strategy == "pipeline":
            return build_model(cfg, PipelineStage(cfg, self.part, self.group))
        model = build_model(cfg)
        for layer in model.layers:
            layer.mlp = ExpertParallelMLP(cfg, layer.mlp, self.part, self.group)
        return model

    def local_name(self, name: str) -> str | None:
        """A checkpoint parameter's name in this rank's model, or None when it is not here."""
        if self.strategy != "pipeline" or not name.startswith("model.layers."):
            return name
        index, rest = name[len("model.layers."):].split(".", 1)
        if int(index) not in self.part:
            return None
        return f"model.layers.{int(index) - self.part.start}.{rest}"

    def is_replicated(self, parameter: str) -> bool:
        if self.strategy == "pipeline":
            return not parameter.startswith("model.layers.")
        return ".mlp.experts." not in parameter

    def load_line(self, model: Model) -> str:
        """`rank R/N: experts 0-10 of 32, <bytes> parameter bytes (<bytes> replicated)`."""
        params = tree_flatten(model.parameters())
        total = sum(v.nbytes for _, v in params)
        replicated = sum(v.nbytes for k, v in params if self.is_replicated(k))
        what = "experts" if self.strategy == "expert" else "layers"
        return (f"rank {self.group.rank()}/{self.group.size()}: {what} {self.part.start}-"
                f"{self.part.stop - 1} of {self.total}, {total} parameter bytes "
                f"({replicated} replicated)")


def plan(cfg: ModelConfig, group: mx.distributed.Group, parallel: str = "auto",
         memory: Sequence[float] | None = None) -> Shard:
    """This rank's `Shard`. `auto` is expert parallel (one all_sum per layer, the expert
    bytes divided among the ranks) unless there are more ranks than experts. `memory`: each
    rank's memory (given or measured), by which pipeline layers are split when no counts are
    given (None: evenly); every stage keeps both attention kinds."""
    strategy, counts = parse_parallel(parallel)
    size = group.size()
    experts, layers = cfg.num_local_experts, cfg.num_hidden_layers
    if strategy == "auto":
        strategy = "expert" if experts >= size else "pipeline"
    total = experts if strategy == "expert" else layers
    what = "experts per layer" if strategy == "expert" else "layers"
    if counts is None:
        if size > total:
            raise DistributedError(f"{strategy} parallel over {size} ranks needs at least "
                                   f"{size} {what}; the model has {total}")
        if strategy == "pipeline" and memory is not None:
            if len(memory) != size:
                raise DistributedError(f"--pipeline-memory: need one value per rank ({size}), "
                                       f"got {len(memory)}")
            counts = split_by_memory(total, memory, minimum=len(set(cfg.sliding_layers)))
        else:
            counts = split_evenly(total, size)
    if len(counts) != size or sum(counts) != total or min(counts) < 1:
        raise DistributedError(f"--parallel {parallel}: need {size} counts of at least 1 "
                               f"summing to the model's {total} {what}, got {counts}")
    parts = [range(sum(counts[:r]), sum(counts[:r + 1])) for r in range(size)]
    if strategy == "pipeline":
        _check_stages(cfg, parts)
    return Shard(strategy, group, parts[group.rank()], total)


def _check_stages(cfg: ModelConfig, parts: list[range]) -> None:
    """Every stage must hold both attention kinds the model has.

    The prompt cache rewinds a stage's caches by trimming only when all of them can (a
    sliding cache cannot go back past its slack, a full one always can), else from a
    snapshot: a stage of full layers alone would rewind elsewhere than a stage with sliding
    ones, prefill other tokens, and the ranks would wait on each other forever.
    """
    kinds = set(cfg.sliding_layers)
    for rank, part in enumerate(parts):
        if set(cfg.sliding_layers[part.start:part.stop]) != kinds:
            raise DistributedError(
                f"pipeline stage {rank} (layers {part.start}-{part.stop - 1}) lacks a sliding or "
                "a full attention layer; every stage needs both (here at least 2 consecutive "
                "layers) so that all ranks' prompt caches rewind alike: use fewer ranks, other "
                "counts, or --parallel expert")


# --------------------------------------------------------------------------- loading


def load(model: str | os.PathLike, dtype: str | mx.Dtype | None = None, *,
         group: mx.distributed.Group | None = None, parallel: str = "auto",
         pipeline_memory: str | Sequence[float] | None = None,
         adapter: str | os.PathLike | None = None, tools: Sequence[str] = (),
         log: Callable[[str], None] | None = None) -> tuple[Model, Any]:
    """`(model, tokenizer)` with this rank's share of the model (the whole one on one rank).

    `model` is a directory or hub repo id (see `hub.load`); `group` defaults to the global
    group (`mx.distributed.init()`); `parallel` is `auto`, `expert`, `pipeline`, optionally with
    counts per rank (`pipeline:10,14`). Without counts, pipeline layers follow each rank's
    memory: `pipeline_memory` ("64,32" GB, fractions, or a list), else each rank's measured
    memory (`measured_memory`). Each rank logs its load line (stderr by default).
    `adapter`: a LoRA adapter directory (see `hub.load`), on one process only for now; so are
    the built-in `tools` the caller names (e.g. `("--python",)`): they are refused on more ranks.
    """
    from .hub import load as hub_load, resolve_model

    group = group if group is not None else init_group()
    strategy, counts = parse_parallel(parallel)  # a bad value is an error on one process too
    given_memory = parse_memory(pipeline_memory)
    if given_memory is not None and (strategy != "pipeline" or counts is not None):
        raise DistributedError("--pipeline-memory applies to --parallel pipeline without "
                               "counts (counts per rank already fix the split)")
    if group.size() > 1 and tools:
        # Each rank would run the tool itself and could read a different result: the ranks'
        # prompts, and so their collectives, would part.
        raise DistributedError(f"{' and '.join(tools)} run on one process only for now "
                               "(under mlx.launch every rank would run them)")
    if group.size() == 1:
        return hub_load(model, dtype, adapter=adapter)
    if adapter is not None:
        raise DistributedError("--adapter runs on one process for now (an adapter is not "
                               "sharded across ranks yet)")
    # Rank 0 fetches or converts a hub id first: ranks sharing a host then find it cached
    # instead of converting into the same directory at once.
    path = resolve_model(model) if group.rank() == 0 else None
    broadcast(mx.array(0, dtype=mx.int32), group).item()
    path = path or resolve_model(model, progress=False)
    memory = given_memory if given_memory is not None else measured_memory(group)
    shard = plan(load_config(Path(path)), group, parallel, memory)
    net, tokenizer = hub_load(path, dtype, shard=shard)
    synchronize_seed(group)  # also waits for every rank to finish loading
    net.shard = shard
    (log or _log_line)(shard.load_line(net))
    return net, tokenizer


# --------------------------------------------------------------------------- output, errors


def peer_lost(error: BaseException) -> bool:
    """Whether `error` is MLX's report of a rank that went away (its collectives fail)."""
    return isinstance(error, RuntimeError) and str(error).startswith(("[ring]", "[jaccl]",
                                                                      "[mpi]", "[nccl]"))


def lost_peer_error(group: mx.distributed.Group, error: BaseException) -> DistributedError:
    """The one line a rank reports when `error` (see `peer_lost`) ended its collectives."""
    return DistributedError(f"rank {group.rank()}/{group.size()}: lost the connection to "
                            f"another rank (did it stop or crash?): {error}")


# Where each rank's own lines (its load line) go while `rank_zero_output` silences it.
_rank_stderr: list[Any] = []


def _log_line(line: str) -> None:
    print(line, file=_rank_stderr[-1] if _rank_stderr else sys.stderr, flush=True)


@contextlib.contextmanager
def rank_zero_output(group: mx.distributed.Group | None = None) -> Iterator[None]:
    """Inside: only rank 0 prints (the others' stdout and stderr go nowhere, except their
    load line); a lost peer is one `DistributedError` line. Errors are raised after the
    streams are restored, so each rank reports its own."""
    group = group if group is not None else init_group()
    rank = group.rank()
    saved = sys.stdout, sys.stderr
    _rank_stderr.append(sys.stderr)
    if rank != 0:
        sys.stdout = sys.stderr = io.TextIOWrapper(open(os.devnull, "wb"), write_through=True)
    try:
        yield
    except RuntimeError as e:
        if not peer_lost(e):
            raise
        raise lost_peer_error(group, e) from None
    finally:
        _rank_stderr.pop()
        if rank != 0:
            sys.stdout.close()
            sys.stdout, sys.stderr = saved


def rank_zero_command(command: Callable) -> Callable:
    """A CLI command run inside `rank_zero_output` (the signature is kept for typer)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        with rank_zero_output():
            return command(*args, **kwargs)

    return run


def broadcast_json(value: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-serialisable `value` on every rank (the others pass anything, e.g. None).

    The hook for a server: rank 0 receives a request and broadcasts it (prompt ids, sampling,
    limits); every rank then makes the same generation call. Two all_sums: size, then bytes.
    """
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    size = broadcast(mx.array(len(data), dtype=mx.int32), group).item()
    mine = np.frombuffer(data, np.uint8) if group.rank() == 0 else np.zeros(size, np.uint8)
    return json.loads(bytes(np.array(broadcast(mx.array(mine), group))).decode())


def synchronized_sampler(sampler: Callable[[mx.array], mx.array],
                         group: mx.distributed.Group) -> Callable[[mx.array], mx.array]:
    """A sampler whose token is rank 0's on every rank (one tiny all_sum per token).

    Not needed when the ranks are identical machines (their logits are bitwise equal); across
    different chips, whose kernels may round differently, it keeps the ranks in step."""
    if group.size() == 1:
        return sampler

    def sample(logits: mx.array) -> mx.array:
        return broadcast(sampler(logits), group)

    return sample

