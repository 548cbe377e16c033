"""The quantized KV cache (issue 17): attention over it, generation with it, the prompt cache
over it, the context limit and the memory estimate.

The oracle for attention is a float32 numpy computation from the *dequantized* keys and values
with the learned sinks in the denominator: quantization error is the cache's business, the
attention over what it holds must be exact. End to end, an 8-bit cache must give the greedy
tokens of the unquantized one.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import REWIND_CASES, rewind_through

from mlx_gptoss.cache import KVCache, PromptCache, PromptCachePool, QuantizedKVCache
from mlx_gptoss.errors import ContextLengthError, GptOssError, KVQuantizationError
from mlx_gptoss.generate import generate_tokens
from mlx_gptoss.loading import load_model
from mlx_gptoss.memory import estimate_memory, kv_bytes_per_position, kv_cache_bytes
from mlx_gptoss.model import attention_mask, prefill, quantized_attention
from mlx_gptoss.sampling import SamplingParams, make_sampler

# Tiny widths except head_dim: MLX quantizes groups of 32, 64 or 128, and gpt-oss's is 64.
GREEDY = SamplingParams(temperature=0)
KVQ_MODEL = dict(head_dim=64, num_hidden_layers=2, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def kvq_model(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("kvq_tiny", seed=7, **KVQ_MODEL), "float32")
    return model


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def greedy(model, prompt, steps, cache=None) -> list[int]:
    return list(generate_tokens(model, prompt, sampler=make_sampler(GREEDY), max_tokens=steps,
                                prompt_cache=cache))


# --------------------------------------------------------------------------- the oracle

def reference_attention(q, k, v, scale, visible, sinks):
    """float32 numpy: softmax over [scores, sink] per head (GQA by repetition), sink dropped."""
    q, k, v, sinks = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("bhtd,bhld->bhtl", q, k) * scale
    scores = np.where(visible, scores, -np.inf)
    sink = np.broadcast_to(sinks[None, :, None, None], (*scores.shape[:3], 1))
    full = np.concatenate([scores, sink], axis=-1)
    weights = np.exp(full - full.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhtl,bhld->bhtd", weights[..., :-1], v)


def dequantized(triple, bits, group_size):
    return np.array(mx.dequantize(*triple, group_size=group_size, bits=bits))


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 32)])
@pytest.mark.parametrize("history,t", [(0, 1), (0, 9), (13, 1), (13, 6)])
def test_attention_over_the_quantized_cache_equals_the_dequantized_reference(bits, group_size,
                                                                             history, t):
    rng = np.random.default_rng(bits + history + t)
    n_heads, n_kv, d = 8, 2, 64
    sinks = mx.array(rng.standard_normal(n_heads, dtype=np.float32) * 2)
    cache = QuantizedKVCache(bits, group_size)
    for n in (history, t):  # the history, then this call's own keys
        if n:
            k = mx.array(rng.standard_normal((1, n_kv, n, d), dtype=np.float32))
            v = mx.array(rng.standard_normal((1, n_kv, n, d), dtype=np.float32))
            keys, values = cache.update_and_fetch(k, v)
    q = mx.array(rng.standard_normal((1, n_heads, t, d), dtype=np.float32))
    mask = attention_mask(t, history, history, None)
    got = quantized_attention(q, keys, values, 0.125, mask, sinks, group_size, bits)
    visible = np.arange(history, history + t)[:, None] >= np.arange(history + t)[None, :]
    want = reference_attention(np.array(q), dequantized(keys, bits, group_size),
                               dequantized(values, bits, group_size), 0.125, visible,
                               np.array(sinks))
    np.testing.assert_allclose(np.array(got), want, atol=2e-5, rtol=1e-4)


def test_sinks_change_the_result():
    """The sink column is really in the denominator: a huge sink drives the output to 0."""
    rng = np.random.default_rng(0)
    cache = QuantizedKVCache(8, 64)
    keys, values = cache.update_and_fetch(
        *(mx.array(rng.standard_normal((1, 1, 5, 64), dtype=np.float32)) for _ in range(2)))
    q = mx.array(rng.standard_normal((1, 2, 1, 64), dtype=np.float32))
    quiet = quantized_attention(q, keys, values, 0.125, None, mx.array([-50.0, 30.0]), 64, 8)
    assert np.abs(np.array(quiet[0, 0])).max() > 0.05
    assert np.abs(np.array(quiet[0, 1])).max() < 1e-6


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_8bit_greedy_tokens_equal_the_unquantized_cache(kvq_model):
    prompt = ids(40, 1)
    plain = greedy(kvq_model, prompt, 200)
    assert len(set(plain)) > 20  # a real sequence, not one token repeated
    assert greedy(kvq_model, prompt, 200, PromptCache.for_model(kvq_model, kv_bits=8)) == plain
    # ... while the logits do move (the cache really is quantized), a little.
    exact = np.array(prefill(kvq_model, mx.array([prompt]), kvq_model.make_cache()))
    q8 = np.array(prefill(kvq_model, mx.array([prompt]), kvq_model.make_cache(kv_bits=8)))
    assert 0 < np.abs(q8 - exact).max() < 1e-2


def test_only_full_layers_are_quantized_and_memory_shrinks(kvq_model):
    caches = {bits: kvq_model.make_cache(kv_bits=bits) for bits in (None, 8, 4)}
    for bits, layers in caches.items():
        full = [c for c, layer in zip(layers, kvq_model.layers) if not layer.sliding]
        assert all(type(c) is (KVCache if bits is None else QuantizedKVCache) for c in full)
        prefill(kvq_model, mx.array([ids(300, 2)]), layers, chunk_size=128)
    sizes = {bits: sum(c.nbytes for c in layers) for bits, layers in caches.items()}
    assert sizes[4] < sizes[8] < sizes[None]
    for bits, layers in caches.items():  # the estimate is what the caches hold
        assert sizes[bits] == kv_cache_bytes(kvq_model.config, 300, bits, dtype_bytes=4)


@pytest.mark.parametrize("case", REWIND_CASES)
def test_prompt_cache_over_quantized_layers_rewinds_exactly(kvq_model, case):
    """Every way back gives the logits of a fresh 8-bit cache on the same prompt (rows are
    quantized one position at a time, so how the prompt was split does not matter)."""
    cache = PromptCache.for_model(kvq_model, sliding_slack=2, kv_bits=8)
    prompt, todo = rewind_through(kvq_model, cache, case, ids)
    got = np.array(prefill(kvq_model, mx.array([todo]), cache.layers, chunk_size=5))
    fresh = np.array(prefill(kvq_model, mx.array([prompt]), kvq_model.make_cache(kv_bits=8),
                             chunk_size=7))
    np.testing.assert_allclose(got, fresh, atol=2e-5)
    assert all(layer.offset == len(prompt) for layer in cache.layers)


def test_reused_quantized_cache_continues_like_a_fresh_one(kvq_model):
    cache = PromptCache.for_model(kvq_model, kv_bits=4)
    prompt = ids(30, 4)
    first = greedy(kvq_model, prompt, 8, cache)
    follow = prompt + first + ids(5, 5)
    assert greedy(kvq_model, follow, 8, cache) == greedy(
        kvq_model, follow, 8, PromptCache.for_model(kvq_model, kv_bits=4))


def test_pool_forks_of_quantized_caches_are_independent(kvq_model):
    pool = PromptCachePool(kvq_model, kv_bits=8)
    prompt = ids(20, 6)
    cache = pool.acquire(prompt)
    assert isinstance(cache.layers[1], QuantizedKVCache)
    greedy(kvq_model, prompt, 4, cache)
    held = [np.array(a) for a in cache.layers[1].state[0]]
    pool.release(cache)
    fork = pool.acquire(prompt + [1, 2, 3])
    assert pool.hits == 1
    greedy(kvq_model, prompt[:10] + ids(12, 7), 4, fork)  # rewinds and overwrites the fork
    for before, after in zip(held, cache.layers[1].state[0]):
        np.testing.assert_array_equal(before, np.array(after))


def test_step_rows_over_quantized_caches_equals_single_steps(kvq_model):
    prompts = [ids(12, 8), ids(21, 9)]
    rows, single = [], []
    for p in prompts:
        for bucket in (rows, single):
            caches = kvq_model.make_cache(kv_bits=4)
            prefill(kvq_model, mx.array([p]), caches)
            bucket.append(caches)
    tokens = mx.array([3, 5])
    batched = np.array(kvq_model.step_rows(tokens, rows))
    for b, caches in enumerate(single):
        alone = np.array(kvq_model(tokens[b].reshape(1, 1), cache=caches)[0, -1])
        np.testing.assert_allclose(batched[b], alone, atol=2e-5)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("bits,group_size", [(3, 64), (8, 48), (4, 128)])
def test_impossible_quantization_is_refused(kvq_model, bits, group_size):
    with pytest.raises(KVQuantizationError, match="kv_"):
        PromptCache.for_model(kvq_model, kv_bits=bits, kv_group_size=group_size)


def test_positions_past_the_context_are_refused_before_the_model_runs(kvq_model):
    limit = kvq_model.config.max_position_embeddings
    cache = kvq_model.make_cache(kv_bits=8)
    with pytest.raises(ContextLengthError, match=f"context of {limit} tokens"):
        prefill(kvq_model, mx.zeros((1, limit + 1), mx.int32), cache)
    assert all(c.offset == 0 for c in cache)  # nothing ran
    assert issubclass(ContextLengthError, GptOssError)
    for c in cache:  # a cache that is full: the next step is refused
        c.offset = limit
    with pytest.raises(ContextLengthError):
        kvq_model(mx.array([[1]]), cache=cache)
    with pytest.raises(ContextLengthError):
        kvq_model.step_rows(mx.array([1]), [cache])


# --------------------------------------------------------------------------- memory estimate

def test_memory_estimate_warns_when_the_machine_is_too_small(kvq_model):
    cfg = kvq_model.config
    per = kv_bytes_per_position(cfg, 8, 64, 2)
    assert per == 2 * (cfg.num_key_value_heads * 64 + 2 * cfg.num_key_value_heads * 2)
    est = estimate_memory(kvq_model, 131072, kv_bits=8, available=1 << 20)
    assert est.total == est.weights + est.kv_cache and not est.fits
    assert "131072 tokens" in est.warning() and "--kv-bits" in est.warning()
    roomy = estimate_memory(kvq_model, 1024, available=1 << 40)
    assert roomy.fits and roomy.warning() is None


# --------------------------------------------------------------------------- the CLI option

@pytest.fixture(scope="module")
def kvq_chat_checkpoint(checkpoint_factory):
    """A chat model (the real vocabulary, for harmony) whose heads MLX can quantize."""
    from mlx_gptoss.harmony import copy_vocabulary

    path = checkpoint_factory("kvq_chat", seed=5, vocab_size=201088, num_hidden_layers=2,
                              head_dim=64)
    copy_vocabulary(path)
    return path


def test_cli_kv_bits_is_checked(chat_checkpoint, tmp_path, capsys):
    from cli_runner import cli, one_line

    code, _, err = cli(capsys, "generate", "-m", tmp_path / "nope", "-p", "hi", "--kv-bits", "3")
    one_line(code, err, "--kv-bits must be one of 4, 8, got 3")
    code, _, err = cli(capsys, "generate", "-m", chat_checkpoint, "-p", "hi", "--kv-bits", "8",
                       "--dtype", "float32")  # head_dim 16: no group size MLX supports
    one_line(code, err, "divide head_dim 16")


@pytest.mark.slow
def test_cli_generate_with_an_8bit_cache(kvq_chat_checkpoint, capsys):
    from cli_runner import cli

    flags = ["generate", "-m", kvq_chat_checkpoint, "-p", "Hello", "--max-tokens", "12",
             "--temp", "0", "--dtype", "float32", "--json", "--no-stats"]
    code, plain, err = cli(capsys, *flags)
    assert code == 0, err
    code, quantized, err = cli(capsys, *flags, "--kv-bits", "8")
    assert code == 0, err

    def events(out: str) -> list[str]:  # every event but the timings
        return [line for line in out.splitlines() if '"generation_tps"' not in line]

    assert events(quantized) == events(plain) and len(events(plain)) >= 2


def test_load_chat_gives_the_chat_a_quantized_cache(kvq_chat_checkpoint):
    from mlx_gptoss.cli.generate import load_chat

    session = load_chat(str(kvq_chat_checkpoint), "float32", effort="low", system=None,
                        developer=None, tools=None, python=False, temperature=None, top_p=None,
                        top_k=None, min_p=None, seed=None, max_tokens=8, max_tool_rounds=1,
                        kv_bits=4)
    try:
        kinds = [type(c) for c in session.cache.layers]
        assert kinds.count(QuantizedKVCache) == 1 and session.cache.layers[1].bits == 4
    finally:
        session.close()
