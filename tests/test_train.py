"""The training loop on a tiny model with the real vocabulary: it learns, and resumes exactly."""
from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss.loading import load
from mlx_gptoss.lora import LoraConfig, apply_lora, load_adapter, lora_modules
from mlx_gptoss.train import (
    TrainConfig,
    batch_indices,
    evaluate,
    loss_sum,
    make_batch,
    schedule,
    train,
)
from mlx_gptoss.train_data import load_examples

COLORS = ["red", "green", "blue", "black", "white", "pink", "grey", "gold"]


def rows(offset: int, n: int) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        c = COLORS[i % len(COLORS)]
        out.append({"messages": [{"role": "user", "content": f"Color {i}?"},
                                 {"role": "assistant", "thinking": f"It is {c}.",
                                  "content": f"The color is {c}."}]})
    return out


@pytest.fixture(scope="module")
def data(chat_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_data")
    for name, (offset, n) in {"train": (0, 6), "valid": (100, 2)}.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(offset, n)))
    return folder


def fresh(chat_checkpoint, **lora):
    model, tok = load(chat_checkpoint, "float32")
    mx.random.seed(0)
    return apply_lora(model, LoraConfig(**{"rank": 4, "alpha": 8, **lora})), tok


def random_examples(seed: int, lengths, vocab: int = 256):
    from mlx_gptoss.train_data import Example

    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, vocab, n).astype(np.int32),
                    (rng.random(n) < 0.6).astype(np.float32)) for n in lengths]


@pytest.fixture(scope="module")
def small_model(checkpoint_factory):
    """A tiny 256-token model with random nonzero adapters on every target."""
    path = checkpoint_factory("lora_accumulate", seed=2, num_hidden_layers=2)
    model, _ = load(path, "float32")
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=2, targets=("all",)))
    rng = np.random.default_rng(0)
    for _, module in lora_modules(model):  # nonzero B, so every factor has a gradient
        module.lora_b = mx.array(rng.normal(0, 0.1, module.lora_b.shape).astype(np.float32))
    return model


def test_chunked_loss_equals_the_full_cross_entropy(small_model):
    examples = random_examples(1, (12, 7, 16))
    batch = make_batch(examples)
    assert batch.tokens == sum(int(e.weights[1:].sum()) for e in examples)
    logits = small_model(batch.inputs).astype(mx.float32).reshape(-1, 256)
    picked = logits[batch.positions]
    want = (mx.logsumexp(picked, -1) -
            mx.take_along_axis(picked, batch.targets[:, None], -1).squeeze(-1)).sum()
    for chunk in (5, 1024):
        for checkpoint in (False, True):
            np.testing.assert_allclose(
                loss_sum(small_model, batch, chunk=chunk, grad_checkpoint=checkpoint).item(),
                want.item(), rtol=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    lr = schedule(TrainConfig(iters=100, learning_rate=1e-3, warmup=10, min_lr_ratio=0.1))
    assert lr(0).item() == 0.0
    assert abs(lr(10).item() - 1e-3) < 1e-9
    assert abs(lr(100).item() - 1e-4) < 1e-9
    assert TrainConfig(iters=1000).warmup_steps() == 30


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(4) for rows in batch_indices(8, 2, step, 1, seed=3) for i in rows]
    assert sorted(seen) == list(range(8))
    assert batch_indices(8, 2, 1, 2, 3) == [batch_indices(8, 2, 2, 1, 3)[0],
                                             batch_indices(8, 2, 3, 1, 3)[0]]


@pytest.mark.slow
def test_short_run_lowers_validation_loss_and_resumes_the_same_curve(chat_checkpoint, data,
                                                                    tmp_path):
    model, tok = fresh(chat_checkpoint, targets=("attention", "router", "experts"))
    train_set = load_examples(data / "train.jsonl", tok)
    val_set = load_examples(data / "valid.jsonl", tok)
    before = evaluate(model, val_set, 4)
    cfg = TrainConfig(iters=6, batch_size=2, learning_rate=1e-2, warmup=1, steps_per_report=2,
                      steps_per_eval=100, save_every=3)
    lines: list[str] = []
    full = train(model, train_set, tmp_path / "a", cfg, val_set=val_set, log=lines.append)
    after = evaluate(model, val_set, 4)
    assert after < before - 0.5, (before, after)
    report = [line for line in lines if "Train loss" in line]
    assert len(report) == 3
    assert re.match(r"Iter 2: Train loss \d+\.\d{3}, Learning Rate [\d.e+-]+, It/sec [\d.]+, "
                    r"Tokens/sec [\d.]+, Trained Tokens \d+, Peak mem [\d.]+ GB", report[0])
    assert any(line.startswith("Iter 6: Val loss") for line in lines)
    assert (tmp_path / "a" / "checkpoint-0000003" / "optimizer.safetensors").is_file()
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()

    # A fresh run resumed from the step-3 checkpoint continues the same curve.
    resumed_model, _ = fresh(chat_checkpoint, targets=("attention", "router", "experts"))
    resumed = train(resumed_model, train_set, tmp_path / "a", cfg, val_set=val_set,
                    resume=str(tmp_path / "a" / "checkpoint-0000003"), log=lines.append)
    np.testing.assert_allclose(resumed, full[3:], rtol=1e-4)
    # The saved final adapter reproduces the trained model.
    reloaded, _ = load(chat_checkpoint, "float32")
    load_adapter(reloaded, tmp_path / "a")
    np.testing.assert_allclose(evaluate(reloaded, val_set, 4), after, rtol=1e-5)


def test_gradient_accumulation_equals_one_large_batch(small_model):
    from mlx.utils import tree_flatten

    from mlx_gptoss.train import loss_and_grad

    examples = random_examples(0, (9, 14, 6, 11))
    one_loss, one, _ = loss_and_grad(small_model, [make_batch(examples)])
    acc_loss, acc, _ = loss_and_grad(small_model, [make_batch(examples[:2]),
                                                   make_batch(examples[2:])])
    np.testing.assert_allclose(acc_loss.item(), one_loss.item(), rtol=1e-5)
    flat_acc = dict(tree_flatten(acc))
    for name, g in tree_flatten(one):
        np.testing.assert_allclose(np.array(flat_acc[name]), np.array(g), rtol=1e-4, atol=1e-7)
    assert all(np.abs(np.array(g)).max() > 0 for _, g in tree_flatten(one))


def test_train_resume_on_a_small_vocabulary(checkpoint_factory, tmp_path):
    """The fast tier's loop check: a learnable sequence set, 4 steps, resumed from step 2."""
    path = checkpoint_factory("lora_accumulate", seed=2, num_hidden_layers=2)
    examples = random_examples(5, (10, 10, 10, 10))

    def run(resume=False):
        model, _ = load(path, "float32")
        mx.random.seed(1)
        apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets=("attention",)))
        cfg = TrainConfig(iters=4, batch_size=2, learning_rate=2e-2, warmup=1,
                          steps_per_report=1, save_every=2)
        return train(model, examples, tmp_path, cfg, resume=resume, log=lambda line: None), model

    losses, model = run()
    assert (tmp_path / "checkpoint-0000002" / "trainer_state.json").is_file()
    assert evaluate(model, examples, 4) < losses[0] - 0.3
    resumed, _ = run(resume=True)  # the latest checkpoint: step 4, nothing left to do
    assert resumed == []
    import shutil
    shutil.rmtree(tmp_path / "checkpoint-0000004")
    resumed, _ = run(resume=True)
    np.testing.assert_allclose(resumed, losses[2:], rtol=1e-5)


# ---- the vocabulary head's kernels (train.head_kernel) ------------------------------------


def assert_close_norm(got, want, name, rtol=1e-5):
    """Float32 products summed in another order: equal to `rtol` of the tensor's norm (as
    the PEFT tests compare), not elementwise on the smallest entries."""
    got, want = np.array(got), np.array(want)
    assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want), name


def _float64_head_loss(h, w, targets):
    logits = h.astype(np.float64) @ w.astype(np.float64).T
    top = logits.max(axis=1, keepdims=True)
    p = np.exp(logits - top)
    lse = top[:, 0] + np.log(p.sum(axis=1))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(targets)), targets] -= 1
    return (lse - logits[np.arange(len(targets)), targets]).sum(), p @ w.astype(np.float64)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("slice_rows", [7, 64])
def test_blas_head_loss_equals_a_float64_oracle(dtype, slice_rows):
    from mlx_gptoss.train import _blas_head_loss

    rng = np.random.default_rng(3)
    h = rng.normal(size=(6, 16)).astype(np.float32)
    # Rows growing along the vocabulary: the running maximum rises from slice to slice, so
    # the online logsumexp's rescaling is exercised.
    w = (rng.normal(size=(37, 16)) * np.linspace(0.2, 2.0, 37)[:, None]).astype(np.float32)
    weight = mx.array(w).astype(dtype)
    targets = np.array([0, 36, 5, 5, 20, 8], dtype=np.int32)
    loss, grad = _blas_head_loss(mx.array(h), mx.array(targets), weight, True, slice_rows)
    want_loss, want_grad = _float64_head_loss(h, np.array(weight.astype(mx.float32)), targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)
    value_only, none = _blas_head_loss(mx.array(h), mx.array(targets), weight, False, slice_rows)
    assert none is None and value_only == loss


def test_head_kernels_agree_on_the_loss_and_every_gradient(small_model):
    from mlx.utils import tree_flatten

    from mlx_gptoss.train import head_kernel, loss_and_grad

    assert head_kernel(small_model) == "blas"  # the tests run on MLX's CPU device
    batch = make_batch(random_examples(4, (13, 8, 10)))
    for chunk in (4, 1024):
        mlx_loss, mlx_grads, _ = loss_and_grad(small_model, [batch], chunk=chunk, head="mlx")
        blas_loss, blas_grads, _ = loss_and_grad(small_model, [batch], chunk=chunk, head="blas")
        np.testing.assert_allclose(blas_loss.item(), mlx_loss.item(), rtol=1e-5)
        want = dict(tree_flatten(mlx_grads))
        for name, g in tree_flatten(blas_grads):
            assert np.abs(np.array(want[name])).max() > 0
            assert_close_norm(g, want[name], name)
    # Differentiated without `with_grad` (a caller of loss_sum), the head recomputes its
    # gradient in its VJP: the same gradients (of the sum, not the mean).
    import mlx.nn as nn

    _, again = nn.value_and_grad(small_model, lambda b: loss_sum(small_model, b, head="blas"))(
        batch)
    for name, g in tree_flatten(again):
        assert_close_norm(g / batch.tokens, want[name], name)


def test_a_quantized_head_stays_on_mlx(checkpoint_factory):
    import mlx.nn as nn

    from mlx_gptoss.train import head_kernel, head_matrix

    model, _ = load(checkpoint_factory("lora_accumulate", seed=2, num_hidden_layers=2),
                    "float32")
    assert head_matrix(model) is model.lm_head.weight
    model.lm_head = nn.QuantizedLinear.from_linear(model.lm_head, group_size=32, bits=8)
    assert head_matrix(model) is None and head_kernel(model, "blas") == "mlx"
    with pytest.raises(ValueError, match="head kernel"):
        head_kernel(model, "numpy")


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_blas_linear_layers_in_training_equal_mlx(small_model, grad_checkpoint):
    """In training mode on the CPU, the LoRA-wrapped attention and router multiply their
    frozen base through numpy's BLAS (`mlx_gptoss.blas`): the same loss and gradients as
    MLX's own products (eval mode), with the layers recomputed under a checkpoint too."""
    from mlx.utils import tree_flatten

    from mlx_gptoss.train import loss_and_grad

    batch = make_batch(random_examples(6, (11, 9)))
    results = {}
    for training in (True, False):
        small_model.train(training)
        results[training] = loss_and_grad(small_model, [batch], head="mlx",
                                          grad_checkpoint=grad_checkpoint)
    small_model.eval()
    (blas_loss, blas_grads, _), (mlx_loss, mlx_grads, _) = results[True], results[False]
    np.testing.assert_allclose(blas_loss.item(), mlx_loss.item(), rtol=1e-5)
    want = dict(tree_flatten(mlx_grads))
    for name, g in tree_flatten(blas_grads):
        assert np.abs(np.array(want[name])).max() > 0
        assert_close_norm(g, want[name], name)


def test_frozen_linear_is_the_linear_layer():
    import mlx.nn as nn

    from mlx_gptoss.blas import frozen_linear

    layer = nn.Linear(6, 5)
    x = mx.random.normal((2, 3, 6), key=mx.random.key(0))
    g = mx.random.normal((2, 3, 5), key=mx.random.key(1))
    want, (want_dx,) = layer(x), mx.vjp(layer, [x], [g])[1]
    got = frozen_linear(x, layer.weight, layer.bias)
    (dx,) = mx.vjp(lambda x: frozen_linear(x, layer.weight, layer.bias), [x], [g])[1]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(dx), np.array(want_dx), rtol=1e-6, atol=1e-6)
    no_bias = frozen_linear(x, layer.weight, None)
    np.testing.assert_allclose(np.array(no_bias), np.array(want - layer.bias), rtol=1e-6,
                               atol=1e-6)


def test_new_adapters_follow_the_model_mode(checkpoint_factory):
    """A fresh module trains by default; adapters put on an eval-mode model (as `load`
    leaves it) must not: no dropout and no training kernels until `model.train()`."""
    model, _ = load(checkpoint_factory("lora_accumulate", seed=2, num_hidden_layers=2),
                    "float32")
    assert not model.training
    apply_lora(model, LoraConfig(rank=2, dropout=0.1, targets=("attention",)))
    assert not any(m.training for _, m in lora_modules(model))
    model.train()
    assert all(m.training for _, m in lora_modules(model))


# ---- gradient checkpointing, block by block (train.blockwise_loss_and_grad) ---------------


def test_blockwise_checkpointing_equals_one_pass(checkpoint_factory):
    """Adapters on one layer only (the other block passes the gradient through), both head
    kernels, training mode (the BLAS linears): the same loss and every gradient."""
    from mlx.utils import tree_flatten

    from mlx_gptoss.train import loss_and_grad

    model, _ = load(checkpoint_factory("lora_accumulate", seed=2, num_hidden_layers=2),
                    "float32")
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=2, targets=("all",), layers=(0,)))
    rng = np.random.default_rng(0)
    for _, module in lora_modules(model):
        module.lora_b = mx.array(rng.normal(0, 0.1, module.lora_b.shape).astype(np.float32))
    model.train()
    batch = make_batch(random_examples(7, (12, 9)))
    for head in ("blas", "mlx"):
        one_loss, one, _ = loss_and_grad(model, [batch], head=head)
        ckpt_loss, ckpt, _ = loss_and_grad(model, [batch], head=head, grad_checkpoint=True)
        np.testing.assert_allclose(ckpt_loss.item(), one_loss.item(), rtol=1e-6)
        want = dict(tree_flatten(one))
        assert set(want) == {n for n, _ in tree_flatten(ckpt)} and len(want) == 14
        for name, g in tree_flatten(ckpt):
            assert np.abs(np.array(want[name])).max() > 0
            assert_close_norm(g, want[name], name)


def test_blockwise_checkpointing_draws_each_block_s_dropout_once(checkpoint_factory):
    """With dropout, a block's recomputation must see its forward pass's masks: the gradient
    equals one differentiated pass that seeds each block as the blockwise pass does."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gptoss.model import attention_mask
    from mlx_gptoss.train import blockwise_loss_and_grad, head_loss_sum

    model, _ = load(checkpoint_factory("lora_accumulate", seed=2, num_hidden_layers=2),
                    "float32")
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=2, dropout=0.3, targets=("attention",)))
    rng = np.random.default_rng(1)
    for _, module in lora_modules(model):
        module.lora_b = mx.array(rng.normal(0, 0.1, module.lora_b.shape).astype(np.float32))
    model.train()
    batch = make_batch(random_examples(8, (10,)))
    mx.random.seed(5)
    loss, grads = blockwise_loss_and_grad(model, batch)
    mx.random.seed(5)
    seed = int(mx.random.randint(0, 2**30, ()).item())

    def reference(batch):
        x = model.embed(batch.inputs)
        for i, layer in enumerate(model.layers):
            mx.random.seed(seed + i)
            window = model.config.sliding_window if layer.sliding else None
            x = layer(x, attention_mask(x.shape[1], 0, 0, window), None, False)
        h = model.model.norm(x)
        return head_loss_sum(model, h.reshape(-1, h.shape[-1])[batch.positions], batch.targets,
                             with_grad=True)

    want_loss, want = nn.value_and_grad(model, reference)(batch)
    np.testing.assert_allclose(loss.item(), want_loss.item(), rtol=1e-6)
    want = dict(tree_flatten(want))
    for name, g in tree_flatten(grads):
        assert_close_norm(g, want[name], name)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_one_token_rows_train(small_model, grad_checkpoint):
    """A one-position batch takes the blocks' compiled one-token path: the training kernels
    (numpy, which cannot run inside a compiled graph) must not be used there."""
    from mlx_gptoss.train import loss_and_grad

    small_model.train()
    try:
        batch = make_batch(random_examples(9, (2, 2)))
        loss, _, _ = loss_and_grad(small_model, [batch], grad_checkpoint=grad_checkpoint)
        assert np.isfinite(loss.item())
    finally:
        small_model.eval()
