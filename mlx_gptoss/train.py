"""LoRA training: loss, optimizer schedule, the loop, checkpoints and resume.

The loss is the mean cross-entropy over the trained tokens of a batch (`train_data`), computed
from the final activations of only those positions, in chunks of `loss_chunk` rows, each chunk
under `mx.checkpoint`: the float32 logits over the 201,088-token vocabulary (1.65 GB per 2,048
positions) never exist for more than one chunk, in the forward or the backward pass (on the
CPU the head is numpy's, one vocabulary slice at a time: `head_kernel`). Gradient
checkpointing runs the blocks' backward one block at a time (`blockwise_loss_and_grad`).
Gradient accumulation sums the per-token loss over micro-batches and divides once by their
trained tokens, so it equals one large batch exactly.

A checkpoint (every `save_every` steps) is a PEFT adapter directory plus the optimizer state
and the step; the data order is a pure function of the seed and the epoch, and dropout draws
are seeded per step, so a resumed run continues the same loss curve.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from . import blas
from .errors import GptOssError
from .lora import AdapterError, read_adapter_tensors, save_adapter, set_adapter_tensors
from .model import Model, attention_mask
from .train_data import Example

OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    warmup: int | None = None  # steps; default 3% of iters (at least 1 when iters > 1)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.0
    grad_accumulation: int = 1
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    seed: int = 0
    loss_chunk: int = 1024

    def warmup_steps(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return max(1, round(0.03 * self.iters)) if self.iters > 1 else 0


# --------------------------------------------------------------------------- loss


@dataclass
class Batch:
    """Padded inputs `[B, T]`, and the flat positions (into `B*T`) and ids of the targets."""

    inputs: mx.array
    positions: mx.array
    targets: mx.array

    @property
    def tokens(self) -> int:
        return int(self.targets.size)


def make_batch(examples: Sequence[Example]) -> Batch:
    """Right-padded inputs (causal attention: padding never reaches a trained position)."""
    width = max(len(e.tokens) for e in examples) - 1
    inputs = np.zeros((len(examples), width), dtype=np.int32)
    positions, targets = [], []
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[row, :n] = e.tokens[:-1]
        trained = np.nonzero(e.weights[1:])[0]
        positions.append(row * width + trained)
        targets.append(e.tokens[1:][trained])
    return Batch(mx.array(inputs), mx.array(np.concatenate(positions).astype(np.int32)),
                 mx.array(np.concatenate(targets).astype(np.int32)))


def _checkpointed(layer: nn.Module) -> Callable:
    """A block whose activations are recomputed in the backward pass instead of kept."""

    def run(x, mask, cache, last_only):
        def inner(params, x):
            layer.update(params)
            return layer(x, mask, cache, last_only)

        return mx.checkpoint(inner)(layer.trainable_parameters(), x)

    return run


# Vocabulary rows per slice of the BLAS head (`_blas_head_loss`): one float32 slice of the
# matrix (8192 x 2880 x 4 B = 94 MB at 20b widths) and its logits exist at a time.
HEAD_SLICE = 8192


def head_matrix(model: Model) -> mx.array | None:
    """The dense vocabulary matrix `[vocab, hidden]` the head multiplies, or None when the
    head is quantized (only MLX's kernels multiply those)."""
    if model.config.tie_word_embeddings:
        head = model.model.embed_tokens
        return head.weight if type(head) is nn.Embedding else None
    head = model.lm_head
    return head.weight if type(head) is nn.Linear and "bias" not in head else None


def head_kernel(model: Model, kernel: str = "auto") -> str:
    """"blas" or "mlx": who multiplies the vocabulary head in the loss.

    "auto" picks "blas" on MLX's CPU device (see `mlx_gptoss.blas`: there MLX's float32
    GEMM is the bundled reference BLAS, 1.7 GFLOP/s measured for `x @ W.T` at
    128 x 2880 x 16384, 2.9 for `g @ W`, its bf16 GEMM 3.5, numpy's OpenBLAS about 100). The
    head is frozen, so the loss needs only its value and its gradient in the activations,
    which `_blas_head_loss` computes in float32. GPUs keep MLX's kernels.
    """
    if kernel not in ("auto", "blas", "mlx"):
        raise ValueError(f"head kernel must be auto, blas or mlx, not {kernel!r}")
    if kernel == "auto":
        kernel = "blas" if blas.on_cpu() else "mlx"
    return kernel if head_matrix(model) is not None else "mlx"


def _blas_head_loss(h: mx.array, targets: mx.array, weight: mx.array, with_grad: bool,
                    slice_rows: int = HEAD_SLICE) -> tuple[np.ndarray, np.ndarray | None]:
    """Sum over rows of `logsumexp(h W^T) - h . W[target]` and its gradient in h, float32,
    through numpy's BLAS, one vocabulary slice at a time (an online logsumexp, as flash
    attention's softmax): neither the logits nor a float32 copy of W ever exist whole.

    With `m` the running maximum and `s = sum exp(l - m)`, the gradient
    `softmax(l) W - W[target]` accumulates as `acc = sum exp(l - m) W_slice`, rescaled
    whenever `m` grows, and is `acc / s - W[target]` at the end: one product per slice for
    the value and one more for the gradient, the two the loss needs anyway.
    """
    x = blas.as_numpy(h)
    n = x.shape[0]
    top = np.full(n, -np.inf, dtype=np.float32)
    total = np.zeros(n, dtype=np.float32)
    acc = np.zeros_like(x) if with_grad else None
    for start in range(0, weight.shape[0], slice_rows):
        w = blas.as_numpy(weight[start:start + slice_rows])
        logits = x @ w.T
        new_top = np.maximum(top, logits.max(axis=1))
        rescale = np.exp(top - new_top)
        np.subtract(logits, new_top[:, None], out=logits)
        np.exp(logits, out=logits)
        total = total * rescale + logits.sum(axis=1)
        if acc is not None:
            acc *= rescale[:, None]
            acc += logits @ w
        top = new_top
    rows = blas.as_numpy(weight[targets])
    loss = (top + np.log(total) - np.einsum("nh,nh->n", x, rows)).sum(dtype=np.float32)
    grad = acc / total[:, None] - rows if acc is not None else None
    return loss, grad


def _blas_chunk_loss(weight: mx.array, targets: mx.array, with_grad: bool) -> Callable:
    """`h -> loss` through `_blas_head_loss`, differentiable in h: the gradient is computed
    with the value when `with_grad` (training), else by a second pass if asked for."""
    found: dict[str, np.ndarray] = {}

    @mx.custom_function
    def run(h: mx.array) -> mx.array:
        loss, grad = _blas_head_loss(h, targets, weight, with_grad)
        if grad is not None:
            found["grad"] = grad
        return mx.array(loss, dtype=mx.float32)

    @run.vjp
    def run_vjp(h: mx.array, cotangent: mx.array, _output: mx.array) -> mx.array:
        grad = found.pop("grad", None)
        if grad is None:
            grad = _blas_head_loss(h, targets, weight, True)[1]
        return (mx.array(grad) * cotangent).astype(h.dtype)

    return run


def loss_sum(model: Model, batch: Batch, *, chunk: int = 1024,
             grad_checkpoint: bool = False, head: str = "auto",
             with_grad: bool = False) -> mx.array:
    """Sum over the batch's trained tokens of -log p(target) (float32).

    `head` chooses the vocabulary head's kernel (`head_kernel`); `with_grad` says the caller
    differentiates the result (the BLAS head then computes its gradient in the same pass).
    """
    h = model.features(batch.inputs, wrap_layer=_checkpointed if grad_checkpoint else None)
    return head_loss_sum(model, h.reshape(-1, h.shape[-1])[batch.positions], batch.targets,
                         chunk=chunk, head=head, with_grad=with_grad)


def head_loss_sum(model: Model, h: mx.array, targets: mx.array, *, chunk: int = 1024,
                  head: str = "auto", with_grad: bool = False) -> mx.array:
    """Sum of -log p(target) from the final normalised activations `h [N, H]` of the trained
    positions, `chunk` rows at a time."""
    if head_kernel(model, head) == "blas":
        weight = head_matrix(model)
        total = mx.array(0.0, dtype=mx.float32)
        for start in range(0, h.shape[0], chunk):
            run = _blas_chunk_loss(weight, targets[start:start + chunk], with_grad)
            total = total + run(h[start:start + chunk])
        return total

    # Several chunks recompute their logits in the backward pass, so that one chunk's exist at
    # a time; a single chunk's logits would coexist with their gradient either way, and
    # recomputing them would only cost another vocabulary-sized matmul.
    recompute = h.shape[0] > chunk

    def chunk_loss(targets: mx.array) -> Callable:
        def run(h: mx.array) -> mx.array:  # the targets stay constants of the checkpoint
            logits = model.head(h).astype(mx.float32)
            picked = mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)
            return (mx.logsumexp(logits, axis=-1) - picked).sum()

        return mx.checkpoint(run) if recompute else run

    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + chunk_loss(targets[start:start + chunk])(h[start:start + chunk])
    return total


def blockwise_loss_and_grad(model: Model, batch: Batch, *, chunk: int = 1024,
                            head: str = "auto") -> tuple[mx.array, dict]:
    """The loss sum and its gradient wrt the adapters, one block at a time: gradient
    checkpointing by hand.

    The forward pass runs outside any transform and keeps only each block's input; the head's
    loss gives the gradient at the last block's output; then each block, last first, is run
    again under `mx.vjp` with that gradient, which yields its adapters' gradients and the
    gradient at its input. One block's activations exist at a time (plus the blocks' inputs),
    and nothing evaluated mid-step outlives its block (an array evaluated while a transform
    traces keeps its inputs to the end of that transform: with `mx.checkpoint` under one
    `value_and_grad` the 512-token, 2-layer peak was 4.06 GB against 2.29 without it). Each
    block's dropout draws are seeded alike in its two runs.
    """
    t = batch.inputs.shape[1]
    window = model.config.sliding_window
    masks = {s: attention_mask(t, 0, 0, window if s else None)
             for s in {layer.sliding for layer in model.layers}}
    seed = int(mx.random.randint(0, 2**30, ()).item())
    x = model.embed(batch.inputs)
    inputs = []
    for i, layer in enumerate(model.layers):
        inputs.append(x)
        mx.random.seed(seed + i)
        x = layer(x, masks[layer.sliding], None, False)
        mx.eval(x)

    def top(x: mx.array) -> mx.array:
        h = model.model.norm(x)
        return head_loss_sum(model, h.reshape(-1, h.shape[-1])[batch.positions],
                             batch.targets, chunk=chunk, head=head, with_grad=True)

    loss, g = mx.value_and_grad(top)(x)
    mx.eval(loss, g)
    found: dict[str, mx.array] = {}
    for i in reversed(range(len(model.layers))):
        layer = model.layers[i]
        named = tree_flatten(layer.trainable_parameters())
        names, params = [n for n, _ in named], [v for _, v in named]

        def block(*args, layer=layer, names=names):
            layer.update(tree_unflatten(list(zip(names, args[:-1]))))
            return layer(args[-1], masks[layer.sliding], None, False)

        mx.random.seed(seed + i)
        _, vjps = mx.vjp(block, [*params, inputs[i]], [g])
        layer.update(tree_unflatten(list(zip(names, params))))  # the arrays, not the tracers
        *grads, g = vjps
        mx.eval(grads, g)
        inputs[i] = None
        found.update({f"model.layers.{i}.{n}": v for n, v in zip(names, grads)})
    return loss, tree_map_with_path(lambda path, _: found[path], model.trainable_parameters())


def loss_and_grad(model: Model, batches: Sequence[Batch], *, chunk: int = 1024,
                  grad_checkpoint: bool = False, head: str = "auto"
                  ) -> tuple[mx.array, dict, int]:
    """Mean loss over all trained tokens of `batches` and its gradient wrt the adapters
    (`grad_checkpoint`: `blockwise_loss_and_grad`)."""
    if grad_checkpoint:
        def value_and_grad(b: Batch) -> tuple[mx.array, dict]:
            return blockwise_loss_and_grad(model, b, chunk=chunk, head=head)
    else:
        value_and_grad = nn.value_and_grad(
            model, lambda b: loss_sum(model, b, chunk=chunk, head=head, with_grad=True))
    total, grads, tokens = mx.array(0.0), None, 0
    for batch in batches:
        loss, g = value_and_grad(batch)  # (one-position batches: see `model.traced`)
        total = total + loss
        grads = g if grads is None else tree_map_add(grads, g)
        tokens += batch.tokens
        mx.eval(total, grads)
    scale = 1.0 / max(tokens, 1)
    grads = tree_unflatten([(k, v * scale) for k, v in tree_flatten(grads)])
    return total * scale, grads, tokens


def tree_map_add(a: dict, b: dict) -> dict:
    flat_b = dict(tree_flatten(b))
    return tree_unflatten([(k, v + flat_b[k]) for k, v in tree_flatten(a)])


def evaluate(model: Model, examples: Sequence[Example], batch_size: int, batches: int = -1,
             chunk: int = 1024) -> float:
    """Mean validation loss per trained token (dropout off)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i, start in enumerate(range(0, len(examples), batch_size)):
        if batches >= 0 and i >= batches:
            break
        batch = make_batch(examples[start:start + batch_size])
        total += loss_sum(model, batch, chunk=chunk).item()
        tokens += batch.tokens
    model.train(was_training)
    return total / max(tokens, 1)


# --------------------------------------------------------------------------- schedule and order


def schedule(config: TrainConfig) -> Callable:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it (TRL's
    `cosine_with_min_lr`, the cookbook's choice)."""
    peak, warmup = config.learning_rate, config.warmup_steps()
    decay = optim.cosine_decay(peak, max(config.iters - warmup, 1), peak * config.min_lr_ratio)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), decay], [warmup])


def batch_indices(n: int, batch_size: int, step: int, accumulation: int, seed: int
                  ) -> list[list[int]]:
    """The example indices of each micro-batch of `step`: epochs of seeded permutations."""
    per_step = batch_size * accumulation
    out = []
    for micro in range(accumulation):
        first = step * per_step + micro * batch_size
        rows = []
        for k in range(first, first + batch_size):
            epoch, offset = divmod(k, n)
            rows.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
        out.append(rows)
    return out


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: Model, optimizer: optim.Optimizer, step: int, path: Path,
                    config: TrainConfig, base_model: str | None) -> Path:
    save_adapter(model, path, base_model)
    state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(path / OPTIMIZER_STATE), state)
    (path / TRAINER_STATE).write_text(json.dumps({"step": step, "config": asdict(config)},
                                                 indent=2) + "\n")
    return path


def latest_checkpoint(adapter_path: Path) -> Path | None:
    found = sorted(adapter_path.glob("checkpoint-*/" + TRAINER_STATE))
    return found[-1].parent if found else None


def restore_checkpoint(model: Model, optimizer: optim.Optimizer, path: Path) -> int:
    """Adapter weights and optimizer state from a checkpoint; returns its step."""
    try:
        step = int(json.loads((path / TRAINER_STATE).read_text())["step"])
        state = mx.load(str(path / OPTIMIZER_STATE))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise AdapterError(f"{path}: unreadable checkpoint ({e})") from None
    set_adapter_tensors(model, read_adapter_tensors(path), str(path))
    optimizer.state = tree_unflatten(list(state.items()))
    return step


# --------------------------------------------------------------------------- the loop


def train(model: Model, train_set: Sequence[Example], adapter_path: str | Path,
          config: TrainConfig, *, val_set: Sequence[Example] = (), resume: bool | str = False,
          base_model: str | None = None, log: Callable[[str], None] = print) -> list[float]:
    """Train the model's adapters; returns the reported training losses (one per step).

    Writes `checkpoint-NNNNNNN/` every `save_every` steps and the final adapter into
    `adapter_path`. `resume=True` continues from the latest checkpoint there (a path: from
    that checkpoint).
    """
    if not train_set:
        raise GptOssError("no training examples")
    if config.batch_size < 1 or config.grad_accumulation < 1 or config.iters < 1:
        raise GptOssError("--iters, --batch-size and --grad-accumulation must be positive")
    adapter_path = Path(adapter_path)
    optimizer = optim.AdamW(learning_rate=schedule(config), weight_decay=config.weight_decay)
    optimizer.init(model.trainable_parameters())
    start = 0
    if resume:
        where = Path(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) \
            else latest_checkpoint(adapter_path)
        if where is None:
            raise GptOssError(f"{adapter_path}: no checkpoint to resume from")
        start = restore_checkpoint(model, optimizer, where)
        log(f"Resuming from {where} at iteration {start}")
    model.train()
    losses: list[float] = []
    window_loss, window_tokens, window_steps, trained_tokens = 0.0, 0, 0, 0
    tic = time.perf_counter()
    mx.reset_peak_memory()
    for step in range(start, config.iters):
        mx.random.seed(config.seed * 1_000_003 + step)  # dropout draws, reproducible on resume
        micro = [make_batch([train_set[i] for i in rows]) for rows in batch_indices(
            len(train_set), config.batch_size, step, config.grad_accumulation, config.seed)]
        loss, grads, tokens = loss_and_grad(model, micro, chunk=config.loss_chunk,
                                            grad_checkpoint=config.grad_checkpoint)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        value = loss.item()
        if not math.isfinite(value):
            raise GptOssError(f"iteration {step + 1}: the loss is {value}; lower "
                              "--learning-rate")
        losses.append(value)
        window_loss += value * tokens
        window_tokens += tokens
        window_steps += 1
        trained_tokens += tokens
        it = step + 1
        if it % config.steps_per_report == 0 or it == config.iters:
            elapsed = time.perf_counter() - tic
            log(f"Iter {it}: Train loss {window_loss / max(window_tokens, 1):.3f}, "
                f"Learning Rate {optimizer.learning_rate.item():.3e}, "
                f"It/sec {window_steps / elapsed:.3f}, Tokens/sec {window_tokens / elapsed:.3f}, "
                f"Trained Tokens {trained_tokens}, "
                f"Peak mem {mx.get_peak_memory() / 1e9:.3f} GB")
            window_loss, window_tokens, window_steps = 0.0, 0, 0
            tic = time.perf_counter()
        if val_set and (it % config.steps_per_eval == 0 or it == config.iters):
            t0 = time.perf_counter()
            val = evaluate(model, val_set, config.batch_size, config.val_batches,
                           config.loss_chunk)
            log(f"Iter {it}: Val loss {val:.3f}, Val took {time.perf_counter() - t0:.3f}s")
            tic += time.perf_counter() - t0
        if config.save_every > 0 and it % config.save_every == 0:
            where = save_checkpoint(model, optimizer, it, adapter_path / f"checkpoint-{it:07d}",
                                    config, base_model)
            log(f"Iter {it}: Saved adapter checkpoint to {where}")
    model.eval()
    save_adapter(model, adapter_path, base_model)
    log(f"Saved final adapter to {adapter_path}")
    return losses
