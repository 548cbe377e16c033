"""The benchmark harness on a tiny config: structure of its results, never its timings."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_gptoss.benchmark import MLX_LM, OURS, Settings, decode_bytes, format_table, run
from mlx_gptoss.cli import main
from mlx_gptoss.errors import GptOssError
from mlx_gptoss.formats import CONVERTED_MARKER
from mlx_gptoss.loading import load_model
from mlx_gptoss.synthetic import TINY

WIDTHS = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    settings = Settings(layers=2, prompt_sizes=(5, 12), decode_tokens=2, repeats=2,
                        second_turn_tokens=3, widths=WIDTHS,
                        cache_dir=tmp_path_factory.mktemp("bench"))
    return run(settings, log=lambda _: None)


@pytest.mark.slow
def test_results_cover_both_implementations_and_every_size(results):
    impls = results["implementations"]
    assert set(impls) == {OURS, MLX_LM}
    for entry in impls.values():
        assert set(entry["sizes"]) == {"5", "12"}
        for figures in entry["sizes"].values():
            for key in ("prefill_tok_s", "decode_tok_s", "decode_ceiling_tok_s",
                        "decode_fraction_of_ceiling", "peak_memory_bytes"):
                assert figures[key] > 0, key
        assert entry["load_s"] > 0
        turn = entry["second_turn"]
        assert (turn["history_tokens"], turn["new_tokens"]) == (12, 3)
        assert turn["ttft_cached_s"] > 0 and turn["ttft_uncached_s"] > 0
        parts = entry["decode_breakdown_s"]
        assert set(parts) == {"attention", "router", "experts", "norms", "lm_head",
                              "embedding", "overhead", "step"}
        # The experts stay packed MXFP4 in both: uint32 codes and uint8 scales.
        assert {"uint32", "uint8"} <= set(entry["dtypes"])
    assert results["bandwidth_bytes_per_s"] > 0
    # mlx-lm reads the hub layout; this project its own converted directory of the same weights.
    checkpoints = {name: Path(p) for name, p in results["checkpoints"].items()}
    assert checkpoints[OURS] == checkpoints[MLX_LM].with_name(checkpoints[MLX_LM].name + "-mlx")
    assert CONVERTED_MARKER in json.loads((checkpoints[OURS] / "config.json").read_text())
    assert CONVERTED_MARKER not in json.loads((checkpoints[MLX_LM] / "config.json").read_text())
    json.dumps(results)  # plain data throughout


@pytest.mark.slow
def test_same_weights_give_same_byte_count(results):
    """Both load one checkpoint: bytes per decoded token agree when dtypes agree."""
    impls = results["implementations"]
    ours, theirs = impls[OURS], impls[MLX_LM]
    if ours["dtypes"] == theirs["dtypes"]:
        assert ours["sizes"]["12"]["decode_bytes_per_token"] == \
            theirs["sizes"]["12"]["decode_bytes_per_token"]


def test_table_names_every_metric_with_a_ratio(results):
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0] == f"| metric | {OURS} | {MLX_LM} | ratio |"
    for label in ("prefill 12 tok/s", "decode after 5 tok/s",
                  "decode fraction of ceiling after 12", "peak memory at 12", "load s",
                  "2nd turn TTFT, prompt cache (12+3)", "decode ms: lm_head",
                  "decode ms: overhead"):
        assert any(line.startswith(f"| {label}") for line in lines), label
    rows = [line.rstrip() for line in lines[2:] if line.startswith("| ")]
    assert all(row.endswith(("x |", "- |")) for row in rows)


def test_decode_bytes_counts_chosen_experts_and_context(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("tiny"), "float32")
    cfg = model.config
    short, long = decode_bytes(model, 4), decode_bytes(model, 40)
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    full = sum(not s for s in cfg.sliding_layers)
    sliding = sum(cfg.sliding_layers)
    # Full layers read every cached position; sliding ones at most a window of them.
    assert long - short == kv_row * (36 * full + (cfg.sliding_window - 4) * sliding)
    experts = model.layers[0].mlp.experts
    one_layer = sum(v.nbytes for v in (experts.gate_up.weight, experts.gate_up.scales,
                                       experts.gate_up.bias, experts.down.weight,
                                       experts.down.scales, experts.down.bias))
    assert one_layer * cfg.num_experts_per_tok % cfg.num_local_experts == 0
    assert mx.array(short).item() > one_layer * cfg.num_experts_per_tok // cfg.num_local_experts


def test_cli_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--sizes", "12,x"])
    assert exit_.value.code == 2
    assert "--sizes" in capsys.readouterr().err


def test_cli_rejects_an_unknown_dtype_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--dtype", "float8", "--cache-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "float8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_settings_error_is_a_gptoss_error():
    from mlx_gptoss.cli.bench import _sizes

    with pytest.raises(GptOssError):
        _sizes("0")
    assert _sizes("1,2") == (1, 2)


@pytest.mark.slow
def test_ours_alone_has_no_ratio_column(tmp_path):
    settings = Settings(layers=2, prompt_sizes=(6,), decode_tokens=1, repeats=1,
                        second_turn_tokens=2, widths=WIDTHS, compare=False, breakdown=False,
                        cache_dir=tmp_path)
    results = run(settings, log=lambda _: None)
    assert set(results["implementations"]) == {OURS}
    assert "decode_breakdown_s" not in results["implementations"][OURS]
    lines = format_table(results).splitlines()
    assert lines[0] == f"| metric | {OURS} |"
    assert all(line.count("|") == 3 for line in lines if line.startswith("| "))


def test_checkpoint_cache_name_tells_head_layouts_apart(tmp_path):
    """Two width sets differing only in heads and window get their own checkpoints."""
    from mlx_gptoss.benchmark import synthetic_checkpoint

    other = {**WIDTHS, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
             "sliding_window": 4}
    paths = [synthetic_checkpoint(Settings(layers=1, widths=w, cache_dir=tmp_path))
             for w in (WIDTHS, other)]
    assert paths[0] != paths[1]
    configs = [json.loads((p / "config.json").read_text()) for p in paths]
    assert [c["head_dim"] for c in configs] == [16, 32]
    assert synthetic_checkpoint(Settings(layers=1, widths=other, cache_dir=tmp_path)) == paths[1]


@pytest.mark.slow
def test_overhead_mode_measures_every_variant_in_fresh_processes(tmp_path):
    from mlx_gptoss.benchmark import OverheadSettings, format_overhead_table, run_overhead

    settings = OverheadSettings(depths=(2,), prompt_tokens=4, decode_tokens=2, repeats=1,
                                processes=1, cache_dir=tmp_path, rows=(1, 3), row_steps=2)
    results = run_overhead(settings, log=lambda _: None)
    # The batched step, stacked and per row, at each batch size.
    assert set(results["rows"]) == {"layers", "steps", "stacked", "per-row"}
    assert all(set(results["rows"][label]) == {"1", "3"} and
               all(v["step_ms"] > 0 and v["cpu_ms"] > 0
                   for v in results["rows"][label].values())
               for label in ("stacked", "per-row"))
    assert "| stacked ms/step, wall |" in format_overhead_table(results)
    row = results["depths"]["2"]
    assert set(row) == {f"{OURS} [default]", f"{OURS} [bfloat16]", MLX_LM}
    assert all(v["decode_ms"] > 0 and len(v["process_ms"]) == 1 for v in row.values())
    assert "bfloat16" in row[f"{OURS} [bfloat16]"]["dtypes"]
    table = format_overhead_table(results)
    assert table.splitlines()[2].startswith("| 2 | wall |")
    assert all(v["cpu_ms"] > 0 for v in row.values())
    json.dumps(results)
