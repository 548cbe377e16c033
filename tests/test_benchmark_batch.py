"""benchmarks/batch.py on tiny models: its window arithmetic, both drivers, and the whole run.

Timings are never asserted; what is asserted is what the figures are computed from (which
tokens fall in the steady window, how many there are) and that the measured streams decode the
real sequences."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mlx_gptoss.benchmark import MLX_LM, OURS
from mlx_gptoss.generate import generate_tokens
from mlx_gptoss.sampling import SamplingParams, make_sampler
from mlx_gptoss.synthetic import TINY

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "batch.py"
WIDTHS = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_batch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


batch = _load_script()


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return batch.BatchSettings(streams=(1, 3), arrival_others=2, prompt_tokens=5,
                               decode_tokens=3, layers=2, dtype="float32",
                               widths=WIDTHS, cache_dir=tmp_path_factory.mktemp("bench"))


def test_window_figures_of_a_known_trace():
    # Stream 0 starts at t=0, stream 1 at t=1; both then decode every second; stream 0 ends
    # first, at t=4. The window (1, 4] holds 3 tokens of each; the gaps inside are all 1 s but
    # stream 1's, which has one slow 2 s gap.
    trace = batch.Trace(added=[0.0, 0.0],
                        times=[[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 5.0]],
                        tokens=[[1] * 5, [1] * 4])
    figures = batch.concurrency_figures(trace)
    assert (figures["window_s"], figures["window_tokens"]) == (3.0, 5)
    assert figures["aggregate_tok_s"] == pytest.approx(5 / 3)
    assert figures["tbt_samples"] == 5  # 0: 1-2, 2-3, 3-4; 1: 1-2, 2-4
    assert figures["tbt_p50_s"] == 1.0
    assert figures["tbt_p95_s"] == pytest.approx(1.0 + 0.8 * 1.0)
    assert figures["ttft_s"] == [0.0, 1.0]
    assert batch.percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_a_window_needs_overlap():
    trace = batch.Trace(added=[0.0, 0.0], times=[[0.0, 1.0], [2.0, 3.0]], tokens=[[1, 1]] * 2)
    with pytest.raises(ValueError, match="no steady window"):
        batch.concurrency_figures(trace)


def test_both_drivers_measure_real_decoding(settings):
    """Each configuration on each implementation; ours' streams are the single-sequence
    greedy tokens of their prompts (the benchmark times real work, not a shortcut)."""
    vocab = WIDTHS["vocab_size"]
    greedy = make_sampler(SamplingParams(temperature=0.0))
    for impl in (OURS, MLX_LM):
        model = batch.load(impl, settings)
        three = batch.measure(impl, model, "streams=3", settings, vocab)
        assert three["streams"] == 3 and len(three["tokens"]) == 3
        # Ours admits one prompt per step: the steady window is exactly decode_tokens steps
        # of 3 rows. mlx-lm prefills the three together, so its window is longer.
        if impl == OURS:
            assert three["window_tokens"] == 3 * settings.decode_tokens
            for prompt, tokens in zip(three["prompts"], three["tokens"]):
                assert tokens == list(generate_tokens(model, prompt, sampler=greedy,
                                                      max_tokens=len(tokens)))
        else:
            assert three["window_tokens"] >= 3 * settings.decode_tokens
        assert three["tbt_samples"] > 0 and 0 < three["tbt_p50_s"] <= three["tbt_p95_s"]
        arrival = batch.measure(impl, model, "arrival", settings, vocab)
        assert arrival["others"] == 2 and arrival["ttft_s"] > 0
        assert [len(t) > 0 for t in arrival["tokens"]] == [True] * 3


@pytest.mark.slow
def test_the_whole_run_in_worker_processes(settings, tmp_path):
    results = batch.run(settings, log=lambda _: None)
    assert set(results["implementations"]) == {OURS, MLX_LM}
    for figures in results["implementations"].values():
        assert set(figures) == {"streams=1", "streams=3", "arrival"}
        assert figures["streams=3"]["aggregate_tok_s"] > 0
        assert figures["arrival"]["ttft_s"] > 0
        assert figures["streams=1"]["peak_memory_bytes"] > 0
    table = batch.format_table(results)
    assert "3 streams: aggregate decode tok/s" in table and "TTFT of a request" in table
    out = tmp_path / "batch.json"
    batch.write_results(results, out)
    assert json.loads(out.read_text())["settings"]["streams"] == [1, 3]


def test_arrival_figures_of_a_known_trace():
    # Two streams decode every 2 s; the late one is added at t=5 and its first token comes
    # with the others' token at t=8: it waited 3 s, and the others' gap spanning that was 2 s.
    trace = batch.Trace(added=[0.0, 0.0, 5.0],
                        times=[[0.0, 2.0, 4.0, 6.0, 8.0], [0.0, 2.0, 4.0, 6.0, 9.0], [8.0]],
                        tokens=[[1] * 5, [1] * 5, [1]])
    figures = batch.arrival_figures(trace)
    assert (figures["others"], figures["ttft_s"]) == (2, 3.0)
    assert figures["others_max_gap_during_arrival_s"] == 3.0  # stream 1's 6 -> 9
