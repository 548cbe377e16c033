"""The compiled one-token step (`Model._compiled_step`) computes what the plain path computes.

The plain path (block by block, caches written by `update_and_fetch`) is itself checked
against transformers in test_model_reference.py; here both run on the same float32 weights
and the same caches, through the situations the fixed-shape buffers must get right: a full
layer's buffer growing mid-decode, a sliding window with slack (masked older keys), forks
and trims of a prompt cache, and caches the step does not handle (quantized, unfilled).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_tokens

from mlx_gptoss.cache import KVCache, PromptCache, QuantizedKVCache, SlidingWindowCache
from mlx_gptoss.loading import load_model
from mlx_gptoss.model import prefill


@pytest.fixture
def plain_only(monkeypatch):
    """Within the test, no cache accepts the compiled step: every token takes the plain path."""
    def disable():
        for cls in (KVCache, SlidingWindowCache):
            monkeypatch.setattr(cls, "fixed_step_ready", lambda self: False)
    return disable


def decode(model, caches, first: mx.array, steps: int) -> list[np.ndarray]:
    """Greedy steps through `model(token, cache)`; the logits of each."""
    out, y = [], first
    for _ in range(steps):
        logits = model(y.reshape(1, 1), cache=caches)[:, -1, :]
        out.append(np.array(logits))
        y = mx.argmax(logits, axis=-1)
    return out


def decode_rows(model, specs, steps: int) -> list[np.ndarray]:
    """Rows prefilled from `specs` `(prompt length, seed, sliding slack)`, then `steps`
    greedy `step_rows` for all of them; the logits of each step."""
    rows = []
    for n, seed, slack in specs:
        caches = model.make_cache(sliding_slack=slack)
        prefill(model, random_tokens(n, seed), caches)
        rows.append(caches)
    tokens, out = mx.arange(3, 3 + len(rows)), []
    for _ in range(steps):
        logits = model.step_rows(tokens, rows)
        out.append(np.array(logits))
        tokens = mx.argmax(logits, axis=-1)
    return out


def compiled_then_plain(model, plain_only, length: int, steps: int, slack: int = 0):
    results = []
    for disable in (lambda: None, plain_only):
        disable()
        caches = model.make_cache(sliding_slack=slack)
        logits = prefill(model, random_tokens(length), caches)
        results.append(decode(model, caches, mx.argmax(logits, axis=-1), steps))
    return results


def test_compiled_step_equals_the_plain_path_while_the_full_buffer_grows(tiny_model,
                                                                       plain_only):
    model = tiny_model
    model._fixed_steps.clear()
    # 250 prompt positions + 12 steps cross the full layers' first 256-position buffer.
    compiled, plain = compiled_then_plain(model, plain_only, 250, 12)
    assert len(model._fixed_steps) == 2  # the compiled step ran, retraced once as it grew
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [int(a.argmax()) for a in compiled] == [int(b.argmax()) for b in plain]


def test_sliding_slack_is_masked_out_of_the_compiled_step(tiny_model, plain_only):
    """With slack the cache holds keys older than the window: the query must not see them."""
    model = tiny_model
    compiled, plain = compiled_then_plain(model, plain_only, 20, 6, slack=3)
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prompt_cache_forks_and_trims_after_compiled_steps(tiny_model, plain_only):
    """A fork continues independently of its parent, and a trim rewinds exactly, whichever
    path wrote the positions."""
    model = tiny_model
    def run():
        cache = PromptCache(model.make_cache(sliding_slack=4))
        first = mx.argmax(prefill(model, random_tokens(30, seed=3), cache.layers), axis=-1)
        head = decode(model, cache.layers, first, 3)
        fork = cache.fork()
        parent = decode(model, cache.layers, mx.array([7]), 4)
        child = decode(model, fork.layers, mx.array([9]), 4)
        for layer in fork.layers:
            layer.trim(2)
        again = decode(model, fork.layers, mx.array([11]), 2)
        return head + parent + child + again

    compiled = run()
    plain_only()
    plain = run()
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_quantized_caches_take_the_plain_path():
    quantized = QuantizedKVCache(8, 32)
    quantized.update_and_fetch(*[mx.ones((1, 2, 4, 32))] * 2)
    assert not quantized.fixed_step_ready()  # packed keys: its own attention, not the step's


@pytest.mark.parametrize("slack", [0, 3])
def test_a_window_not_yet_full_decodes_compiled_as_the_plain_path(tiny_model, plain_only,
                                                                  slack):
    """A 3-token prompt, shorter than the window (8): the ring has its size from the start
    and masks the positions that do not exist yet, while the window fills and after."""
    model = tiny_model
    model._fixed_steps.clear()
    compiled, plain = compiled_then_plain(model, plain_only, 3, 12, slack=slack)
    assert model._fixed_steps  # the compiled step ran from the first token
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_short_row_stacks_with_long_ones(tiny_model, plain_only):
    model = tiny_model
    specs = ((2, 1, 2), (40, 2, 2), (5, 3, 2))
    model._fixed_steps.clear()
    compiled = decode_rows(model, specs, 10)
    assert {shapes[0][0] for _, shapes in model._fixed_steps} == {3}  # stacked throughout
    plain_only()
    for a, b in zip(compiled, decode_rows(model, specs, 10)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _replace_down_bias(m):
    experts = m.layers[1].mlp.experts
    experts.down.bias = experts.down.bias + 1.0


def _replace_k_weight(m):  # one of the three weights fused into one product
    attn = m.layers[2].self_attn
    attn.k_proj.weight = attn.k_proj.weight * 1.5


def _replace_norm_weight(m):  # not in the step tables: a constant of the trace
    norm = m.layers[0].post_attention_layernorm
    norm.weight = norm.weight + 0.5


def _adapt_q(m):  # an adapter put in: the step calls the module instead of its table
    from mlx_gptoss.lora import LoRALinear

    attn = m.layers[0].self_attn
    attn.q_proj = LoRALinear(attn.q_proj, rank=2, scale=1.0)
    attn.q_proj.lora_b = mx.random.normal(attn.q_proj.lora_b.shape, key=mx.random.key(3))
    # Left in training mode (a fresh module's default): inside the compiled step the adapter
    # must still not multiply through numpy (nothing may be evaluated while tracing).
    assert attn.q_proj.training


@pytest.mark.parametrize("replace", [_replace_down_bias, _replace_k_weight,
                                     _replace_norm_weight, _adapt_q],
                         ids=["expert-bias", "fused-weight", "norm-weight", "adapter"])
def test_compiled_step_reads_the_current_weights(checkpoint_factory, plain_only, replace):
    """Weights replaced between tokens (an update, an adapter) are what the next compiled
    step computes with: its tables and traces are made again."""
    m, _ = load_model(checkpoint_factory("tiny"), "float32")
    cache = PromptCache(m.make_cache())
    prefill(m, random_tokens(16), cache.layers)

    def step() -> np.ndarray:  # on a fork: each call starts from the same 16 positions
        return np.array(m(mx.array([[5]]), cache=cache.fork().layers))

    before = step()
    replace(m)
    after = step()
    plain_only()
    plain = step()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, plain, atol=1e-5)


def test_fused_qkv_keeps_one_copy_of_the_weights(tiny_model):
    """After a compiled step the q, k and v weights are views of the one fused matrix the
    step multiplies (same values, no second copy), and stay so from token to token."""
    attn = tiny_model.layers[0].self_attn
    originals = [np.array(getattr(attn, n).weight) for n in ("q_proj", "k_proj", "v_proj")]
    caches = tiny_model.make_cache()
    prefill(tiny_model, random_tokens(12), caches)
    for token in (3, 4):
        mx.eval(tiny_model(mx.array([[token]]), cache=caches))
        fused, *views = attn._qkv
        for name, view, original in zip(("q_proj", "k_proj", "v_proj"), views, originals):
            assert getattr(attn, name).weight is view
            np.testing.assert_array_equal(np.array(view), original)
        np.testing.assert_array_equal(np.array(fused), np.concatenate(originals))


@pytest.mark.parametrize("slacks", [(2, 2, 2), (2, 0, 3)], ids=["stacked", "per-row"])
def test_batched_rows_equal_the_plain_batched_step(tiny_model, plain_only, slacks):
    """`step_rows` over rows of different lengths (one crossing its 256-position buffer,
    so the stack grows mid-run): the compiled step gives each row what the plain per-row
    attention gives, whether the rows' caches are stacked into one buffer per layer (same
    ring sizes) or attend one by one (different slacks, different ring sizes)."""
    model = tiny_model
    specs = list(zip((250, 20, 9), (1, 2, 3), slacks))
    model._fixed_steps.clear()
    compiled = decode_rows(model, specs, 9)
    batches = {shapes[0][0] for kinds, shapes in model._fixed_steps}
    stacked = slacks[0] == slacks[1]
    assert batches == ({3} if stacked else {1})  # buffers [3, ...] stacked, else per row
    plain_only()
    plain = decode_rows(model, specs, 9)
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_stacked_rows_give_their_caches_back_exactly(tiny_model, plain_only):
    """Rows decoded stacked, then read on their own (a fork, a trim, a snapshot, a row
    leaving the batch): each cache holds what the plain path wrote, and the remaining rows
    go on stacked anew."""
    model = tiny_model

    def run():
        rows = [PromptCache(model.make_cache(sliding_slack=3)) for _ in range(3)]
        for n, row in zip((30, 12, 17), rows):
            prefill(model, random_tokens(n, seed=n), row.layers)
        tokens, out = mx.array([1, 2, 3]), []
        for step in range(8):
            live = rows if step < 4 else rows[:2]  # the third row leaves after 4 steps
            logits = model.step_rows(tokens[:len(live)], [r.layers for r in live])
            out.append(np.array(logits))
            tokens = mx.argmax(logits, axis=-1)
            if step == 5:  # a fork of row 0 decoded alone
                fork = rows[0].fork()
                out += decode(model, fork.layers, mx.array([4]), 3)
        for row in rows:
            for layer in row.layers:
                out.append(np.array(layer.state[0]))
        return out

    compiled = run()
    plain_only()
    plain = run()
    assert len(compiled) == len(plain)
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_compiled_steps_kept_are_bounded(tiny_model, monkeypatch):
    model = tiny_model
    import mlx_gptoss.model as model_module

    monkeypatch.setattr(model_module, "MAX_COMPILED_STEPS", 2)
    model._fixed_steps.clear()
    for n in (20, 300, 600):  # three buffer sizes of the full layer: three traces
        caches = model.make_cache()
        prefill(model, random_tokens(n), caches)
        model(mx.array([[1]]), cache=caches)
    assert len(model._fixed_steps) == 2


def test_a_sliding_cache_leaves_its_ring_holding_what_the_plain_path_holds(tiny_model,
                                                                           plain_only):
    """The compiled step keeps a sliding layer as a ring (slot = position % size); asked for
    its keys in order afterwards (a snapshot, a trim, a prefill), it must hold exactly the
    positions, in the order, that the plain path's concatenations keep."""
    model = tiny_model

    def run():
        caches = model.make_cache(sliding_slack=3)
        first = mx.argmax(prefill(model, random_tokens(21, seed=5), caches), axis=-1)
        decode(model, caches, first, 13)  # 13 steps: the ring wraps around (size 8 + 3)
        sliding = [c for c in caches if isinstance(c, SlidingWindowCache)]
        return [(c.offset, c.length, np.array(c.keys), np.array(c.values)) for c in sliding]

    compiled = run()
    plain_only()
    plain = run()
    assert compiled and len(compiled) == len(plain)
    for (offset, length, keys, values), (p_offset, p_length, p_keys, p_values) in zip(
            compiled, plain):
        assert (offset, length) == (p_offset, p_length) == (34, 10)
        np.testing.assert_allclose(keys, p_keys, atol=1e-5)
        np.testing.assert_allclose(values, p_values, atol=1e-5)


def test_the_step_rotation_is_mlx_ropes_arithmetic(tiny_model):
    """Where the step composes RoPE itself, its shared rotation matrices (one per head of
    the fused q/k/v projection) are what `mx.fast.rope` does to each unit vector (bit for
    bit on MLX's CPU composition), for rows at their own positions, and rotate any vector
    as it does; the query heads' also carry the softmax scale, the value heads' are the
    identity. Elsewhere the step hands RoPE the offsets."""
    from mlx_gptoss.model import composes_fast_ops

    attn = tiny_model.layers[0].self_attn  # YaRN, as the checkpoints configure it
    d, kv, heads = attn.head_dim, attn.n_kv_heads, attn.n_heads
    offsets = mx.array([0, 7, 131071])
    rotation = attn.step_rotation(offsets, mx.float32)
    if not composes_fast_ops():
        assert rotation is offsets
        return
    assert rotation.shape == (3, heads + 2 * kv, d, d)
    rotate_q, rotate_k, identity = np.split(np.array(rotation), [heads, heads + kv], axis=1)
    # Row j of R is what RoPE makes of the unit vector e_j: x @ R rotates x.
    units = mx.broadcast_to(mx.eye(d)[None, :, None], (3, d, 1, d))  # d "heads", one each
    rows = np.array(attn._rope(units, offsets)[:, :, 0])
    for h in range(heads):
        np.testing.assert_array_equal(rotate_q[:, h], rows * attn.scale)
    for h in range(kv):
        np.testing.assert_array_equal(rotate_k[:, h], rows)
        np.testing.assert_array_equal(identity[:, h], np.broadcast_to(np.eye(d), (3, d, d)))
    rotate_k = mx.array(rotate_k)
    x = mx.random.normal((3, kv, 2, d), key=mx.random.key(0))  # 2 query heads per kv head
    expected = attn._rope(x.reshape(3, 2 * kv, 1, d), offsets).reshape(x.shape)
    np.testing.assert_allclose(np.array(x @ rotate_k), np.array(expected), rtol=1e-5,
                               atol=1e-6)


def test_composed_attention_equals_mlx_sdpa_with_sinks_and_a_mask():
    from mlx_gptoss.model import composed_attention

    keys_ = [mx.random.key(i) for i in range(4)]
    b, kv, groups, length, d = 2, 2, 3, 11, 16
    q = mx.random.normal((b, kv * groups, 1, d), key=keys_[0])
    k = mx.random.normal((b, kv, length, d), key=keys_[1])
    v = mx.random.normal((b, kv, length, d), key=keys_[2])
    sinks = mx.random.normal((kv * groups,), key=keys_[3])
    mask = (mx.arange(length) <= 6).reshape(1, 1, 1, -1)
    for m in (None, mask):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m,
                                                        sinks=sinks)
        got = composed_attention((q * 0.25).reshape(b, kv, groups, d), k, v, m,
                                 sinks.reshape(1, kv, groups, 1))
        np.testing.assert_allclose(np.array(got.reshape(expected.shape)), np.array(expected),
                                   rtol=1e-5, atol=1e-6)


def test_the_stacked_step_graph_does_not_grow_with_the_rows(tiny_model, tmp_path):
    """Per-step cost is per batch: the compiled step over stacked rows has as many graph
    nodes at 5 rows as at 2 (each row's own attention would add a dozen per layer)."""
    import re

    from mlx_gptoss.cache import StackedRows

    model = tiny_model

    def nodes(batch: int) -> int:
        rows = []
        for r in range(batch):
            caches = model.make_cache(sliding_slack=2)
            prefill(model, random_tokens(20 + 3 * r, seed=r), caches)
            rows.append(caches)
        stack = StackedRows(rows)
        states = stack.step_state()
        mx.eval(states)
        kinds = (tuple(c.step_kind() for c in rows[0]),)
        x = model.embed(mx.zeros((batch, 1), mx.int32))
        offsets = mx.array([r[0].offset for r in rows])
        mx.eval(x, offsets)
        out, buffers = model._step_for(kinds, states)(x, offsets, states, model._step_tables(batch))
        path = tmp_path / f"step-{batch}.dot"
        mx.export_to_dot(str(path), out, *[b for pair in buffers for b in pair])
        stack.release()
        return len(re.findall(r'label ="', path.read_text()))

    two, five = nodes(2), nodes(5)
    assert two > 10 * len(model.layers)  # the whole step was traced
    assert five == two


@pytest.mark.parametrize("batch", [1, 3])
def test_the_fast_kernel_step_equals_the_plain_path(tiny_model, plain_only, monkeypatch, batch):
    """The step as it runs where MLX has RoPE and attention kernels (Metal, CUDA): the same
    results, checked here by making the CPU take that branch (MLX then composes its fast ops
    itself, so the branch's logic is what is tested)."""
    import mlx_gptoss.model as model_module

    monkeypatch.setattr(model_module, "composes_fast_ops", lambda: False)
    model = tiny_model
    model._fixed_steps.clear()

    def run() -> list[np.ndarray]:
        rows = []
        for r in range(batch):
            caches = model.make_cache(sliding_slack=2)
            prefill(model, random_tokens(30 + 5 * r, seed=r), caches)
            rows.append(caches)
        tokens, out = mx.arange(batch), []
        for _ in range(6):
            logits = (model.step_rows(tokens, rows) if batch > 1 else
                      model(tokens.reshape(1, 1), cache=rows[0])[:, -1, :])
            out.append(np.array(logits))
            tokens = mx.argmax(logits, axis=-1)
        return out

    compiled = run()
    assert model._fixed_steps  # the compiled step ran
    model._fixed_steps.clear()  # traces of this branch must not serve later tests
    plain_only()
    plain = run()
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rows_of_very_different_lengths_are_not_stacked(tiny_model, monkeypatch):
    """Padding every full layer to a long row would multiply the short rows' memory: such a
    batch attends row by row (same results), a batch of similar lengths stacks."""
    from mlx_gptoss.cache import StackedRows

    monkeypatch.setattr(StackedRows, "SHORT_SLOTS", 256)
    model = tiny_model

    def rows(*lengths):
        out = []
        for n in lengths:
            caches = model.make_cache()
            prefill(model, random_tokens(n, seed=n), caches)
            out.append(caches)
        return out

    assert StackedRows.can_stack(rows(300, 400, 290))  # 512 slots each: no padding
    assert not StackedRows.can_stack(rows(1100, 20, 30, 40))  # 1280 vs 256: 4 x 1280 > 2 x 2048
    assert StackedRows.can_stack(rows(20, 30))  # short rows always stack


def test_step_tables_are_made_once_per_batch_size(tiny_model):
    """A new batch size makes new tables (the biases are broadcast to it) from the same
    fused q/k/v matrix, and no new trace is needed for the weights: fusing copies the
    weights once, not at every change of the engine's batch."""
    attn = tiny_model.layers[1].self_attn
    rows = []
    for r in range(2):
        caches = tiny_model.make_cache()
        prefill(tiny_model, random_tokens(10 + r, seed=r), caches)
        rows.append(caches)
    mx.eval(tiny_model.step_rows(mx.array([3]), rows[:1]))
    fused, one = attn._qkv[0], tiny_model._tables.by_batch[1]
    mx.eval(tiny_model.step_rows(mx.array([3, 4]), rows))
    mx.eval(tiny_model.step_rows(mx.array([5]), rows[1:]))
    assert attn._qkv[0] is fused
    assert tiny_model._tables.by_batch[1] is one and 2 in tiny_model._tables.by_batch


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_one_rows_experts_equal_its_row_in_a_batch_bit_for_bit(tiny_model, dtype):
    """A single row's step keeps the experts 2-D (`Experts.one_token`: no `[B, 1, H]` views);
    the batched shapes give each row exactly the same numbers, so a sequence decodes the same
    alone as in an engine's batch."""
    block = tiny_model.layers[0]
    hidden = tiny_model.config.hidden_size
    x = mx.random.normal((3, hidden), key=mx.random.key(7)).astype(dtype)
    residual = mx.random.normal((3, hidden), key=mx.random.key(8)).astype(dtype)
    mlp = block.mlp
    batched = mlp.one_token(x, residual, block.step_tables(3))
    for row in range(3):
        alone = mlp.one_token(x[row:row + 1], residual[row:row + 1], block.step_tables(1))
        assert alone.shape == (1, hidden)
        assert mx.array_equal(alone, batched[row:row + 1]).item()
    assert not mx.array_equal(batched[0], batched[1]).item()  # the rows differ: a real check
