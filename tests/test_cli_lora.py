"""`mlx-gptoss lora` and `fuse` end to end, `load(adapter=)` and `--adapter` on generate."""
from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from test_cli_generate import cli

from mlx_gptoss.fuse import FuseError, fuse
from mlx_gptoss.hub import load
from mlx_gptoss.lora import LoraConfig, apply_lora, lora_modules, save_adapter

ROWS = [{"messages": [{"role": "user", "content": f"Say {w}."},
                      {"role": "assistant", "thinking": f"Say {w}.", "content": w}]}
        for w in ("yes", "no", "maybe")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_cli_data")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "valid.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    return folder


@pytest.mark.slow
def test_lora_command_trains_saves_and_generates(chat_checkpoint, data_dir, tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    code, out, err = cli(capsys, "lora", "--model", chat_checkpoint, "--data", data_dir,
                         "--adapter-path", out_dir, "--iters", 2, "--batch-size", 2,
                         "--steps-per-report", 1, "--save-every", 1, "--rank", 2,
                         "--targets", "q_proj,v_proj,router", "--num-layers", 1,
                         "--dtype", "float32", "--grad-checkpoint")
    assert code == 0, err
    assert re.search(r"^Iter 1: Train loss \d+\.\d{3}, .*Tokens/sec [\d.]+, .*Peak mem", out, re.M)
    assert re.search(r"^Iter 2: Val loss \d+\.\d{3}", out, re.M)
    assert "3 training and 1 validation samples" in out
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 16
    assert config["target_parameters"] == ["1.mlp.router.weight"]
    assert (out_dir / "checkpoint-0000002" / "trainer_state.json").is_file()
    # The adapter is live in load() and in `generate --adapter`.
    base, tok = load(chat_checkpoint, "float32")
    tuned, _ = load(chat_checkpoint, "float32", adapter=out_dir)
    ids = mx.array([tok.encode("Say yes.")])
    assert np.abs(np.array(tuned(ids)) - np.array(base(ids))).max() > 1e-4
    code, out, err = cli(capsys, "generate", "--model", chat_checkpoint, "--adapter", out_dir,
                         "--prompt", "hi", "--max-tokens", 3, "--temp", 0, "--dtype", "float32")
    assert code == 0, err


def test_lora_command_bad_row_is_one_line(chat_checkpoint, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [{"role": "assistant"' + "\n")
    code, out, err = cli(capsys, "lora", "--model", chat_checkpoint, "--data", data,
                         "--adapter-path", tmp_path / "a", "--iters", 1)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert re.match(r"error: .*bad\.jsonl:2: not valid JSON", err)


@pytest.mark.slow
def test_fuse_merges_attention_exactly(checkpoint_factory, tmp_path, capsys):
    path = checkpoint_factory("lora_fuse", seed=4, num_hidden_layers=2, intermediate_size=32)
    model, _ = load(path, "float32")
    apply_lora(model, LoraConfig(rank=3, alpha=6, targets=("attention", "router"), layers=(1,)))
    rng = np.random.default_rng(0)
    for _, module in lora_modules(model):
        module.lora_b = mx.array(rng.normal(0, 0.2, module.lora_b.shape).astype(np.float32))
    adapter = save_adapter(model, tmp_path / "adapter")
    ids = mx.array(np.random.default_rng(1).integers(0, 256, (1, 17)))
    want = np.array(model(ids))
    code, out, err = cli(capsys, "fuse", "--model", path, "--adapter", adapter,
                         "--mlx-path", tmp_path / "fused", "--dtype", "float32")
    assert code == 0, err
    fused, _ = load(tmp_path / "fused", "float32")
    assert not lora_modules(fused)
    np.testing.assert_allclose(np.array(fused(ids)), want, rtol=1e-5, atol=1e-5)
    base, _ = load(path, "float32")
    assert np.abs(np.array(base(ids)) - want).max() > 1e-3


def test_fuse_refuses_expert_adapters(checkpoint_factory, tmp_path, capsys):
    path = checkpoint_factory("lora_fuse", seed=4, num_hidden_layers=2, intermediate_size=32)
    model, _ = load(path, "float32")
    save_adapter(apply_lora(model, LoraConfig(rank=2, targets=("experts",))), tmp_path / "a")
    with pytest.raises(FuseError, match="unfused"):
        fuse(path, tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "fuse", "--model", path, "--adapter", tmp_path / "a",
                       "--mlx-path", tmp_path / "out")
    assert code == 2 and err.startswith("error: the adapter adapts the MXFP4 experts")
