"""`fuse --experts`: expert LoRA merged into dense (bf16/float32) or 8-bit affine experts, and
the warned MXFP4 re-quantization, against the unfused model + adapter (float32 compute).

The tiny model's intermediate width (128) differs from its hidden width (64) so that a mix-up of
the experts' in/out sides fails on shapes, and both are multiples of 64 so 8-bit uses groups of
64 as at the real widths. The expert update is ~2-3% of the expert weights, as in the issue.
"""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from test_cli_generate import cli

from mlx_gptoss.config import ExpertsConfig, load_config
from mlx_gptoss.errors import ConfigError
from mlx_gptoss.fuse import FuseError, fuse, requantization_error
from mlx_gptoss.loading import load
from mlx_gptoss.lora import LoraConfig, apply_lora, load_adapter, lora_modules, save_adapter
from mlx_gptoss.model import AffineSwitchLinear, DenseSwitchLinear, MXFP4SwitchLinear
from mlx_gptoss.verify import verify

VOCAB = 256


@pytest.fixture(scope="module")
def source(checkpoint_factory):
    return checkpoint_factory("fuse_experts", seed=3, num_hidden_layers=2, intermediate_size=128)


def _random_adapter(model, spread: float, seed: int = 0) -> None:
    """Both factors from `seed` (A as `apply_lora` draws it, B with `spread`), never from
    MLX's global random state: a different A changes the merged experts, and on this tiny
    model a quantization step can then flip a near-tied routing choice, which moves the
    logits by the adapter's whole reach (seen once: 8-bit error 2.44 against a 2.01 reach)."""
    rng = np.random.default_rng(seed)
    for _, module in lora_modules(model):
        bound = 1.0 / np.sqrt(module.lora_a.shape[-1])
        module.lora_a = mx.array(rng.uniform(-bound, bound, module.lora_a.shape)
                                 .astype(np.float32))
        module.lora_b = mx.array(rng.normal(0, spread, module.lora_b.shape).astype(np.float32))


@pytest.fixture(scope="module")
def adapted(source, tmp_path_factory):
    """(adapter dir, token ids, logits of the unfused model + adapter, of the base model)."""
    model, _ = load(source, "float32")
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("all",)))
    _random_adapter(model, 0.05)
    adapter = save_adapter(model, tmp_path_factory.mktemp("fuse_adapter"))
    ids = mx.array(np.random.default_rng(1).integers(0, VOCAB, (1, 19)))
    base, _ = load(source, "float32")
    return adapter, ids, np.array(model(ids)), np.array(base(ids))


def fused_logits(path, ids) -> np.ndarray:
    model, _ = load(path, "float32")
    assert not lora_modules(model)
    return np.array(model(ids))


def test_float32_experts_fuse_exactly(source, adapted, tmp_path):
    adapter, ids, want, base = adapted
    fuse(source, adapter, tmp_path / "f32", dtype="float32", experts="float32", progress=False)
    raw = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert raw["mlx_experts"] == {"format": "dense"}
    assert raw["mlx_gptoss_fused_adapter"]["experts"] == "float32"
    model, _ = load(tmp_path / "f32", "float32")
    assert isinstance(model.layers[1].mlp.experts.down, DenseSwitchLinear)
    np.testing.assert_allclose(np.array(model(ids)), want, rtol=1e-5, atol=1e-5)
    assert np.abs(base - want).max() > 1.0  # the adapter matters: the check above can fail


@pytest.mark.slow
def test_bf16_and_8bit_experts_fuse_closely(source, adapted, tmp_path, capsys):
    """Measured (this model, float32 compute, printed with -s): max |logits - unfused| is
    0.025 with bf16 experts and 0.092 with 8-bit affine ones, against 2.50 between the base
    and the adapted model."""
    adapter, ids, want, base = adapted
    reach = np.abs(base - want).max()
    code, out, err = cli(capsys, "fuse", "--model", source, "--adapter", adapter,
                         "--mlx-path", tmp_path / "bf16", "--dtype", "float32",
                         "--experts", "bf16")
    assert code == 0, err
    bf16 = np.abs(fused_logits(tmp_path / "bf16", ids) - want).max()
    assert bf16 < 0.02 * reach, bf16
    fuse(source, adapter, tmp_path / "q8", dtype="float32", experts="8bit", progress=False)
    assert load_config(tmp_path / "q8").experts == ExpertsConfig("affine", bits=8, group_size=64)
    model, _ = load(tmp_path / "q8", "float32")
    assert isinstance(model.layers[0].mlp.experts.gate_up, AffineSwitchLinear)
    q8 = np.abs(np.array(model(ids)) - want).max()
    print(f"measured: bf16 {bf16:.4f}, 8bit {q8:.4f}, base vs adapted {reach:.4f}")
    assert bf16 < q8 < 0.5 * reach, (bf16, q8, reach)


@pytest.mark.slow
def test_8bit_keeps_most_of_the_update_mxfp4_loses_it_and_warns(source, tmp_path):
    """The realized update `Q(W + Δ) - W` against the intended Δ, read back from the fused
    directories: MXFP4 loses it (measured relative error 3.52 for a 2.1% update: the update is
    gone and re-rounding adds noise; the warning says the same number), 8-bit affine keeps
    most of it (0.30)."""
    model, _ = load(source, "float32")
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("experts",), layers=(0,)))
    _random_adapter(model, 0.05, seed=2)
    adapter = save_adapter(model, tmp_path / "adapter")
    module = dict(lora_modules(model))["model.layers.0.mlp.experts.down"]
    w = mx.dequantize(module.base.weight, module.base.scales, group_size=32, bits=4,
                      mode="mxfp4", dtype=mx.float32)
    delta = module.delta()
    ratio = (mx.linalg.norm(delta.flatten()) / mx.linalg.norm(w.flatten())).item()
    assert 0.01 < ratio < 0.05  # a typical update: a few % of the weights

    def realized_error(fused_down) -> float:
        got = mx.dequantize(fused_down.weight, fused_down.scales,
                            getattr(fused_down, "biases", None),
                            group_size=getattr(fused_down, "group_size", 32),
                            bits=getattr(fused_down, "bits", 4),
                            mode="affine" if hasattr(fused_down, "biases") else "mxfp4",
                            dtype=mx.float32)
        return (mx.linalg.norm((got - w - delta).flatten())
                / mx.linalg.norm(delta.flatten())).item()

    lines: list[str] = []
    fuse(source, adapter, tmp_path / "mx", experts="mxfp4", progress=False, log=lines.append)
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "re-quantized to MXFP4" in warning[0]
    warned = float(warning[0].split("realized update ")[1].split()[0])
    down = load(tmp_path / "mx", "float32")[0].layers[0].mlp.experts.down
    assert isinstance(down, MXFP4SwitchLinear)
    lost = realized_error(down)
    assert lost > 0.8
    assert warned >= lost - 0.01  # the warning reports the worst of the adapted tensors
    assert requantization_error(module.base.weight, module.base.scales, delta) == \
        pytest.approx(lost, rel=1e-4)
    fuse(source, adapter, tmp_path / "q8", experts="8bit", progress=False)
    kept = realized_error(load(tmp_path / "q8", "float32")[0].layers[0].mlp.experts.down)
    print(f"measured: realized-update error mxfp4 {lost:.3f} (warned {warned}), 8bit {kept:.3f}, update/weights {ratio:.3f}")
    assert kept < 0.5 and kept < lost / 2, (kept, lost)


def test_expert_adapter_is_refused_without_a_choice(source, tmp_path, capsys):
    model, _ = load(source, "float32")
    save_adapter(apply_lora(model, LoraConfig(rank=2, targets=("experts",))), tmp_path / "a")
    with pytest.raises(FuseError, match="--experts bf16"):
        fuse(source, tmp_path / "a", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "fuse", "--model", source, "--adapter", tmp_path / "a",
                       "--mlx-path", tmp_path / "out", "--experts", "int3")
    assert code == 2 and err.strip().count("\n") == 0 and "unknown expert storage" in err


def test_bad_experts_section_is_one_config_error(source, tmp_path):
    raw = json.loads((source / "config.json").read_text())
    for bad in ({"format": "affine", "bits": 7, "group_size": 64}, {"format": "nf4"},
                {"format": "dense", "bits": 8}, "dense"):
        (tmp_path / "config.json").write_text(json.dumps({**raw, "mlx_experts": bad}))
        with pytest.raises(ConfigError, match="mlx_experts"):
            load_config(tmp_path)


@pytest.mark.slow
def test_fused_experts_pass_verify_load_generate_and_take_an_adapter(chat_checkpoint, tmp_path,
                                                                     capsys):
    """The CLI's fused 8-bit directory: `verify`, `generate`, and an adapter on top of the
    dense experts (LoRA over any expert storage) equal to fusing it."""
    model, _ = load(chat_checkpoint, "float32")
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=("all",)))
    _random_adapter(model, 0.02)
    adapter = save_adapter(model, tmp_path / "adapter")
    code, out, err = cli(capsys, "fuse", "--model", chat_checkpoint, "--adapter", adapter,
                         "--mlx-path", tmp_path / "q8", "--experts", "8bit")
    assert code == 0, err
    assert "structure OK" in verify(tmp_path / "q8").summary()
    code, out, err = cli(capsys, "verify", "--model", tmp_path / "q8")
    assert code == 0, err
    code, out, err = cli(capsys, "verify", "--model", tmp_path / "q8", "--against", chat_checkpoint)
    assert code == 2 and "fused into its weights" in err and "without --against" in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli(capsys, "generate", "--model", tmp_path / "q8", "--prompt", "hi",
                         "--max-tokens", 3, "--temp", 0)
    assert code == 0, err
    fuse(chat_checkpoint, adapter, tmp_path / "f32", dtype="float32", experts="float32",
         progress=False)
    dense, _ = load(tmp_path / "f32", "float32")
    load_adapter(dense, adapter)  # the same adapter again, over dense experts
    ids = mx.array([[200006, 1428, 200008, 3020]])
    twice = np.array(dense(ids))
    fuse(tmp_path / "f32", adapter, tmp_path / "twice", dtype="float32", progress=False)
    np.testing.assert_allclose(fused_logits(tmp_path / "twice", ids), twice, rtol=1e-4,
                               atol=1e-4)
