"""How much memory a model needs at a given context, before it runs.

gpt-oss's full-attention layers keep every position's keys and values; its sliding layers keep a
window. At 131k tokens the full layers' bf16 cache of 20b is 3.2 GB beside 12.8 GB of weights,
more than a 16 GB Mac has. `estimate_memory` adds the parameters' bytes to the caches' bytes at
the requested context (exactly what `KVCache`/`QuantizedKVCache`/`SlidingWindowCache` would
hold, rounded up to their growth step), so a caller can warn before loading gigabytes of prompt.
Activations and MLX's buffer cache come on top; they are bounded by the prefill chunk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.nn as nn

from .cache import KVCache, QuantizedKVCache
from .config import ModelConfig
from .loading import parameter_bytes


def kv_bytes_per_position(config: ModelConfig, kv_bits: int | None = None,
                          kv_group_size: int = 64, dtype_bytes: int = 2) -> int:
    """Bytes one position costs in ONE full-attention layer's cache (keys plus values).

    Quantized rows are `bits/8` bytes per element plus a scale and a bias per group, both in
    the activations' dtype (as `mx.quantize` returns them)."""
    width = config.num_key_value_heads * config.head_dim
    if kv_bits is None:
        return 2 * width * dtype_bytes
    groups = width // kv_group_size
    return 2 * (width * kv_bits // 8 + 2 * groups * dtype_bytes)


def _rounded(positions: int, step: int) -> int:
    return -(-positions // step) * step


def kv_cache_bytes(config: ModelConfig, context: int, kv_bits: int | None = None,
                   kv_group_size: int = 64, dtype_bytes: int = 2, sliding_slack: int = 0) -> int:
    """Bytes of every layer's cache holding `context` positions."""
    full_layers = sum(not s for s in config.sliding_layers)
    sliding_layers = len(config.sliding_layers) - full_layers
    step = QuantizedKVCache.step if kv_bits is not None else KVCache.step
    full = full_layers * _rounded(context, step) * kv_bytes_per_position(
        config, kv_bits, kv_group_size, dtype_bytes)
    kept = min(context, config.sliding_window - 1 + sliding_slack)
    return full + sliding_layers * kept * kv_bytes_per_position(config, None, 0, dtype_bytes)


def machine_memory() -> int | None:
    """Physical memory in bytes (None where the OS does not say). On Apple silicon this is
    the unified memory the GPU shares."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    context: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def warning(self) -> str | None:
        """One line to print before generating, or None when the estimate fits."""
        if self.fits:
            return None
        gib = 1 << 30
        return (f"warning: {self.context} tokens need about {self.total / gib:.1f} GiB "
                f"(weights {self.weights / gib:.1f} GiB + KV cache {self.kv_cache / gib:.1f} "
                f"GiB), more than this machine's {self.available / gib:.1f} GiB; "
                f"try --kv-bits 8 or 4, or a shorter context")


def estimate_memory(model: nn.Module, context: int, kv_bits: int | None = None,
                    kv_group_size: int = 64, sliding_slack: int = 0,
                    available: int | None = None) -> MemoryEstimate:
    """Weights plus KV cache of `model` (ours) at `context` positions, against `available`
    bytes (default: the machine's memory)."""
    config: ModelConfig = model.config
    dtype_bytes = model.model.norm.weight.dtype.size
    if model.activation_dtype is not None:
        dtype_bytes = model.activation_dtype.size
    kv = kv_cache_bytes(config, context, kv_bits, kv_group_size, dtype_bytes, sliding_slack)
    return MemoryEstimate(parameter_bytes(model), kv, context,
                          machine_memory() if available is None else available)
