"""MXFP4 (OCP MX: E2M1 values, E8M0 scales, 32 values per group along the input dimension).

The hub's `*_blocks` bytes, read as little-endian uint32, are exactly MLX's `mode="mxfp4"`
packing, and its `*_scales` bytes are MLX's scales: repacking is a reinterpretation, never a
dequantization. The numpy helpers here are the independent reference the tests check against.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

GROUP_SIZE = 32
BITS = 4
MODE = "mxfp4"
SCALE_BIAS = 127
# FP4 code -> value; codes 8..15 are the negatives (high bit = sign).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def blocks_to_mlx(blocks: mx.array) -> mx.array:
    """Hub blocks `[..., in/32, 16]` uint8 -> MLX packed weight `[..., in/8]` uint32."""
    *lead, groups, sixteen = blocks.shape
    if sixteen != 16 or blocks.dtype != mx.uint8:
        raise ValueError(f"expected uint8 blocks [..., G, 16], got {blocks.dtype} {blocks.shape}")
    return blocks.reshape(*lead, groups * 16).view(mx.uint32)


def mlx_to_blocks(weight: mx.array) -> mx.array:
    """Inverse of `blocks_to_mlx` (uint32 `[..., in/8]` -> uint8 `[..., in/32, 16]`)."""
    *lead, words = weight.shape
    return weight.view(mx.uint8).reshape(*lead, words // 4, 16)


def deinterleave_rows(x, axis: int = 1):
    """gate_up rows alternate gate, up; regroup them as [all gate rows, all up rows].

    Works on numpy and MLX arrays. Rows are whole MX groups, so bytes move but never change.
    """
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, None, 2)
    even = x[tuple(index)]
    index[axis] = slice(1, None, 2)
    odd = x[tuple(index)]
    return (np.concatenate if isinstance(x, np.ndarray) else mx.concatenate)([even, odd], axis=axis)


def interleave_rows(x, axis: int = 1):
    """Inverse of `deinterleave_rows`: [gate rows, up rows] -> alternating gate, up."""
    half = x.shape[axis] // 2
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, half)
    gate = x[tuple(index)]
    index[axis] = slice(half, None)
    up = x[tuple(index)]
    stack = np.stack if isinstance(x, np.ndarray) else mx.stack
    shape = list(x.shape)
    return stack([gate, up], axis=axis + 1).reshape(shape)


def dequantize_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference dequantization from the OCP definition: `[..., G, 16]`, `[..., G]` -> `[..., G*32]`."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    lo = E2M1_VALUES[blocks & 0x0F]
    hi = E2M1_VALUES[blocks >> 4]
    values = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)  # even=low nibble
    exponent = np.asarray(scales, dtype=np.int32) - SCALE_BIAS
    values = values * np.ldexp(np.float32(1.0), exponent)[..., None].astype(np.float32)
    return values.reshape(*blocks.shape[:-2], -1)


# Rounding thresholds on |x| / scale between consecutive E2M1 magnitudes; ">" at a threshold
# means a tie goes down, ">=" up, so every tie lands on the even code (round half to even).
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
               (3.5, True), (5.0, False))
E2M1_MAX_EXPONENT = 2  # the largest E2M1 value is 6 = 1.5 * 2**2


def quantize_blocks(w: mx.array) -> tuple[mx.array, mx.array]:
    """OCP MX quantization of finite floats `[..., K]` along the last axis, nearest value.

    Per the OCP MX v1.0 definition: a group's scale is 2^(floor(log2(max|x|)) - 2), each element
    is x / scale rounded to the nearest E2M1 value (ties to even, saturating at ±6). Returns hub
    blocks `[..., K/32, 16]` and E8M0 scales `[..., K/32]` (both uint8). MLX's own
    `mx.quantize(mode="mxfp4")` picks scales differently, hence this implementation.
    """
    *lead, k = w.shape
    x = w.astype(mx.float32).reshape(*lead, k // GROUP_SIZE, GROUP_SIZE)
    amax = mx.max(mx.abs(x), axis=-1, keepdims=True)
    # floor(log2(amax)) from the float32 exponent bits; zero and tiny groups clamp to 2^-127.
    exponent = ((amax.view(mx.uint32) >> 23) & 0xFF).astype(mx.int32) - SCALE_BIAS
    shared = mx.clip(exponent - E2M1_MAX_EXPONENT, -SCALE_BIAS, SCALE_BIAS)
    inverse = ((SCALE_BIAS - shared) << 23).astype(mx.uint32).view(mx.float32)  # 2^-shared
    a = mx.abs(x) * inverse  # exact: a power-of-two multiply
    code = mx.zeros(a.shape, dtype=mx.uint8)
    for threshold, tie_up in _THRESHOLDS:
        code = code + ((a >= threshold) if tie_up else (a > threshold)).astype(mx.uint8)
    code = code + (x < 0).astype(mx.uint8) * 8
    pairs = code.reshape(*lead, k // GROUP_SIZE, 16, 2)
    blocks = pairs[..., 0] + pairs[..., 1] * 16  # low nibble = even element
    scales = (shared + SCALE_BIAS).astype(mx.uint8).squeeze(-1)
    return blocks, scales
