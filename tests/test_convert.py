"""The converter on synthetic checkpoints in every source layout: same logits, same expert bytes."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors import safe_open

from helpers import reference_logits
from mlx_gptoss.config import ModelConfig
from mlx_gptoss.converter import bytes_per_token, convert, quantization_config
from mlx_gptoss.formats import hf
from mlx_gptoss.harmony.tokenizer import VOCAB_FILENAME, VOCAB_SHA256
from mlx_gptoss.loading import QUANTIZABLE_MODULES, load_model
from mlx_gptoss.mxfp4 import E2M1_VALUES, dequantize_reference, quantize_blocks
from mlx_gptoss.safetensors_io import INDEX_NAME
from mlx_gptoss.synthetic import REAL_WIDTHS, hf_config

TOKENS = np.random.default_rng(7).integers(0, 256, (1, 24))


def logits(path: Path) -> np.ndarray:
    model, _ = load_model(path, "float32")
    return np.array(model(mx.array(TOKENS)))


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a directory, read with the safetensors library (an independent reader),
    as raw bytes (bf16 -> uint16 bit patterns)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 \
                    else t.numpy()
    return out


@pytest.fixture(scope="module")
def hub(checkpoint_factory):
    return checkpoint_factory("convert_hub", seed=11)


@pytest.fixture(scope="module")
def converted(hub, tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted") / "tiny-mlx"
    report = convert(hub, dst, progress=False, max_shard_bytes=60_000)
    return dst, report


def test_hub_conversion_is_self_contained_and_exact(hub, converted):
    dst, report = converted
    assert report.source_format == "hf"
    assert np.array_equal(logits(dst), logits(hub))
    _, fmt = load_model(dst)
    assert fmt == "mlx"
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["mlx_gptoss"]["source_format"] == "hf" and "mlx_quantization" not in cfg
    assert (dst / "generation_config.json").read_bytes() == \
        (hub / "generation_config.json").read_bytes()
    assert hashlib.sha256((dst / VOCAB_FILENAME).read_bytes()).hexdigest() == VOCAB_SHA256
    index = json.loads((dst / INDEX_NAME).read_text())
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) == report.num_shards > 2
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    # Each shard stays under the limit unless it holds a single larger tensor.
    for s in shards:
        members = [n for n, f in index["weight_map"].items() if f == s.name]
        assert len(members) == 1 or s.stat().st_size <= 60_000 + 8 + 4096
    assert report.output_bytes == sum(f.stat().st_size for f in dst.iterdir())
    assert not list(dst.parent.glob(".*"))  # no temporary directory left beside DST


def test_expert_bytes_identical_to_hub_source(hub, converted):
    dst, _ = converted
    ours, src = read_all(dst), read_all(hub)
    for n in range(3):
        p = f"model.layers.{n}.mlp.experts."
        for proj, ours_name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            blocks, scales = src[p + proj + "_blocks"], src[p + proj + "_scales"]
            bias = src[p + proj + "_bias"]
            if proj == "gate_up_proj":  # even rows gate, odd rows up -> gate rows first
                order = np.r_[0:blocks.shape[1]:2, 1:blocks.shape[1]:2]
                blocks, scales, bias = blocks[:, order], scales[:, order], bias[:, order]
            assert ours[p + ours_name + ".weight"].tobytes() == blocks.tobytes()
            assert ours[p + ours_name + ".scales"].tobytes() == scales.tobytes()
            assert ours[p + ours_name + ".bias"].tobytes() == bias.tobytes()


@pytest.mark.slow
def test_original_layout(checkpoint_factory, layout_factory, tmp_path):
    src = layout_factory("original", "convert_hub", seed=11)
    hub = checkpoint_factory("convert_hub", seed=11)
    names = set(read_all(src))
    # Names from OpenAI's reference checkpoint (facts file), written independently of the reader.
    for expected in ("embedding.weight", "unembedding.weight", "norm.scale",
                     "block.0.attn.norm.scale", "block.0.attn.qkv.weight", "block.0.attn.qkv.bias",
                     "block.0.attn.sinks", "block.0.attn.out.weight", "block.0.attn.out.bias",
                     "block.0.mlp.norm.scale", "block.0.mlp.gate.weight", "block.0.mlp.gate.bias",
                     "block.0.mlp.mlp1_weight.blocks", "block.0.mlp.mlp1_weight.scales",
                     "block.0.mlp.mlp1_bias", "block.0.mlp.mlp2_weight.blocks",
                     "block.0.mlp.mlp2_weight.scales", "block.0.mlp.mlp2_bias"):
        assert expected in names
    dst = tmp_path / "out"
    report = convert(src, dst, progress=False)
    assert report.source_format == "original"
    got = logits(dst)
    assert np.array_equal(got, logits(hub))
    assert np.abs(got - reference_logits(hub, TOKENS)).max() <= 1e-3
    ours, theirs = read_all(dst), read_all(src)
    order = np.r_[0:128:2, 1:128:2]
    assert ours["model.layers.2.mlp.experts.gate_up.weight"].tobytes() == \
        theirs["block.2.mlp.mlp1_weight.blocks"][:, order].tobytes()
    assert ours["model.layers.2.mlp.experts.down.scales"].tobytes() == \
        theirs["block.2.mlp.mlp2_weight.scales"].tobytes()


def _reference_dense_logits(path: Path) -> np.ndarray:
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dense", "dense-blocks"])
def test_dense_exports(checkpoint_factory, layout_factory, tmp_path, layout):
    """Dense experts are exact MXFP4 values here, so re-quantizing loses nothing."""
    src = layout_factory(layout, "convert_hub", seed=11)
    dst = tmp_path / "out"
    report = convert(src, dst, progress=False)
    assert report.source_format == {"dense": "hf-dense", "dense-blocks": "hf-dense-blocks"}[layout]
    got = logits(dst)
    assert np.array_equal(got, logits(checkpoint_factory("convert_hub", seed=11)))
    if layout == "dense":  # transformers reads plain dense exports (not its own 5.23 variant)
        assert np.abs(got - _reference_dense_logits(src)).max() <= 1e-3


def test_transformers_own_dequantized_save(hub, tmp_path):
    """The pinned transformers' real `save_pretrained` output of a dequantized model converts.

    Which names it writes changed between versions (5.23: dense experts under `_blocks` names,
    5.24: plain names; both layouts are tested on written files in `test_dense_exports`), so the
    expected format is read from the saved names, not assumed."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(hub, dtype=torch.bfloat16,
                                              quantization_config=Mxfp4Config(dequantize=True))
    model.save_pretrained(tmp_path / "saved")
    names = set()
    for shard in (tmp_path / "saved").glob("*.safetensors"):
        with safe_open(shard, "np") as f:
            names.update(f.keys())
    blocks = any(n.endswith("gate_up_proj_blocks") for n in names)
    assert blocks or any(n.endswith("mlp.experts.gate_up_proj") for n in names), sorted(names)
    report = convert(tmp_path / "saved", tmp_path / "out", progress=False)
    assert report.source_format == ("hf-dense-blocks" if blocks else "hf-dense")
    assert np.array_equal(logits(tmp_path / "out"), logits(hub))


def ocp_reference(x: np.ndarray) -> np.ndarray:
    """OCP MX nearest-value quantization, dequantized, from the spec: scale 2^(floor(log2
    amax) - 2); element = the nearest E2M1 value to x/scale, ties to the even code, ±6 max."""
    g = x.reshape(*x.shape[:-1], -1, 32).astype(np.float64)
    amax = np.abs(g).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    scale = np.exp2(np.clip(e, -127, 127))
    v = np.abs(g) / scale
    grid = E2M1_VALUES[:8].astype(np.float64)
    dist = np.abs(v[..., None] - grid)
    best = dist.min(-1, keepdims=True)
    candidates = np.where(dist == best, np.arange(8), 99)
    # ties: the even code (its mantissa bit is 0)
    even = np.where((candidates % 2 == 0) & (candidates < 99), candidates, 99).min(-1)
    code = np.where((candidates < 99).sum(-1) > 1, even, candidates.min(-1))
    return (np.sign(g) * grid[code] * scale).reshape(x.shape)


def test_mxfp4_quantizer_matches_ocp_and_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 8, 256)) * np.exp2(rng.integers(-20, 20, (3, 8, 1))))
    x = x.astype(np.float32)
    grid = np.concatenate([E2M1_VALUES, E2M1_VALUES + 0.25, E2M1_VALUES * 1.25])  # ties
    x[0, 0, :96] = np.resize(grid, 96) * 0.5  # exact values and every midpoint
    x[0, 1, :32] = 0.0
    x[0, 2, :32] = np.linspace(-7.9, 7.9, 32)  # saturates at ±6 × scale
    blocks, scales = quantize_blocks(mx.array(x))
    blocks, scales = np.array(blocks), np.array(scales)
    want = ocp_reference(x)
    assert np.array_equal(dequantize_reference(blocks, scales), want)
    # transformers' own dequantization of our bytes ([E, out, G, 16] -> x @ W [E, in, out])
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                        dtype=torch.float32).numpy()
    assert np.array_equal(theirs, want.transpose(0, 2, 1))


def test_dense_random_experts_round_to_nearest(layout_factory, tmp_path):
    """Arbitrary float experts (not MXFP4 values): the converted experts are the OCP rounding."""
    src = layout_factory("dense-f32", "random_dense", seed=3)
    infos = read_all(src)
    p = "model.layers.1.mlp.experts."
    rng = np.random.default_rng(0)
    for name in (p + "gate_up_proj", p + "down_proj"):  # make them genuinely non-MXFP4
        infos[name] = infos[name] * rng.uniform(0.7, 1.3, infos[name].shape).astype(np.float32)
    for shard in src.glob("*.safetensors"):  # rewrite with MLX (bf16 included)
        arrays = mx.load(str(shard))
        for name in (p + "gate_up_proj", p + "down_proj"):
            if name in arrays:
                arrays[name] = mx.array(infos[name])
        mx.save_safetensors(str(shard), arrays, {"format": "pt"})
    convert(src, tmp_path / "out", progress=False)
    ours = read_all(tmp_path / "out")
    for dense, canon in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
        w = infos[p + dense].transpose(0, 2, 1)  # [E, out, in]
        if dense == "gate_up_proj":
            w = np.concatenate([w[:, 0::2], w[:, 1::2]], axis=1)
        got = dequantize_reference(ours[p + canon + ".weight"].view(np.uint8).reshape(
            *w.shape[:2], -1, 16), ours[p + canon + ".scales"])
        assert np.array_equal(got, ocp_reference(w))


QUANT = {"affine8": ("affine", 8, 64, False), "affine4": ("affine", 4, 32, True),
         "mxfp8": ("mxfp8", 8, 32, False)}


@pytest.mark.parametrize("name", QUANT)
def test_quantized_variants(hub, tmp_path, name):
    mode, bits, group, router = QUANT[name]
    q = quantization_config(mode, bits, group, router)
    report = convert(hub, tmp_path / "q", quantization=q, progress=False, max_shard_bytes=40_000)
    assert report.num_shards > 2  # quantized triples never straddle two files
    model, fmt = load_model(tmp_path / "q", "float32")
    assert fmt == "mlx" and model.config.quantization == q
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    assert isinstance(model.layers[0].mlp.router, nn.QuantizedLinear) == router
    # The converted weights are exactly the source quantized in memory with the same settings.
    ref, _ = load_model(hub, "bfloat16")  # the converter quantizes the stored bf16 values
    nn.quantize(ref, group_size=group, bits=bits, mode=mode,
                class_predicate=lambda path, m: isinstance(m, (nn.Linear, nn.Embedding))
                and any(QUANTIZABLE_MODULES[k](path) for k in q.modules))
    ours, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(ref.parameters()))
    assert ours.keys() == want.keys()
    for k in ours:
        assert mx.array_equal(ours[k].astype(mx.float32), want[k].astype(mx.float32)), k
    out = np.array(model(mx.array(TOKENS)))
    assert np.isfinite(out).all() and out.shape == (1, 24, 256)
    files = list((tmp_path / "q").iterdir())
    assert report.output_bytes == sum(f.stat().st_size for f in files)
    shards = [f for f in files if f.suffix == ".safetensors"]
    headers = sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in shards)
    assert sum(f.stat().st_size for f in shards) == report.tensor_bytes + headers
    assert f"{report.output_bytes} bytes" in report.summary()


def test_bytes_per_token_matches_the_20b_figures():
    """facts: a 20b token reads 1.27 GB attention + 1.27 GB experts + 1.16 GB lm_head."""
    cfg = ModelConfig.from_dict(hf_config(**REAL_WIDTHS))
    sizes = {name: int(np.prod(shape)) * (1 if "U8" in dtypes else 2)
             for name, (shape, dtypes) in hf.expected_tensors(cfg).items()}
    assert abs(bytes_per_token(cfg, sizes) - 3.71e9) < 0.01e9


def test_output_directory_has_the_usual_permissions(tiny_checkpoint, tmp_path):
    """The temporary directory is private while writing; the result is not."""
    import os
    import stat

    from mlx_gptoss.converter import convert

    umask = os.umask(0o022)
    try:
        convert(tiny_checkpoint, tmp_path / "out", progress=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
