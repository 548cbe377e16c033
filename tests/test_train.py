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
