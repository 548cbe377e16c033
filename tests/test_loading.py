"""Loading hub-layout checkpoints: lossless MXFP4 repacking, configs, and every bad input."""
from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from helpers import edit_json
from mlx_gptoss import load
from mlx_gptoss.config import ModelConfig, load_config
from mlx_gptoss.errors import CheckpointError, ConfigError, GptOssError
from mlx_gptoss.loading import load_model
from mlx_gptoss.mxfp4 import dequantize_reference, mlx_to_blocks
from mlx_gptoss.safetensors_io import INDEX_NAME, SafetensorsWriter, read_header
from mlx_gptoss.synthetic import hf_config


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A fresh copy of the tiny checkpoint to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


def weight_map(path):
    return json.loads((path / INDEX_NAME).read_text())["weight_map"]


def test_one_layer_straddles_two_shards(tiny_checkpoint):
    shards_per_layer = {}
    for name, shard in weight_map(tiny_checkpoint).items():
        if ".layers." in name:
            shards_per_layer.setdefault(name.split(".")[2], set()).add(shard)
    assert any(len(s) > 1 for s in shards_per_layer.values())
    assert len(set(weight_map(tiny_checkpoint).values())) == 3


def test_experts_are_repacked_losslessly(tiny_checkpoint):
    """Model bytes == checkpoint bytes (rows regrouped), and MLX's dequantization equals the
    OCP reference dequantization of the checkpoint, value for value."""
    model, fmt = load_model(tiny_checkpoint, "float32")
    assert fmt == "hf"
    wm = weight_map(tiny_checkpoint)
    for layer in (0, 2):
        name = f"model.layers.{layer}.mlp.experts.gate_up_proj_"
        loaded = {k: mx.load(str(tiny_checkpoint / wm[name + k]))[name + k]
                  for k in ("blocks", "scales")}
        blocks, scales = np.array(loaded["blocks"]), np.array(loaded["scales"])
        ours = model.layers[layer].mlp.experts.gate_up
        got_blocks = np.array(mlx_to_blocks(ours.weight))
        assert got_blocks.dtype == np.uint8
        np.testing.assert_array_equal(got_blocks[:, :64], blocks[:, 0::2])
        np.testing.assert_array_equal(got_blocks[:, 64:], blocks[:, 1::2])
        np.testing.assert_array_equal(np.array(ours.scales[:, 64:]), scales[:, 1::2])
        dense = np.array(mx.dequantize(ours.weight, ours.scales, None, group_size=32, bits=4,
                                       mode="mxfp4", dtype=mx.float32))
        reference = dequantize_reference(blocks, scales)
        np.testing.assert_array_equal(dense[:, :64], reference[:, 0::2])
        np.testing.assert_array_equal(dense[:, 64:], reference[:, 1::2])


@pytest.mark.slow
def test_public_load_returns_model_and_tokenizer(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint, dtype="float32")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 256)
    assert tokenizer is not None


def test_rope_parameters_and_rope_scaling_forms_agree():
    a = ModelConfig.from_dict(hf_config(num_hidden_layers=2))
    b = ModelConfig.from_dict(hf_config(num_hidden_layers=2, rope_form="rope_parameters"))
    assert a == b
    assert a.rope.type == "yarn" and a.rope.truncate is False and a.rope.factor == 32.0
    assert ModelConfig.from_dict(a.to_hf_dict()) == a


def test_yarn_frequencies_match_transformers():
    """Unrounded correction range, exactly as transformers computes it at head_dim 64."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mlx_gptoss.model import rope_frequencies

    raw = hf_config(num_hidden_layers=2)
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](GptOssConfig(**raw))
    inv, factor = rope_frequencies(ModelConfig.from_dict(raw).rope, 64)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6)
    assert factor == pytest.approx(ref_factor) == pytest.approx(0.1 * np.log(32) + 1)
    # Rounding the range (what mlx-lm 0.32 does) would give different frequencies.
    rounded_cfg = ModelConfig.from_dict(hf_config(num_hidden_layers=2, rope_scaling={
        **raw["rope_scaling"], "truncate": True}))
    rounded, _ = rope_frequencies(rounded_cfg.rope, 64)
    assert np.abs(rounded - inv).max() > 1e-4


def test_original_config_shape_is_read():
    raw = {"num_hidden_layers": 3, "num_experts": 4, "experts_per_token": 2, "vocab_size": 256,
           "hidden_size": 64, "intermediate_size": 64, "swiglu_limit": 7.0, "head_dim": 16,
           "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8,
           "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
           "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.rope.beta_fast == 32.0 and cfg.rope.beta_slow == 1.0
    assert cfg.rope.truncate is False and cfg.num_local_experts == 4


# ---- bad input: one clear error naming the file or tensor --------------------------------
def test_other_model_type_is_refused(broken):
    edit_json(broken / "config.json", model_type="llama")
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_model(broken)


def test_unreadable_and_missing_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_config(broken)
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(broken)


@pytest.mark.parametrize("change,message", [
    (dict(layer_types=["sliding_attention"]), "layer_types has 1 entries for 3 layers"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "longrope"}), "unsupported rope type"),
    (dict(hidden_size="64"), "must be an integer"),
])
def test_inconsistent_config_is_refused(broken, change, message):
    edit_json(broken / "config.json", **change)
    with pytest.raises(ConfigError, match=message):
        load_model(broken)


def test_missing_directory():
    with pytest.raises(GptOssError, match="model directory not found"):
        load_model("/nonexistent/model")


def test_missing_shard(broken):
    victim = sorted(set(weight_map(broken).values()))[1]
    (broken / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: shard listed in .* is missing"):
        load_model(broken)


def test_truncated_shard(broken):
    victim = broken / sorted(set(weight_map(broken).values()))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated file: tensor"):
        load_model(broken)
    victim.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_model(broken)


def rewrite_shard(path, shard, transform):
    """Rewrite one shard through `transform(name, array) -> (name, array) | None`."""
    tensors = mx.load(str(path / shard))
    out = {}
    for name, value in tensors.items():
        result = transform(name, value)
        if result is not None:
            out[result[0]] = result[1]
    mx.save_safetensors(str(path / shard), out, metadata={"format": "pt"})
    wm = weight_map(path)
    wm = {k: v for k, v in wm.items() if v != shard or k in out}
    wm.update({k: shard for k in out})
    (path / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))


def shard_of(path, name):
    return weight_map(path)[name]


def test_missing_tensor(broken):
    name = "model.layers.1.self_attn.sinks"
    rewrite_shard(broken, shard_of(broken, name), lambda n, v: None if n == name else (n, v))
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        load_model(broken)


def test_unknown_tensor(broken):
    name = "model.norm.weight"
    rewrite_shard(broken, shard_of(broken, name),
                  lambda n, v: ("model.norm.extra" if n == name else n, v))
    edit = weight_map(broken)
    edit[name] = shard_of(broken, "model.norm.extra")
    (broken / INDEX_NAME).write_text(json.dumps({"weight_map": edit}))
    with pytest.raises(CheckpointError, match="not in this shard|unknown tensor"):
        load_model(broken)


def test_wrong_shape(broken):
    name = "model.layers.0.self_attn.q_proj.bias"
    rewrite_shard(broken, shard_of(broken, name),
                  lambda n, v: (n, v[:-1] if n == name else v))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[63\], expected \[64\]"):
        load_model(broken)


def test_wrong_dtype(broken):
    name = "model.layers.2.mlp.experts.down_proj_scales"
    rewrite_shard(broken, shard_of(broken, name),
                  lambda n, v: (n, v.astype(mx.int32) if n == name else v))
    with pytest.raises(CheckpointError, match=f"{name} has dtype I32, expected U8"):
        load_model(broken)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{this is not json!!}")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(bad)


def test_streaming_writer_round_trips(tmp_path):
    a = mx.arange(12, dtype=mx.bfloat16).reshape(3, 4)
    b = mx.array([1, 2, 3], dtype=mx.uint8)
    file = tmp_path / "w.safetensors"
    with SafetensorsWriter(file, [("a", "BF16", (3, 4)), ("b", "U8", (3,))]) as w:
        raw = bytes(np.array(a.view(mx.uint16)).tobytes())
        w.write("a", raw[:10])
        w.write("a", raw[10:])
        w.write("b", np.array(b).tobytes())
    back = mx.load(str(file))
    assert mx.array_equal(back["a"], a) and mx.array_equal(back["b"], b)
    assert read_header(file)["a"].shape == (3, 4)


@pytest.mark.slow
def test_weights_are_not_copied_twice(checkpoint_factory):
    """Lazy, memory-mapped loading: peak memory stays near the parameters' own size
    (a second full copy would double it)."""
    from mlx_gptoss.loading import parameter_bytes

    path = checkpoint_factory("medium_for_memory", hidden_size=512, intermediate_size=512,
                              num_local_experts=16, num_hidden_layers=4, vocab_size=8192)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model, _ = load_model(path)
    params = parameter_bytes(model)
    assert mx.get_peak_memory() - before < 1.5 * params


@pytest.mark.parametrize("header", [
    [1, 2],
    {"t": {"dtype": "U8", "shape": [8], "data_offsets": [0, "8"]}},
    {"t": {"dtype": "U8", "shape": ["x"], "data_offsets": [0, 8]}},
    {"t": {"dtype": "U8", "shape": [-8], "data_offsets": [0, 8]}},
    {"t": {"dtype": ["U8"], "shape": [8], "data_offsets": [0, 8]}},
    {"t": "not an entry"},
])
def test_malformed_headers_are_one_clear_error(tmp_path, header):
    bad = tmp_path / "x.safetensors"
    raw = json.dumps(header).encode()
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(CheckpointError, match="corrupt safetensors header|malformed header entry|unsupported dtype"):
        read_header(bad)


def test_default_dtype_policy_per_device(tiny_checkpoint):
    """dtype=None: on the CPU backend float32 activations with the two vocabulary matrices
    kept in the checkpoint's bf16 (benchmarks/README.md); on a GPU bf16 throughout."""
    model, _ = load_model(tiny_checkpoint)
    attention = model.layers[0].self_attn.q_proj.weight.dtype
    vocab = (model.model.embed_tokens.weight.dtype, model.lm_head.weight.dtype)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = model(tokens)
    if mx.default_device() == mx.cpu:
        assert attention == mx.float32 and vocab == (mx.bfloat16, mx.bfloat16)
        assert logits.dtype == mx.float32
        exact, _ = load_model(tiny_checkpoint, "float32")
        reference = np.array(exact(tokens))
        assert np.abs(np.array(logits) - reference).max() < 0.05
        assert (np.array(logits).argmax(-1) == reference.argmax(-1)).all()
    else:
        assert attention == mx.bfloat16 and vocab == (mx.bfloat16, mx.bfloat16)
