"""Frozen float32 products through numpy's BLAS while training on MLX's CPU device.

MLX's CPU backend multiplies float32 matrices through the reference BLAS bundled in its
Linux wheel: 1.7 GFLOP/s measured for `x @ W.T` (128 x 2880 by 4096 x 2880 and by
16384 x 2880), 2.9-3.3 for `g @ W`, 3.5-4.2 in bf16 (its own kernel), where numpy's bundled
OpenBLAS does the same float32 products at about 100 GFLOP/s on the same 2 cores
(benchmarks/README.md, "LoRA training step"). A LoRA step multiplies frozen matrices only as
far as the loss and the activations' gradient need, never for a gradient of the matrix
itself, so the frozen dense products (the vocabulary head in `train.py`, the attention
projections and router under a LoRA adapter in `lora.py`) can leave MLX: each is an
`mx.custom_function` whose forward multiplies in numpy, in float32, the same math.

Only forward products move. A numpy call evaluates its input, and an array evaluated while
`value_and_grad` traces keeps its inputs alive to the end of the step: in the forward that
costs nothing (the backward needs those activations anyway), in the backward it kept the
gradients of every layer alive (measured, 2 layers at 20b widths, 128 tokens, 4096-token
vocabulary: step 43.5 s in MLX, 36.2 s with numpy forwards, 33.9 s with numpy VJPs too but a
peak of 2.23 GB instead of 1.67). So the attention's VJP stays MLX's `g @ W` (its faster
orientation, 3.3 GFLOP/s against 1.7 for `x @ W.T`), and the head's gradient is computed
with its value.

Used only in training on the CPU device: the numpy calls evaluate their inputs, which a
compiled graph (the decode step) cannot do, and GPUs multiply faster in MLX.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import mlx.core as mx
import numpy as np

_SUSPENDED = contextvars.ContextVar("blas_suspended", default=False)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def layers_may_use() -> bool:
    """Whether the model's layers may multiply through numpy now: on the CPU device, unless
    `suspended` (while `mx.compile` traces)."""
    return on_cpu() and not _SUSPENDED.get()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Keep the layers on MLX's kernels inside the block: what `mx.compile` traces
    (`model.traced`), where nothing may be evaluated."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def as_numpy(a: mx.array) -> np.ndarray:
    """A float32 numpy view of `a` (evaluated; cast first when it is not float32)."""
    return np.asarray(a if a.dtype == mx.float32 else a.astype(mx.float32))


def frozen_linear(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """`x @ weight.T + bias` differentiable in x only (weight and bias are constants): the
    product by numpy's BLAS in float32, its VJP `g @ weight` by MLX; in x's dtype."""
    shape = x.shape

    @mx.custom_function
    def run(x: mx.array) -> mx.array:
        y = as_numpy(x).reshape(-1, shape[-1]) @ as_numpy(weight).T
        if bias is not None:
            y += as_numpy(bias)
        return mx.array(y.reshape(*shape[:-1], -1)).astype(x.dtype)

    @run.vjp
    def run_vjp(x: mx.array, cotangent: mx.array, _output: mx.array) -> mx.array:
        return (cotangent @ weight).astype(x.dtype)

    return run(x)
