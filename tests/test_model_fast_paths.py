"""The speed paths of model.py compute what the plain paths compute.

Each fast path (head on the last row only, window-blocked sliding attention, the compiled
one-token step) is compared with the straightforward computation on the same float32 weights;
the straightforward paths themselves are checked against transformers in
test_model_reference.py.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_tokens

from mlx_gptoss.loading import load_model
from mlx_gptoss.cache import KVCache
from mlx_gptoss.model import Attention, attention_mask, prefill


@pytest.mark.parametrize("total,chunk", [(1, 4), (7, 7), (30, 8), (31, 8), (45, 16), (45, 64)])
def test_prefill_logits_equal_the_full_forward(tiny_model, total, chunk):
    t = random_tokens(total, seed=total)
    full = np.array(tiny_model(t)[:, -1, :])
    got = np.array(prefill(tiny_model, t, tiny_model.make_cache(), chunk_size=chunk))
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=1e-4)


def test_prefill_rejects_an_empty_prompt(tiny_model):
    with pytest.raises(ValueError):
        prefill(tiny_model, mx.zeros((1, 0), mx.int32), tiny_model.make_cache())


def test_window_blocks_equal_one_masked_call(tiny_model):
    """Blocks of `window` queries == one call over all keys with the window mask."""
    attn = next(layer.self_attn for layer in tiny_model.layers if layer.sliding)
    window = attn.window
    rng = np.random.default_rng(1)
    for history, t in [(0, 3 * window + 2), (window - 1, 2 * window + 1), (5, window + 1)]:
        offset = history + 11  # earlier positions already left the window
        shape = (1, attn.n_heads, t, attn.head_dim)
        q = mx.array(rng.standard_normal(shape, dtype=np.float32))
        kv_shape = (1, attn.n_kv_heads, history + t, attn.head_dim)
        k = mx.array(rng.standard_normal(kv_shape, dtype=np.float32))
        v = mx.array(rng.standard_normal(kv_shape, dtype=np.float32))
        sinks = attn.sinks.astype(mx.float32)
        blocked = attn._windowed(q, k, v, offset, history, sinks)
        plain = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=attn.scale, mask=attention_mask(t, offset, history, window),
            sinks=sinks)
        np.testing.assert_allclose(np.array(blocked), np.array(plain), atol=1e-5)


def decode_both_ways(block, x: mx.array, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """One token through the compiled step and through the same functions uncompiled."""
    caches = []
    for _ in range(2):
        cache = KVCache()
        cache.update_and_fetch(*[mx.ones((1, block.self_attn.n_kv_heads, offset,
                                          block.self_attn.head_dim))] * 2)
        caches.append(cache)
    compiled = block(x, None, caches[0])
    attended = block.self_attn.attend(*block._attention_inputs(x, offset), None, caches[1])
    return np.array(compiled), np.array(block._outputs(x, attended))


def test_compiled_decode_step_equals_the_plain_one(tiny_model):
    block = next(layer for layer in tiny_model.layers if not layer.sliding)
    for seed, offset in [(0, 3), (1, 17), (2, 40)]:
        x = mx.array(np.random.default_rng(seed).standard_normal((1, 1, 64), dtype=np.float32))
        compiled, plain = decode_both_ways(block, x, offset)
        np.testing.assert_allclose(compiled, plain, atol=1e-5)


def test_compiled_decode_step_sees_new_weights(checkpoint_factory):
    """The traced graph reads the module's current parameters, not ones captured at trace."""
    m, _ = load_model(checkpoint_factory("tiny"), "float32")
    block = m.layers[0]
    x = mx.ones((1, 1, 64))
    before = np.array(block(x, None, None))
    block.mlp.experts.down.bias = block.mlp.experts.down.bias + 1.0
    np.testing.assert_allclose(np.array(block(x, None, None)), before + 1.0, atol=1e-5)
    block.self_attn.o_proj.bias = block.self_attn.o_proj.bias + 2.0
    block.self_attn.q_proj.weight = block.self_attn.q_proj.weight * 3.0
    compiled, plain = decode_both_ways(block, x, offset=5)
    np.testing.assert_allclose(compiled, plain, atol=1e-5)


def test_attention_uses_blocks_only_beyond_the_window(tiny_model, monkeypatch):
    calls = []
    original = Attention._windowed
    monkeypatch.setattr(Attention, "_windowed",
                        lambda self, *a: calls.append(a[0].shape[2]) or original(self, *a))
    window = tiny_model.config.sliding_window
    tiny_model(random_tokens(window))
    assert calls == []
    tiny_model(random_tokens(window + 1))
    assert calls and all(n == window + 1 for n in calls)
