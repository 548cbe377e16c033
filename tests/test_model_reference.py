"""The MLX graph against transformers' GptOssForCausalLM on the same synthetic files."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import reference_greedy, reference_logits
from mlx_gptoss.config import FULL, SLIDING
from mlx_gptoss.loading import load_model
from mlx_gptoss.model import prefill
from mlx_gptoss.synthetic import REAL_WIDTHS

FP32_TOLERANCE = 1e-3

# Each config stresses something the 20b defaults hide.
CONFIGS = {
    "tiny": {},
    "odd_layers": dict(num_hidden_layers=5),
    "non_alternating": dict(num_hidden_layers=4,
                            layer_types=[FULL, SLIDING, SLIDING, FULL]),
    "swiglu_limit_2": dict(swiglu_limit=2.0),
    "rope_parameters": dict(rope_form="rope_parameters", num_hidden_layers=2),
    "mqa_top1": dict(num_key_value_heads=1, num_experts_per_tok=1, num_hidden_layers=2),
}


def ours(path, tokens, dtype="float32"):
    model, _ = load_model(path, dtype)
    return model, np.array(model(mx.array(tokens)).astype(mx.float32))


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(checkpoint_factory, name):
    path = checkpoint_factory(name, seed=len(name), **CONFIGS[name])
    window = 8
    tokens = np.random.default_rng(1).integers(0, 256, (2, 5 * window))
    _, got = ours(path, tokens)
    want = reference_logits(path, tokens)
    assert np.abs(want).max() > 1.0, "logits should be of order 1 for the tolerance to mean much"
    assert np.abs(got - want).max() <= FP32_TOLERANCE
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_swiglu_clamp_is_exercised(checkpoint_factory):
    """With limit 2 the clamp must matter: a model with limit 7 on the same weights differs."""
    low = checkpoint_factory("swiglu_limit_2", seed=len("swiglu_limit_2"),
                             **CONFIGS["swiglu_limit_2"])
    high = checkpoint_factory("swiglu_limit_7_same_seed", seed=len("swiglu_limit_2"),
                              swiglu_limit=7.0)
    tokens = np.arange(32)[None]
    assert np.abs(ours(low, tokens)[1] - ours(high, tokens)[1]).max() > 0.1


@pytest.mark.slow
def test_real_widths_match_transformers(checkpoint_factory):
    """hidden 2880, 64x64 query heads, 8 kv heads, window 128: YaRN at head_dim 64."""
    path = checkpoint_factory("real_widths", num_hidden_layers=2, num_local_experts=4,
                              num_experts_per_tok=2, **{**REAL_WIDTHS, "vocab_size": 1024})
    tokens = np.random.default_rng(2).integers(0, 1024, (1, 128 + 64))  # 1.5 windows
    _, got = ours(path, tokens)
    want = reference_logits(path, tokens)
    assert np.abs(got - want).max() <= FP32_TOLERANCE
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_greedy_tokens_match_transformers(tiny_checkpoint):
    prompt = np.random.default_rng(3).integers(0, 256, (1, 12))
    model, _ = load_model(tiny_checkpoint, "float32")
    cache = model.make_cache()
    logits = prefill(model, mx.array(prompt), cache, chunk_size=5)
    tokens = []
    for _ in range(30):
        token = int(mx.argmax(logits, axis=-1).item())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
    assert tokens == reference_greedy(tiny_checkpoint, prompt, 30)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 64])
def test_cached_decoding_reproduces_full_forward(checkpoint_factory, chunk):
    """Chunked prefill and token-by-token decoding through both cache kinds == one pass."""
    path = checkpoint_factory("non_alternating", seed=len("non_alternating"),
                              **CONFIGS["non_alternating"])
    model, _ = load_model(path, "float32")
    tokens = mx.array(np.random.default_rng(4).integers(0, 256, (1, 50)))
    full = model(tokens)
    cache = model.make_cache()
    pieces = [model(tokens[:, s:s + chunk], cache=cache) for s in range(0, 50, chunk)]
    stepped = mx.concatenate(pieces, axis=1)
    assert np.abs(np.array(stepped) - np.array(full)).max() <= 1e-4


def test_sliding_cache_memory_is_bounded(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, "float32")
    cache = model.make_cache()
    prefill(model, mx.array(np.arange(100)[None] % 256), cache, chunk_size=16)
    window = model.config.sliding_window
    for layer, c in zip(model.layers, cache):
        assert c.offset == 100
        assert c.length == (window - 1 if layer.sliding else 100)


def test_bf16_default_is_close_to_float32(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, "bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.layers[0].mlp.experts.gate_up.weight.dtype == mx.uint32
    tokens = np.arange(16)[None]
    bf16 = np.array(model(mx.array(tokens)).astype(mx.float32))
    fp32 = ours(tiny_checkpoint, tokens)[1]
    assert np.abs(bf16 - fp32).max() < 0.5
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.8
