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


def dequantize_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference dequantization from the OCP definition: `[..., G, 16]`, `[..., G]` -> `[..., G*32]`."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    lo = E2M1_VALUES[blocks & 0x0F]
    hi = E2M1_VALUES[blocks >> 4]
    values = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)  # even=low nibble
    exponent = np.asarray(scales, dtype=np.int32) - SCALE_BIAS
    values = values * np.ldexp(np.float32(1.0), exponent)[..., None].astype(np.float32)
    return values.reshape(*blocks.shape[:-2], -1)
