"""Distributed inference (issue 16): ranks are real processes joined by MLX's ring backend on
127.0.0.1, started with MLX_RANK/MLX_HOSTFILE (and once through `mlx.launch`), and compared with
the single-process model on the same checkpoint.

Timeouts on the rank processes are safety nets only: every wait is on a process exit or on a
line it writes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mlx_gptoss.distributed import Shard, local_hostfile, parse_parallel, plan, split_evenly
from mlx_gptoss.errors import DistributedError

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [3, 17, 42, 99, 7, 250, 11, 64, 128, 5, 19, 201, 33, 77, 90, 91, 1, 2, 200, 150]
RANK_SCRIPT = Path(__file__).resolve().parent / "distributed_rank.py"
CLI = "from mlx_gptoss.cli import main; main()"
SAFETY_TIMEOUT = 240  # the first compiled run of a fresh process builds kernels

# 7 experts (top 4): uneven over 2 and 3 ranks; 6 layers: 2 per stage over 3 ranks (a stage
# needs both attention kinds), given as 4 + 2 over 2 ranks.
DIST_CONFIG = dict(num_local_experts=7, num_experts_per_tok=4, num_hidden_layers=6,
                   intermediate_size=256)


def make_chat4(checkpoint_factory) -> Path:
    """`chat_checkpoint` with 4 layers: two pipeline stages of one sliding + one full layer."""
    from mlx_gptoss.harmony import copy_vocabulary

    path = checkpoint_factory("distributed_chat4", seed=5, vocab_size=201088, num_hidden_layers=4)
    copy_vocabulary(path)
    return path


@pytest.fixture(scope="module")
def chat4_checkpoint(checkpoint_factory) -> Path:
    return make_chat4(checkpoint_factory)


@pytest.fixture(scope="module")
def dist_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("distributed", seed=3, **DIST_CONFIG)


def rank_env(rank: int, hostfile: Path) -> dict[str, str]:
    return {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
            "PYTHONPATH": str(ROOT), "MLX_GPTOSS_OFFLINE": "1"}


def finish(procs: list[subprocess.Popen], timeout: float = SAFETY_TIMEOUT) -> list[tuple]:
    """(exit status, stdout, stderr) of every rank; kills them all if one outlives `timeout`."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run_worker(n: int, parallel: str, model: Path, tmp_path: Path,
               memory: str | None = None) -> list[dict]:
    out = tmp_path / f"{parallel}-{n}"
    hostfile = local_hostfile(n, tmp_path / f"hosts{n}.json")
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(model), parallel,
                               f"{out}-{r}.json", *([memory] if memory else [])],
                              env=rank_env(r, hostfile),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(n)]
    for r, (code, _, err) in enumerate(finish(procs)):
        assert code == 0, f"rank {r} exited with {code}: {err[-2000:]}"
    return [dict(json.loads(Path(f"{out}-{r}.json").read_text()),
                 logits=np.load(f"{out}-{r}.json.logits.npy")) for r in range(n)]


@pytest.fixture(scope="module")
def single(dist_checkpoint, tmp_path_factory) -> dict:
    """The same worker on one process (no group, plain `load_model`)."""
    out = tmp_path_factory.mktemp("single") / "single.json"
    done = subprocess.run([sys.executable, str(RANK_SCRIPT), str(dist_checkpoint), "single",
                           str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=SAFETY_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(out.read_text()), logits=np.load(f"{out}.logits.npy"))


LOAD_LINE = re.compile(r"^rank (\d+)/(\d+): (experts|layers) (\d+)-(\d+) of (\d+), (\d+) "
                       r"parameter bytes \((\d+) replicated\)$")


@pytest.mark.parametrize("parallel,n,memory", [
    ("expert", 2, None), ("pipeline", 3, None),
    pytest.param("expert", 3, None, marks=pytest.mark.slow),
    pytest.param("pipeline:4,2", 2, None, marks=pytest.mark.slow),
    # Layers by the ranks' memory as given (GB): 32 and 64 -> 2 and 4 of the 6.
    pytest.param("pipeline", 2, "32,64", marks=pytest.mark.slow)])
def test_ranks_match_one_process(parallel, n, memory, dist_checkpoint, single, tmp_path):
    ranks = run_worker(n, parallel, dist_checkpoint, tmp_path, memory)
    strategy, counts = parse_parallel(parallel)
    counts = counts or ([2, 4] if memory else None)
    assert [r["rank"] for r in ranks] == list(range(n))
    # Logits: float32, within 1e-4 of one process on rank 0, bitwise equal on every rank.
    assert np.abs(ranks[0]["logits"] - single["logits"]).max() <= 1e-4
    assert np.abs(single["logits"]).max() > 1.0  # a real signal, not all zeros
    for r in ranks[1:]:
        np.testing.assert_array_equal(r["logits"], ranks[0]["logits"])
    # Tokens through the prompt cache (the second call reuses the first's prefix).
    assert single["greedy"]["cached"] > 0
    for r in ranks:
        assert r["greedy"] == single["greedy"]
        assert r["seeded"] == single["seeded"]  # temperature 1, seed 1234
        assert r["unseeded"]["tokens"] == ranks[0]["unseeded"]["tokens"]  # seed from rank 0
        # The hooks a server or a mixed cluster uses: rank 0's request and token everywhere.
        assert r["request"] == single["request"] == {"prompt": PROMPT, "sampling": {
            "temperature": 0.7}, "text": "héllo"}
        assert r["synced"] == single["seeded"]["tokens"][0]
        if strategy == "expert":  # the batched engine's rows: as one process
            assert r["batch"] == single["batch"]
        else:
            assert r["batch"].startswith("the batched engine does not run pipeline stages")
    assert single["batch"][0] == single["greedy"]["tokens"][0]
    # Each rank's line, its share, and what it actually holds in memory.
    total_experts, total_layers = DIST_CONFIG["num_local_experts"], DIST_CONFIG["num_hidden_layers"]
    expected_counts = counts or split_evenly(
        total_experts if strategy == "expert" else total_layers, n)
    for r, info in enumerate(ranks):
        (line,) = info["load_line"]
        m = LOAD_LINE.match(line)
        assert m, line
        rank, size, what, first, last, total, nbytes, replicated = m.groups()
        assert (int(rank), int(size)) == (r, n)
        assert what == ("experts" if strategy == "expert" else "layers")
        assert int(first) == sum(expected_counts[:r])
        assert int(last) - int(first) + 1 == expected_counts[r]
        assert int(total) == (total_experts if strategy == "expert" else total_layers)
        assert int(nbytes) == info["parameter_bytes"]
        assert 0 < int(replicated) < int(nbytes)
        share = expected_counts[r] / (total_experts if strategy == "expert" else total_layers)
        assert info["expert_bytes"] == pytest.approx(single["expert_bytes"] * share, rel=1e-9)
        if counts is None:  # the default split: about 1/N each
            assert abs(info["expert_bytes"] / single["expert_bytes"] - 1 / n) <= 1 / n / 2
        # Nothing else stays resident: a slice of a whole loaded tensor would keep it all.
        assert info["resident_bytes"] <= info["parameter_bytes"] * 1.02 + 16384
    assert sum(r["expert_bytes"] for r in ranks) == single["expert_bytes"]


class FakeGroup:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def config(**overrides):
    from mlx_gptoss.config import ModelConfig
    from mlx_gptoss.synthetic import TINY, hf_config

    return ModelConfig.from_dict(hf_config(**{**TINY, **DIST_CONFIG, **overrides}))


def test_plan_splits_and_refuses_what_it_cannot_use():
    cfg = config()
    assert [plan(cfg, FakeGroup(r, 3), "expert").part for r in range(3)] == \
        [range(0, 3), range(3, 5), range(5, 7)]
    assert [plan(cfg, FakeGroup(r, 2), "pipeline:4,2").part for r in range(2)] == \
        [range(0, 4), range(4, 6)]
    with pytest.raises(DistributedError, match="pipeline stage 0 .layers 0-0. lacks a sliding "
                                               "or a full attention layer"):
        plan(cfg, FakeGroup(1, 2), "pipeline:1,5")  # every rank refuses, not only stage 0
    with pytest.raises(DistributedError, match="pipeline stage 2 .layers 4-4."):
        plan(cfg, FakeGroup(0, 4), "pipeline")  # 6 layers over 4 ranks: 2, 2, 1, 1
    assert plan(cfg, FakeGroup(0, 2), "auto").strategy == "expert"
    with pytest.raises(DistributedError, match="pipeline parallel over 7 ranks needs at least "
                                               "7 layers; the model has 6"):
        plan(cfg, FakeGroup(0, 7), "pipeline")
    with pytest.raises(DistributedError, match="expert parallel over 8 ranks"):
        plan(cfg, FakeGroup(0, 8), "expert")
    with pytest.raises(DistributedError, match="pipeline parallel over 8 ranks"):
        plan(cfg, FakeGroup(0, 8), "auto")  # more ranks than experts: pipeline, still too many
    with pytest.raises(DistributedError, match="need 2 counts of at least 1 summing to the "
                                               "model's 6 layers"):
        plan(cfg, FakeGroup(0, 2), "pipeline:6,0")
    for bad in ("tensor", "auto:1,2", "expert:a,b"):
        with pytest.raises(DistributedError):
            parse_parallel(bad)


def test_pipeline_layers_follow_memory():
    """Layers in proportion to each rank's memory, every stage keeping both attention kinds."""
    from mlx_gptoss.distributed import measured_memory, parse_memory, split_by_memory

    assert split_by_memory(36, [64, 32], minimum=2) == [24, 12]  # 120b on a 64 + a 32 GB Mac
    assert split_by_memory(36, [128, 64, 64], minimum=2) == [18, 9, 9]
    assert split_by_memory(24, [0.67, 0.33]) == [16, 8]  # fractions: only the ratios count
    assert split_by_memory(7, [10, 10, 10]) == split_evenly(7, 3) == [3, 2, 2]
    assert split_by_memory(10, [3, 1, 1]) == [6, 2, 2]  # 6, 2, 2 exactly
    assert split_by_memory(11, [5, 3, 2]) == [6, 3, 2]  # remainders .5, .3, .2: rank 0 first
    assert split_by_memory(6, [100, 1], minimum=2) == [4, 2]  # the small rank still gets 2
    assert split_by_memory(8, [100, 1, 1], minimum=2) == [4, 2, 2]
    cfg = config()  # 6 layers, sliding and full alternating
    assert [plan(cfg, FakeGroup(r, 2), "pipeline", [32, 64]).part for r in range(2)] == \
        [range(0, 2), range(2, 6)]
    assert [plan(cfg, FakeGroup(r, 2), "pipeline", [1000, 1]).part for r in range(2)] == \
        [range(0, 4), range(4, 6)]
    assert plan(cfg, FakeGroup(1, 2), "expert", [1000, 1]).part == range(4, 7)  # experts: even
    with pytest.raises(DistributedError, match=r"need one value per rank \(2\), got 3"):
        plan(cfg, FakeGroup(0, 2), "pipeline", [1, 2, 3])
    assert parse_memory("64,32") == [64.0, 32.0] and parse_memory(None) is None
    for bad in ("64,-1", "a,b", "0,1", "", "inf,1"):
        with pytest.raises(DistributedError, match="--pipeline-memory must be positive"):
            parse_memory(bad)
    for parallel in ("expert", "auto", "pipeline:4,2"):
        with pytest.raises(DistributedError, match="--pipeline-memory applies to --parallel "
                                                   "pipeline without counts"):
            from mlx_gptoss import distributed

            distributed.load("never-read", parallel=parallel, pipeline_memory="1,2")
    import mlx.core as mx

    (mine,) = measured_memory(mx.distributed.init())  # one process: its own, in GB
    assert 0.1 < mine < 2**20


def test_pipeline_names_are_local():
    shard = Shard("pipeline", FakeGroup(1, 2), range(3, 5), 5)  # layers 3 and 4 of 5
    assert shard.local_name("model.layers.3.mlp.router.weight") == "model.layers.0.mlp.router.weight"
    assert shard.local_name("model.layers.2.mlp.router.weight") is None
    assert shard.local_name("lm_head.weight") == "lm_head.weight"
    assert shard.experts is None


def test_one_process_needs_no_group(dist_checkpoint):
    """Without a launcher, `load` is the plain model: same parameters, no shard."""
    from mlx_gptoss import distributed
    from mlx_gptoss.loading import parameter_bytes

    model, _ = distributed.load(dist_checkpoint, "float32", parallel="pipeline")
    assert not hasattr(model, "shard")
    assert len(model.layers) == DIST_CONFIG["num_hidden_layers"]
    assert parameter_bytes(model) > 0


def cli_args(model: Path, *extra: str) -> list[str]:
    return ["-c", CLI, "generate", "-m", str(model), "-p", "hello", "--temperature", "0",
            "--json", *extra]


def answer_events(stdout: str) -> list[dict]:
    """The JSON events without the timing statistics."""
    events = [json.loads(line) for line in stdout.splitlines()]
    for e in events:
        e.pop("stats", None)
    return events


CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_GPTOSS_OFFLINE": "1"}


def one_process(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], input=stdin, env=CLI_ENV,
                          capture_output=True, text=True, timeout=SAFETY_TIMEOUT)


def mlx_launch(n: int, argv: list[str], tmp_path: Path, stdin: str = ""
               ) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n N -- python ARGV` (ports from a free one on)."""
    port = json.loads(local_hostfile(1, tmp_path / "port.json").read_text())[0][0].split(":")[1]
    launcher = Path(sys.executable).with_name("mlx.launch")
    return subprocess.run([str(launcher), "--backend", "ring", "-n", str(n), "--starting-port",
                           port, "--", sys.executable, *argv], input=stdin, env=CLI_ENV,
                          capture_output=True, text=True, timeout=SAFETY_TIMEOUT)


@pytest.mark.slow
def test_cli_under_mlx_launch_prints_once(chat_checkpoint, tmp_path):
    """`mlx.launch -n 2 -- mlx-gptoss generate ...`: the one-process answer, printed once."""
    one = one_process(cli_args(chat_checkpoint, "--max-tokens", "12"))
    assert one.returncode == 0, one.stderr
    two = mlx_launch(2, cli_args(chat_checkpoint, "--max-tokens", "12", "--parallel", "expert"),
                     tmp_path)
    assert two.returncode == 0, two.stderr
    assert answer_events(two.stdout) == answer_events(one.stdout)
    lines = [line for line in two.stderr.splitlines() if LOAD_LINE.match(line)]
    assert sorted(line.split(":")[0] for line in lines) == ["rank 0/2", "rank 1/2"]


@pytest.mark.parametrize("parallel", ["expert", pytest.param("pipeline", marks=pytest.mark.slow)])
def test_a_dead_rank_stops_the_others(parallel, chat4_checkpoint, tmp_path):
    """Kill rank 1 mid-generation: rank 0 exits 2 with one clear line, well within 60 s."""
    hostfile = local_hostfile(2, tmp_path / "hosts.json")
    argv = cli_args(chat4_checkpoint, "--max-tokens", "100000", "--parallel", parallel)
    procs = [subprocess.Popen([sys.executable, *argv], env=rank_env(r, hostfile),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    watchdog = threading.Timer(SAFETY_TIMEOUT, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        # Rank 1 prints its load line once every rank has loaded (the seed exchange): from
        # then on rank 0 is generating, and waits on rank 1 at every layer.
        for line in procs[1].stderr:
            if LOAD_LINE.match(line.strip()):
                break
        else:
            pytest.fail(f"rank 1 ended before loading (status {procs[1].wait()})")
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        _, err = procs[0].communicate(timeout=60)
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 2, err[-2000:]
    assert "error: rank 0/2: lost the connection to another rank" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("layout", ["hf", "original", "dense", "mlx"])
def test_a_rank_reads_its_experts_rows_in_every_layout(layout, checkpoint_factory,
                                                       layout_factory, tmp_path):
    """`canonical_tensors(experts=...)` gives exactly those rows of the whole expert tensors."""
    import mlx.core as mx

    from mlx_gptoss.config import load_config
    from mlx_gptoss.formats import canonical_tensors

    overrides = dict(num_local_experts=5, num_hidden_layers=2)
    if layout == "hf":
        path = checkpoint_factory("rows", seed=2, **overrides)
    elif layout == "mlx":
        from mlx_gptoss.converter import convert

        path = tmp_path / "converted"
        convert(checkpoint_factory("rows", seed=2, **overrides), path, progress=False)
    else:
        path = layout_factory(layout, "rows", seed=2, **overrides)
    cfg, raw = load_config(path), json.loads((path / "config.json").read_text())
    whole = dict(canonical_tensors(path, cfg, raw)[1])
    share = dict(canonical_tensors(path, cfg, raw, experts=range(1, 3))[1])
    assert share.keys() == whole.keys()
    experts = [name for name in whole if ".mlp.experts." in name]
    assert len(experts) == 6 * cfg.num_hidden_layers
    for name, value in whole.items():
        expected = value[1:3] if name in experts else value
        assert share[name].shape == expected.shape, name
        assert mx.array_equal(share[name], expected).item(), name


@pytest.mark.slow
def test_cli_rejects_an_unknown_strategy(chat_checkpoint):
    done = one_process(cli_args(chat_checkpoint, "--parallel", "tensor"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [(
        "error: --parallel must be auto, expert or pipeline (optionally followed by :counts "
        "per rank, e.g. pipeline:10,14), got 'tensor'")]


@pytest.mark.slow
def test_chat_under_mlx_launch(chat4_checkpoint, tmp_path):
    """stdin goes to every rank; the pipeline's replies are the one-process replies, once."""
    argv = ["-c", CLI, "chat", "-m", str(chat4_checkpoint), "--temperature", "0",
            "--max-tokens", "8", "--hide-reasoning"]
    turns = "hello\nand again\n/quit\n"  # mlx.launch does not pass on the end of stdin
    one = one_process(argv, turns)
    assert one.returncode == 0, one.stderr
    two = mlx_launch(2, [*argv, "--parallel", "pipeline"], tmp_path, turns)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout
    assert one.stdout.strip()


def test_built_in_tools_and_adapters_are_refused_on_several_ranks():
    """Every rank would run the tool itself (and might read another result): refused, before
    anything loads."""
    from mlx_gptoss import distributed
    from mlx_gptoss.errors import DistributedError

    class TwoRanks:
        def size(self) -> int:
            return 2

        def rank(self) -> int:
            return 0

    with pytest.raises(DistributedError, match="--python and --browser run on one process"):
        distributed.load("never-read", group=TwoRanks(), tools=["--python", "--browser"])
    with pytest.raises(DistributedError, match="--adapter runs on one process"):
        distributed.load("never-read", group=TwoRanks(), adapter="also-never-read")
