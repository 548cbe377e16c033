"""The gpt-oss module graph in MLX, stated as plainly as the reference.

block:  h = x + attn(norm(x));  out = h + moe(norm(h))
attn:   GQA with q/k/v/o biases, YaRN RoPE, a learned per-head sink logit in the softmax
        denominator, a sliding window of `sliding_window` keys on the layers that say so.
moe:    router (linear + bias) -> top-k -> softmax over the k; each expert is a clamped SwiGLU
        with MXFP4 weights multiplied in place by `gather_qmm`, never dequantized (or, after
        `fuse --experts`, dense weights by `gather_mm` / 8-bit affine ones by `gather_qmm`).

Parameter names match the Hugging Face checkpoint except the experts, whose gate/up rows are
regrouped (see `formats.hf`).
"""
from __future__ import annotations

import math
import operator
from functools import lru_cache, partial
from itertools import pairwise
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas
from .cache import (KVCache, QuantizedKVCache, SlidingWindowCache, StackedRows,
                    check_kv_quantization, write_step)
from .config import ModelConfig, RopeConfig
from .errors import ContextLengthError
from .mxfp4 import BITS, GROUP_SIZE, MODE

# Above this many (token, expert) pairs, sorting tokens by expert makes gather_qmm read each
# expert's weights once instead of once per token.
_SORT_THRESHOLD = 64


def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin attention factor, computed as transformers does.

    The YaRN correction range is floored/ceiled only when `truncate` is true; the gpt-oss
    checkpoints say false (mlx-lm 0.32 rounds it anyway, which is why it drifts).
    """
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    if rope.type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                ) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    if rope.attention_factor is not None:
        factor = float(rope.attention_factor)
    else:
        factor = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    return inv_freq.astype(np.float32), factor


_QKV = ("q_proj", "k_proj", "v_proj")  # fused into one product by the compiled step


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.window = cfg.sliding_window if sliding else None
        width = cfg.num_attention_heads * cfg.head_dim
        kv_width = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, width, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=True)
        self.o_proj = nn.Linear(width, cfg.hidden_size, bias=True)
        self.sinks = mx.zeros((cfg.num_attention_heads,))
        inv_freq, attention_factor = rope_frequencies(cfg.rope, cfg.head_dim)
        self._rope_periods = mx.array(1.0 / inv_freq)
        # YaRN multiplies cos and sin by `attention_factor` for both q and k, which scales
        # every score by its square: fold that into the softmax scale instead.
        self.scale = attention_factor**2 / math.sqrt(cfg.head_dim)

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._rope_periods)

    def project(self, x: mx.array, offset: int | mx.array
                ) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys, values `[B, heads, T, head_dim]`, rotated for positions `offset...`.

        RoPE acts on each head alone, so queries and keys are rotated in one call: one kernel
        fewer per layer where RoPE is one kernel, a few dozen graph nodes fewer where MLX
        expands it into primitives (its CPU backend)."""
        qk = mx.concatenate([self.q_proj(x), self.k_proj(x)], axis=-1)
        qk = self._rope(split_heads(qk, self.n_heads + self.n_kv_heads), offset)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        return qk[:, : self.n_heads], qk[:, self.n_heads:], v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        """Append k/v to the cache, then each query's weighted values `[B, heads, T, d]`."""
        offset = cache.offset if cache is not None else 0
        history = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(cache, QuantizedKVCache):
            return quantized_attention(q, k, v, self.scale, mask, self.sinks.astype(q.dtype),
                                       cache.group_size, cache.bits)
        if self.window is not None and q.shape[2] > self.window:
            return self._windowed(q, k, v, offset, history, self.sinks.astype(q.dtype))
        return self.weighted_values(q, k, v, mask)

    def weighted_values(self, q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
        """Softmax attention of q over k/v, each head's sink logit in the denominator."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask,
                                                    sinks=self.sinks.astype(q.dtype))

    def step_rotation(self, offsets: mx.array, dtype: mx.Dtype):
        """What `one_token` rotates queries and keys by for positions `offsets [B]`: computed
        once per step and shared by every layer (they share the RoPE and the scale).

        With MLX's RoPE kernel, the offsets themselves. Where `mx.fast.rope` is a composition
        of primitives (`composes_fast_ops`), it rebuilds the cos/sin of each call's positions,
        two dozen graph nodes per layer and token; here they are built once, as one matrix
        per row and head of the fused q/k/v projection, `[B, heads + 2 kv heads, d, d]`: each
        query head's rotation (`rotation_matrices`) with the softmax scale in it, each key
        head's, and the identity for the value heads. RoPE is then one matrix product per
        layer for q, k and v together (the values' an exact copy). Same angles as MLX's
        composition: float32, cos/sin cast to the activations' dtype."""
        if not composes_fast_ops():
            return offsets
        theta = offsets.astype(mx.float32)[:, None] * mx.reciprocal(self._rope_periods)
        cos, sin = mx.cos(theta), mx.sin(theta)
        rotate = rotation_matrices(cos, sin)
        eye = _rotation_pattern(self.head_dim)[0]
        b, d = offsets.shape[0], self.head_dim
        return mx.concatenate([mx.broadcast_to(m.astype(dtype), (b, heads, d, d)) for m, heads in
                               ((rotate * self.scale, self.n_heads), (rotate, self.n_kv_heads),
                                (eye, self.n_kv_heads))], axis=1)

    def one_token(self, h: mx.array, rotation, rows: list[tuple], tables: dict
                  ) -> tuple[mx.array, list[tuple]]:
        """Attention of one new position per row, `h [B, H]` -> `[B, heads * d]`, on fixed-shape
        cache buffers (the compiled step). Row b is `(kind, state, position, shared)`: where its
        cache is written and what is masked (`cache.FullStep`/`RingStep`), its buffers, its
        position (`[1]`), and what this step already prepared for that row (shared by the
        layers of a kind); one entry may stand for all B rows (their caches stacked,
        `cache.StackedRows`, positions `[B]`). Projections are batched; each row attends over
        its own cache alone, padded positions masked. `rotation` is `step_rotation`'s,
        `tables` the block's `step_tables`."""
        b, d = h.shape[0], self.head_dim
        groups = self.n_heads // self.n_kv_heads
        if "qkv" in tables:
            qkv = step_linear(None, tables["qkv"], h)
        else:
            qkv = mx.concatenate([step_linear(self[n], tables.get(n), h) for n in _QKV], axis=-1)
        qk_heads = self.n_heads + self.n_kv_heads
        composed = composes_fast_ops()
        if composed:  # q, k and v rotated by one product (see `step_rotation`)
            heads = qkv.reshape(b, qk_heads + self.n_kv_heads, 1, d) @ rotation
            q, k, v = mx.split(heads, [self.n_heads, qk_heads], axis=1)  # one node
            q = q.reshape(b, self.n_kv_heads, groups, d)
        else:  # one RoPE call for q and k, adjacent in the fused projection
            qk, v = mx.split(qkv, [qk_heads * d], axis=-1)
            qk = self._rope(qk.reshape(b, qk_heads, 1, d), rotation)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads:]
            v = v.reshape(b, self.n_kv_heads, 1, d)
        attended, buffers = [], []
        for i, (kind, state, position, shared) in enumerate(rows):
            one = slice(i, i + 1) if len(rows) > 1 else slice(None)  # one entry: all B rows
            key = (kind, state[0].shape[2])
            if key not in shared:  # the same for every layer of this kind in this row
                shared[key] = kind.prepare(state, position)
            at, mask = shared[key]
            keys, values, new_state = write_step(state, at, k[one], v[one])
            if composed:
                out = composed_attention(q[one], keys, values, mask, tables["sinks"])
            else:
                out = self.weighted_values(q[one], keys, values, mask)
            attended.append(out.reshape(out.shape[0], -1))
            buffers.append(new_state)
        return (attended[0] if len(rows) == 1 else mx.concatenate(attended, axis=0)), buffers

    def step_tables(self, batch: int) -> dict[str, Any]:
        """What `one_token` reads instead of building it per token (see `Model._step_tables`):
        the projections' `linear_table`s (q, k and v as one, `fused_qkv`) and the sinks as
        `composed_attention` takes them."""
        fused = self.fused_qkv()
        if fused is not None:
            bias = mx.concatenate([self[n]["bias"] for n in _QKV])
            tables = {"qkv": (fused.T, mx.broadcast_to(bias, (batch, bias.shape[0])))}
        else:
            tables = {name: linear_table(self[name], batch) for name in _QKV}
        tables["o_proj"] = linear_table(self.o_proj, batch)
        groups = self.n_heads // self.n_kv_heads
        tables["sinks"] = self.sinks.astype(mx.float32).reshape(1, self.n_kv_heads, groups, 1)
        return {k: v for k, v in tables.items() if v is not None}

    def fused_qkv(self) -> mx.array | None:
        """The q, k and v projections' weights as one matrix `[(heads + 2 kv heads) d, H]`,
        the three layers' weights then being views of its rows (one copy in memory, not
        two), so that the step projects with one product instead of three. Made once, and
        again if a weight was replaced; None unless all three are plain biased `nn.Linear`
        of one dtype (LoRA, quantized: the step calls them)."""
        layers = [self[n] for n in _QKV]
        if not all(map(plain_linear, layers)):
            return None
        weights = [layer["weight"] for layer in layers]
        if len({w.dtype for w in weights}) != 1:
            return None
        made = self.__dict__.get("_qkv")
        if made is not None and all(a is b for a, b in zip(made[1:], weights)):
            return made[0]
        fused = mx.concatenate(weights, axis=0)
        starts = np.cumsum([0] + [w.shape[0] for w in weights]).tolist()
        views = [fused[a:b] for a, b in pairwise(starts)]
        mx.eval(fused, views)
        for layer, view in zip(layers, views):
            layer["weight"] = view  # the separate copy is freed
        object.__setattr__(self, "_qkv", (fused, *views))
        return fused

    def output(self, attended: mx.array) -> mx.array:
        b, _, t, _ = attended.shape
        if t > 1:  # one position: `[B, heads, 1, d]` is already in `[B, 1, heads, d]` order
            attended = attended.transpose(0, 2, 1, 3)
        return self.o_proj(attended.reshape(b, t, -1))

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        offset = cache.offset if cache is not None else 0
        return self.output(self.attend(*self.project(x, offset), mask, cache))

    def _windowed(self, q: mx.array, k: mx.array, v: mx.array, offset: int, history: int,
                  sinks: mx.array) -> mx.array:
        """Sliding attention over many queries, in blocks of `window` queries.

        One masked call would score every query of the chunk against every key, most of them
        outside the window; a block scores only the `2 * window - 1` keys it can reach.
        """
        t, outs = q.shape[2], []
        for start in range(0, t, self.window):
            stop = min(start + self.window, t)
            first_key = max(0, history + start - (self.window - 1))
            mask = attention_mask(stop - start, offset + start, history + start - first_key,
                                  self.window)
            keys = slice(first_key, history + stop)
            outs.append(mx.fast.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, keys], v[:, :, keys], scale=self.scale,
                mask=mask, sinks=sinks))
        return mx.concatenate(outs, axis=2)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """`[B, T, heads * d]` -> `[B, heads, T, d]` (one reshape, no transpose, for one token)."""
    b, t, _ = x.shape
    if t == 1:
        return x.reshape(b, heads, 1, -1)
    return x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def plain_linear(layer: nn.Module) -> bool:
    """A biased `nn.Linear` itself (not an adapter, not quantized): what the step tables
    take apart."""
    return type(layer) is nn.Linear and "bias" in layer


def linear_table(layer: nn.Module, batch: int) -> tuple[mx.array, mx.array] | None:
    """A `plain_linear`'s `(W.T, bias)` as the compiled step multiplies them (the bias
    broadcast to `[batch, out]`): views made once (`Model._step_tables`), where calling the
    layer adds a transpose and a broadcast to the graph of every token. None for any other
    layer (LoRA, quantized): the step calls it."""
    if not plain_linear(layer):
        return None
    bias = layer["bias"]
    return layer["weight"].T, mx.broadcast_to(bias, (batch, bias.shape[0]))


def step_linear(layer: nn.Module | None, table: tuple[mx.array, mx.array] | None,
                x: mx.array) -> mx.array:
    """`layer(x)` for `x [B, in]`, from its `linear_table` when it has one."""
    if table is None:
        return layer(x)
    weight_t, bias = table
    return mx.addmm(bias, x, weight_t)


def traced(fn: Callable) -> Callable:
    """`fn` as `mx.compile` should trace it: with the layers' numpy kernels off (`blas`; an
    adapter left in training mode would evaluate inside the trace, which MLX refuses)."""
    def run(*args: Any) -> Any:
        with blas.suspended():
            return fn(*args)
    return run


def composes_fast_ops() -> bool:
    """Whether MLX runs `mx.fast.rope` and `scaled_dot_product_attention` as compositions of
    primitives here (its CPU backend) rather than as kernels of their own (Metal, CUDA).

    The one-token step then composes them itself, with fewer graph nodes (shared rotation
    tables, no copies for the sink column): the kernel choice per device that
    benchmarks/README.md's overhead row measures. The math is the same either way."""
    return mx.default_device() == mx.cpu


@lru_cache(maxsize=None)
def _rotation_pattern(d: int) -> tuple[mx.array, mx.array]:
    """`(I, S)` `[d, d]`: the identity, and S with `S[i, j] = 1` where `i = (j + d/2) % d` (the
    other half of the pair j is in). Constants from numpy, like `_pair_rows`."""
    eye = np.eye(d, dtype=np.float32)
    return mx.array(eye), mx.array(np.roll(eye, d // 2, axis=0))


def rotation_matrices(cos: mx.array, sin: mx.array) -> mx.array:
    """RoPE (the halves' layout) as matrices `[B, 1, d, d]` for the angles' `cos`/`sin`
    `[B, d/2]`: `x @ R` is `(x1 cos - x2 sin, x2 cos + x1 sin)`, each output the sum of two
    products (the other terms are exact zeros)."""
    eye, swap = _rotation_pattern(2 * cos.shape[-1])
    cos_row = mx.concatenate([cos, cos], axis=-1)[:, None, None, :]
    sin_row = mx.concatenate([-sin, sin], axis=-1)[:, None, None, :]
    return eye * cos_row + swap * sin_row


def composed_attention(q: mx.array, keys: mx.array, values: mx.array, mask,
                       sinks: mx.array) -> mx.array:
    """One query per kv-head group, `q [B, Hkv, groups, d]` already scaled, over `keys`/`values`
    `[B, Hkv, L, d]`, with each head's sink logit `sinks [1, Hkv, groups, 1]` (float32) in the
    denominator: `exp(s - logaddexp(logsumexp(s), sink))`, the softmax of the scores with the
    sink column, without building that column. Float32 scores; `mask` a boolean over L or None."""
    scores = (q @ keys.swapaxes(-1, -2)).astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, mx.float32))
    norm = mx.logaddexp(mx.logsumexp(scores, axis=-1, keepdims=True), sinks)
    return mx.exp(scores - norm).astype(q.dtype) @ values


def quantized_attention(q: mx.array, keys: tuple, values: tuple, scale: float, mask,
                        sinks: mx.array, group_size: int, bits: int) -> mx.array:
    """Attention of q `[B, Hq, T, d]` over quantized keys/values `(packed, scales, biases)`
    `[B, Hkv, L, ...]`, with each head's sink logit in the softmax denominator.

    The query heads are grouped under their kv head (GQA) so the keys are read once per group;
    scores come from `quantized_matmul` on the packed keys, a sink column joins them before
    the softmax and leaves after it, and the weights multiply the packed values. `mask` is
    what `attention_mask` returns (None, "causal" or a boolean `[T, L]`)."""
    b, n_heads, t, d = q.shape
    n_kv, length = keys[0].shape[1], keys[0].shape[2]
    groups = n_heads // n_kv
    q = (q * scale).reshape(b, n_kv, groups, t, d)

    def packed(triple: tuple) -> list[mx.array]:
        return [mx.expand_dims(a, 2) for a in triple]  # broadcast over the group

    scores = mx.quantized_matmul(q, *packed(keys), transpose=True, group_size=group_size,
                                 bits=bits)
    if isinstance(mask, str):  # "causal": the queries are the last t keys
        mask = mx.arange(length - t, length)[:, None] >= mx.arange(length)[None, :]
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    sink_column = mx.broadcast_to(sinks.reshape(1, n_kv, groups, 1, 1), (b, n_kv, groups, t, 1))
    weights = mx.softmax(mx.concatenate([scores, sink_column], axis=-1), axis=-1,
                         precise=True)[..., :length]
    out = mx.quantized_matmul(weights, *packed(values), transpose=False, group_size=group_size,
                              bits=bits)
    return out.reshape(b, n_heads, t, d)


class SwitchLinear(nn.Module):
    """One linear layer per expert plus its bias, applied to each token's chosen experts.

    Subclasses differ only in how the weights `[E, out, in]` are stored and so in the one
    gathered matmul (`product`); the bias, the SwiGLU and the routing around them are shared.
    """

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        self.num_experts, self.input_dims, self.output_dims = num_experts, input_dims, output_dims
        self.bias = mx.zeros((num_experts, output_dims))

    def product(self, x: mx.array, experts: mx.array, sorted_experts: bool,
                rows: mx.array | None = None) -> mx.array:
        raise NotImplementedError

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool,
                 rows: mx.array | None = None, bias: bool = True) -> mx.array:
        """`rows`: which row of `x` each `experts` entry multiplies (`gather_qmm`'s
        `lhs_indices`); None builds the default in every product, so `Experts` passes one.
        `bias=False` leaves the bias to the caller (`bias_rows`), to add it in a fused kernel."""
        y = self.product(x, experts, sorted_experts, rows)
        return y + self.bias_rows(experts) if bias else y

    def bias_rows(self, experts: mx.array) -> mx.array:
        """The chosen experts' biases, `[..., k, 1, out]` like the products."""
        return mx.expand_dims(self.bias[experts], -2)


class MXFP4SwitchLinear(SwitchLinear):
    """Experts in MXFP4 as released, multiplied in place by `gather_qmm`."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__(num_experts, input_dims, output_dims)
        self.weight = mx.zeros((num_experts, output_dims, input_dims * BITS // 32), mx.uint32)
        self.scales = mx.zeros((num_experts, output_dims, input_dims // GROUP_SIZE), mx.uint8)

    def product(self, x: mx.array, experts: mx.array, sorted_experts: bool,
                rows: mx.array | None = None) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, None, lhs_indices=rows,
                             rhs_indices=experts, transpose=True, group_size=GROUP_SIZE,
                             bits=BITS, mode=MODE, sorted_indices=sorted_experts)


class DenseSwitchLinear(SwitchLinear):
    """Experts in plain floats (a LoRA update fused exactly, `fuse --experts bf16`)."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__(num_experts, input_dims, output_dims)
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def product(self, x: mx.array, experts: mx.array, sorted_experts: bool,
                rows: mx.array | None = None) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), lhs_indices=rows,
                            rhs_indices=experts, sorted_indices=sorted_experts)


class AffineSwitchLinear(SwitchLinear):
    """Experts affine-quantized (`fuse --experts 8bit`): fine enough steps to keep a fused
    LoRA update, where MXFP4's are not."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int, bits: int,
                 group_size: int):
        super().__init__(num_experts, input_dims, output_dims)
        self.bits, self.group_size = bits, group_size
        groups = input_dims // group_size
        self.weight = mx.zeros((num_experts, output_dims, input_dims * bits // 32), mx.uint32)
        self.scales = mx.zeros((num_experts, output_dims, groups))
        self.biases = mx.zeros((num_experts, output_dims, groups))

    def product(self, x: mx.array, experts: mx.array, sorted_experts: bool,
                rows: mx.array | None = None) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, lhs_indices=rows,
                             rhs_indices=experts, transpose=True, group_size=self.group_size,
                             bits=self.bits, mode="affine", sorted_indices=sorted_experts)


def switch_linear(cfg: ModelConfig, input_dims: int, output_dims: int) -> SwitchLinear:
    """The expert layer for the storage the config records (`ExpertsConfig`)."""
    e = cfg.experts
    if e.format == "dense":
        return DenseSwitchLinear(cfg.num_local_experts, input_dims, output_dims)
    if e.format == "affine":
        return AffineSwitchLinear(cfg.num_local_experts, input_dims, output_dims, e.bits,
                                  e.group_size)
    return MXFP4SwitchLinear(cfg.num_local_experts, input_dims, output_dims)


@partial(mx.compile, shapeless=True)
def clamped_swiglu(gate: mx.array, up: mx.array, gate_bias: mx.array, up_bias: mx.array,
                   limit: float, alpha: float) -> mx.array:
    """gpt-oss's SwiGLU on the biased gate and up halves: gate clamped above, up clamped both
    ways; compiled into one kernel with the bias additions."""
    gate = mx.minimum(gate + gate_bias, limit)
    up = mx.clip(up + up_bias, -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


@lru_cache(maxsize=None)
def _pair_rows(n: int, k: int) -> tuple[mx.array, mx.array]:
    """Which input row each (token, expert) pair of an unsorted `[n, k]` routing multiplies:
    token i's for the gate/up product, its own row of h for the down product.

    Constants made from numpy (never graph nodes, so safe to keep across traces), where
    gather_qmm's default builds them in every product: two nodes per layer and token."""
    pairs = np.arange(n * k, dtype=np.uint32).reshape(n, k)
    return mx.array(pairs // k), mx.array(pairs)


class Experts(nn.Module):
    """Clamped SwiGLU experts. `gate_up` holds the gate rows first, then the up rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.limit = cfg.swiglu_limit
        self.alpha = cfg.swiglu_alpha
        self.gate_up = switch_linear(cfg, cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = switch_linear(cfg, cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        """x `[N, H]`, experts `[N, k]` -> per-expert outputs `[N, k, H]`."""
        n, k = experts.shape
        sort = experts.size >= _SORT_THRESHOLD
        if sort:
            flat = experts.flatten()
            order = mx.argsort(flat)
            unsort = mx.argsort(order)
            inputs = mx.expand_dims(x[order // k], -2)  # [N*k, 1, H], grouped by expert
            experts_used = flat[order]
            up_rows = down_rows = None  # the defaults: each row once, in order
        else:
            inputs = mx.expand_dims(x, -2)  # [N, 1, H]
            up_rows, down_rows = _pair_rows(n, k)
            experts_used = experts
        h = self.gate_up(inputs, experts_used, sort, up_rows, bias=False)
        b, i = self.gate_up.bias_rows(experts_used), self.intermediate
        h = clamped_swiglu(h[..., :i], h[..., i:], b[..., :i], b[..., i:], self.limit, self.alpha)
        y = self.down(h, experts_used, sort, down_rows).squeeze(-2)
        if sort:
            y = y[unsort].reshape(n, k, -1)
        return y


    def one_token(self, x: mx.array, chosen: mx.array, weights: mx.array,
                  residual: mx.array, tables: dict) -> mx.array:
        """`residual + sum_k w_k (down_k + bias_k)` -> `[N, H]` for the compiled step: the
        unsorted products of `__call__`, combined with the routing `weights [N, k]` by one
        `addmm` that also adds the residual. The three biases of each chosen expert come in
        one gather from `step_tables`' `expert_biases` (one kernel where there were three).

        One row (`N == 1`, a single sequence's decode) stays 2-D: `gather_qmm` reads a 2-D
        `x` as that one row, and the combine is a plain `[1, k] @ [k, H]` (the same products,
        bit for bit), four views fewer per layer than the batched shapes."""
        n, k = chosen.shape
        up_rows, down_rows = _pair_rows(n, k)
        one_row = n == 1
        h = self.gate_up(x if one_row else mx.expand_dims(x, -2), chosen, False, up_rows,
                         bias=False)
        i = self.intermediate
        gate_bias, up_bias, down_bias = mx.split(tables["expert_biases"][chosen], [i, 2 * i],
                                                 axis=-1)  # [N, k, 1, 2i + H], one node
        h = clamped_swiglu(*mx.split(h, 2, axis=-1), gate_bias, up_bias, self.limit, self.alpha)
        y = self.down(h, chosen, False, down_rows, bias=False) + down_bias  # [N, k, 1, H]
        if one_row:
            return mx.addmm(residual, weights, y.reshape(k, -1))
        return mx.addmm(residual[:, None], weights[:, None], y.squeeze(-2)).squeeze(1)

    def step_tables(self) -> dict[str, mx.array]:
        """Each expert's gate, up and down biases side by side, `[E, 1, 2i + H]` (a copy:
        E x (2i + H) values per layer)."""
        biases = mx.concatenate([self.gate_up.bias, self.down.bias], axis=-1)
        return {"expert_biases": biases[:, None]}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = Experts(cfg)

    def route(self, x: mx.array, router: tuple | None = None) -> tuple[mx.array, mx.array]:
        """x `[N, H]` -> each token's chosen experts `[N, k]` and their softmax weights.
        Written in as few graph nodes as the math allows (a decode step is a chain of small
        ops, each node costing a dispatch; see `Model._compiled_step`): the top k taken from
        the top of the partition, no negation. `router`: its `linear_table` in the step."""
        logits = step_linear(self.router, router, x)
        first = logits.shape[-1] - self.top_k
        # The choice is discrete: training differentiates through the chosen logits only.
        chosen = mx.stop_gradient(mx.argpartition(logits, kth=first, axis=-1)[:, first:])
        weights = mx.softmax(mx.take_along_axis(logits, chosen, axis=-1), axis=-1, precise=True)
        return chosen, weights

    def __call__(self, x: mx.array) -> mx.array:
        """x `[..., H]`; the k outputs combined by one matmul, no reshape of an input that is
        already `[N, H]`."""
        shape = x.shape
        if x.ndim != 2:
            x = x.reshape(-1, shape[-1])
        return self.mixed(x, *self.route(x)).reshape(shape)

    def mixed(self, x: mx.array, chosen: mx.array, weights: mx.array) -> mx.array:
        """The chosen experts' outputs for `x [N, H]` weighted by the routing: `[N, 1, H]`."""
        return mx.expand_dims(weights, -2) @ self.experts(x, chosen)

    def one_token(self, x: mx.array, residual: mx.array, tables: dict) -> mx.array:
        """`residual + self(x)` for the compiled step, `x [B, H]`, from the block's
        `step_tables`."""
        chosen, weights = self.route(x, tables.get("router"))
        if chosen.size >= _SORT_THRESHOLD:  # many rows: the sorted products read less
            return residual + self.mixed(x, chosen, weights).reshape(x.shape)
        return self.experts.one_token(x, chosen, weights, residual, tables)

    def step_tables(self, batch: int) -> dict[str, Any]:
        """The router's `linear_table` and the experts' bias views; none of them where this
        is not exactly this class (a subclass, e.g. expert parallelism, runs its own call)."""
        if type(self) is not MLP or type(self.experts) is not Experts:
            return {}
        router = linear_table(self.router, batch)
        return {**({"router": router} if router is not None else {}),
                **self.experts.step_tables()}


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool):
        super().__init__()
        self.sliding = sliding
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, sliding)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

        # One-token steps replay traced graphs for everything around the cache update: far
        # less Python per token, and fused kernels.
        self._compiled_inputs = mx.compile(traced(self._attention_inputs), inputs=self)
        self._compiled_outputs = mx.compile(traced(self._outputs), inputs=self)

    def _attention_inputs(self, x: mx.array, offset: int | mx.array):
        return self.self_attn.project(self.input_layernorm(x), offset)

    def _outputs(self, x: mx.array, attended: mx.array) -> mx.array:
        h = x + self.self_attn.output(attended)
        return h + self.mlp(self.post_attention_layernorm(h))

    def step_rows(self, x: mx.array, masks: list, caches: list) -> mx.array:
        """One token for each of `B` independent sequences: x `[B, 1, H]`, row b attending
        over its own cache `caches[b]` (its own length, offset and window) with `masks[b]`.

        Everything but attention runs once for the whole batch (the compiled one-token graphs,
        with a RoPE offset per row); attention runs per row, exactly the single-sequence
        computation, so a row's result does not depend on the others."""
        offsets = mx.array([c.offset for c in caches])
        q, k, v = self._compiled_inputs(x, offsets)
        attended = [self.self_attn.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], masks[b], cache)
                    for b, cache in enumerate(caches)]
        return self._compiled_outputs(x, mx.concatenate(attended, axis=0))

    def fixed_step(self, x: mx.array, rotation, rows: list[tuple], tables: dict
                   ) -> tuple[mx.array, list[tuple]]:
        """One token for each of `B` rows through this block, `x [B, H]`, on their caches'
        fixed-shape buffers, traced inside `Model`'s compiled step (see
        `Attention.one_token` for `rotation` and `rows`; `tables` are `step_tables`')."""
        attn = self.self_attn
        attended, buffers = attn.one_token(self.input_layernorm(x), rotation, rows, tables)
        h = x + step_linear(attn.o_proj, tables.get("o_proj"), attended)
        normed = self.post_attention_layernorm(h)
        if "expert_biases" in tables:
            return self.mlp.one_token(normed, h, tables), buffers
        return h + self.mlp(normed), buffers

    def step_tables(self, batch: int) -> dict[str, Any]:
        """Views of this block's parameters that the compiled step takes as inputs rather
        than making them in every token's graph (transposed weights, broadcast biases,
        reshaped sinks, per-expert bias rows: a transpose, broadcast, reshape or extra
        gather per token each)."""
        return {**self.self_attn.step_tables(batch), **self.mlp.step_tables(batch)}

    def __call__(self, x: mx.array, mask, cache, last_only: bool = False) -> mx.array:
        offset = cache.offset if cache is not None else 0
        if x.shape[1] == 1:
            q, k, v = self._compiled_inputs(x, mx.array(offset))
            return self._compiled_outputs(x, self.self_attn.attend(q, k, v, mask, cache))
        attended = self.self_attn.attend(*self._attention_inputs(x, offset), mask, cache)
        if last_only:  # nothing after this block needs the other positions
            x, attended = x[:, -1:, :], attended[:, :, -1:, :]
        return self._outputs(x, attended)


class GptOssModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [TransformerBlock(cfg, s) for s in cfg.sliding_layers]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


def attention_mask(queries: int, offset: int, history: int, window: int | None):
    """Mask for `queries` new positions starting at `offset`, after `history` cached keys.

    Keys cover positions `offset - history ... offset + queries - 1`. A query at q sees k when
    `k <= q` and, with a window, `k > q - window`. None when nothing needs masking.
    """
    keys = history + queries
    if queries == 1 and (window is None or keys <= window):
        return None
    if window is None and history == offset:
        return "causal"
    q = mx.arange(offset, offset + queries)[:, None]
    k = mx.arange(offset - history, offset + queries)[None, :]
    visible = k <= q
    if window is not None:
        visible = visible & (k > q - window)
    return visible


def check_positions(config, start: int, count: int) -> None:
    """Refuse positions past `max_position_embeddings` (RoPE was never trained there), in
    one line; a config that states no context has no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and start + count > limit:
        raise ContextLengthError(
            f"{start + count} positions exceed the model's context of {limit} tokens "
            f"(max_position_embeddings)")


def module_places(module: dict) -> list[tuple[dict, str]]:
    """Every `(container, key)` in a module's tree that holds an array, a module or a list:
    where a replaced weight or an adapter put in would show."""
    places = []
    for key, value in module.items():
        if isinstance(value, (mx.array, dict, list, tuple)):
            places.append((module, key))
        if isinstance(value, dict):
            places += module_places(value)
        elif isinstance(value, (list, tuple)):
            places += [p for item in value if isinstance(item, dict) for p in module_places(item)]
    return places


class StepTables:
    """The blocks' `step_tables` by batch size, and what says that they, and the compiled
    steps (which hold the blocks' arrays as constants), are stale: the blocks, and the value
    at every place of their trees (`module_places`) when they were made, compared by identity
    every token (one pass in C over ~32 dict reads per layer: 40-60 us at 24 layers, under 1%
    of a token, where handing the model to `mx.compile` as an input cost as much)."""

    def __init__(self):
        self.by_batch: dict[int, list[dict]] = {}
        self.blocks: list = []
        self.places: tuple = ((), ())
        self.values: list = []

    def watch(self, blocks: list) -> None:
        pairs = [pair for block in blocks for pair in module_places(block)]
        self.blocks = list(blocks)
        self.places = tuple(zip(*pairs)) if pairs else ((), ())
        self.values = list(map(dict.get, *self.places))  # kept alive: identities stay unique

    def stale(self, blocks: list) -> bool:
        return (len(blocks) != len(self.blocks) or not all(map(operator.is_, blocks, self.blocks))
                or not all(map(operator.is_, map(dict.get, *self.places), self.values)))

    def clear(self) -> None:
        self.by_batch, self.blocks, self.places, self.values = {}, [], ((), ()), []


class Model(nn.Module):
    """gpt-oss for causal LM: `model(tokens[B, T], cache=None) -> logits[B, T, vocab]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model_type = "gpt_oss"
        self.model = GptOssModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Set by the loader when the vocabulary matrices are stored in another dtype than the
        # rest (see `loading.load_model`): activations are cast to it after the embedding.
        self.activation_dtype: mx.Dtype | None = None
        # The compiled one-token steps, by cache kinds and buffer shapes (see
        # `_compiled_step`); kept out of the module's parameter tree.
        object.__setattr__(self, "_fixed_steps", {})
        object.__setattr__(self, "_stack", None)  # the batched step's rows (`_stacked_step`)
        # The blocks' step tables by batch size, and what they were made from (`_step_tables`).
        object.__setattr__(self, "_tables", StepTables())

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def __repr__(self) -> str:
        """One line, not MLX's tree of every module (hundreds of lines for 24 layers)."""
        def name(dtype: mx.Dtype) -> str:
            return str(dtype).removeprefix("mlx.core.")

        cfg = self.config
        compute, vocab = self.model.norm.weight.dtype, self.model.embed_tokens.weight.dtype
        dtype = name(compute)
        if mx.issubdtype(vocab, mx.floating) and vocab != compute:  # see `activation_dtype`
            dtype += f", vocabulary matrices {name(vocab)}"
        q = cfg.quantization
        quantized = f", {q.mode} {q.bits}-bit {'+'.join(q.modules)}" if q else ""
        e = cfg.experts
        storage = {"mxfp4": "", "dense": " dense", "affine": f" {e.bits}-bit"}[e.format]
        return (f"Model(gpt_oss, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                f"{cfg.num_local_experts}{storage} experts ({cfg.num_experts_per_tok} active), "
                "vocabulary "
                f"{cfg.vocab_size}, {dtype}{quantized})")

    def make_cache(self, sliding_slack: int = 0, kv_bits: int | None = None,
                   kv_group_size: int = 64) -> list[KVCache | SlidingWindowCache]:
        """One cache per layer. `kv_bits` (8 or 4) quantizes the full-attention layers' keys
        and values; sliding layers keep their window exact (it is small whatever the context)."""
        if kv_bits is not None:
            check_kv_quantization(kv_bits, kv_group_size, self.config.head_dim)

        def full() -> KVCache | QuantizedKVCache:
            return KVCache() if kv_bits is None else QuantizedKVCache(kv_bits, kv_group_size)

        return [SlidingWindowCache(self.config.sliding_window, sliding_slack) if layer.sliding
                else full() for layer in self.layers]

    def check_positions(self, start: int, count: int) -> None:
        check_positions(self.config, start, count)

    def __call__(self, inputs: mx.array, cache: list | None = None,
                 last_only: bool = False) -> mx.array:
        """`last_only` computes the last block's MLP and the head for the last position only."""
        return self.head(self.features(inputs, cache, last_only))

    def features(self, inputs: mx.array, cache: list | None = None, last_only: bool = False,
                 wrap_layer: Callable | None = None) -> mx.array:
        """The normalised final activations `[B, T, H]` (what the head multiplies).

        `wrap_layer(layer)` may return a replacement callable per block, e.g. a gradient
        checkpoint for training (see `train.py`), which also computes its loss by chunks of
        these activations instead of the full logits.
        """
        held = next((c for c in cache or () if c is not None), None)
        if held is not None:  # positions past the context are refused before anything runs
            self.check_positions(held.offset, inputs.shape[1])
        return self.final_norm(self.run_layers(self.embed(inputs), cache, last_only, wrap_layer))

    def final_norm(self, x: mx.array) -> mx.array:
        """The last RMSNorm, compiled: where MLX composes `mx.fast.rms_norm` (its CPU
        backend) that is one fused kernel instead of a dozen nodes per decode step."""
        norm = self.model.norm
        return _rms_norm(x, norm.weight, norm.eps)

    def run_layers(self, x: mx.array, cache: list | None, last_only: bool,
                   wrap_layer: Callable | None = None) -> mx.array:
        """The blocks over activations `x [B, T, H]` (a pipeline stage overrides this)."""
        t = x.shape[1]
        if t == 1 and wrap_layer is None and cache is not None and self._fixed_step_ready(cache):
            return self._compiled_step(x, [cache], mx.array([cache[0].offset]))
        caches = cache if cache is not None else [None] * len(self.layers)
        masks: dict[bool, object] = {}
        last = len(self.layers) - 1
        for i, (layer, layer_cache) in enumerate(zip(self.layers, caches)):
            if layer.sliding not in masks:
                offset = layer_cache.offset if layer_cache is not None else 0
                history = layer_cache.length if layer_cache is not None else 0
                window = self.config.sliding_window if layer.sliding else None
                masks[layer.sliding] = attention_mask(t, offset, history, window)
            run = layer if wrap_layer is None else wrap_layer(layer)
            x = run(x, masks[layer.sliding], layer_cache, last_only and i == last)
        return x

    def _compiled_step(self, x: mx.array, caches: Sequence[Sequence[Any]],
                       offsets: mx.array) -> mx.array:
        """One token for each row `b` (its layer caches `caches[b]`) through every block as
        one compiled graph, the cache writes inside.

        Each cache hands out fixed-shape buffers (a full layer's grow 256 positions at a time,
        a sliding layer's ring never changes), so the graph is traced once per growth step
        (or change of the batch's rows, or a window's filling) and replayed per token: no
        Python per layer or row but handing buffers in and out, and MLX fuses across the
        layers' boundaries. `Attention.one_token` is the attention; the rest is the blocks'."""
        kinds = tuple(tuple(c.step_kind() for c in row) for row in caches)
        flat = [c for row in caches for c in row]
        states = [c.step_state() for c in flat]
        x, buffers = self._run_step(kinds, states, x, offsets)
        for c, (keys, values) in zip(flat, buffers):
            c.step_commit(keys, values)
        return x

    def _run_step(self, kinds: tuple, states: list[tuple], x: mx.array, offsets: mx.array
                  ) -> tuple[mx.array, list]:
        """Call the compiled step for these caches with the blocks' step tables."""
        tables = self._step_tables(x.shape[0])  # first: it drops stale steps
        return self._step_for(kinds, states)(x, offsets, states, tables)

    def _step_for(self, kinds: tuple, states: list[tuple]) -> Callable:
        """The compiled step for these cache kinds and buffer shapes: one per key, so that
        dropping the oldest bounds the traces kept (rows of an engine grow their buffers
        independently). The blocks' arrays are constants of the trace (`StepTables` drops
        the traces when one is replaced)."""
        key = (kinds, tuple(s[0].shape for s in states))
        step = self._fixed_steps.pop(key, None)
        if step is None:
            step = mx.compile(traced(partial(self._fixed_layers, kinds)))
            while len(self._fixed_steps) >= MAX_COMPILED_STEPS:
                self._fixed_steps.pop(next(iter(self._fixed_steps)))
        self._fixed_steps[key] = step  # most recently used last
        return step

    def _stacked_step(self, x: mx.array, caches: Sequence[Sequence[Any]],
                      offsets: mx.array) -> mx.array:
        """`_compiled_step` for B rows as one: their caches stacked (`cache.StackedRows`,
        kept from step to step while the rows stay the same), so each layer writes all rows
        with one scatter and attends them with one product, whatever B."""
        stack = self._stack
        if stack is None or not stack.holds(caches):
            old, stack = stack, StackedRows(caches)  # the rows that go on move over first
            if old is not None:
                old.release()  # the others take their buffers back
            object.__setattr__(self, "_stack", stack)
        states = stack.step_state()
        kinds = (stack.step_kinds(),)
        x, buffers = self._run_step(kinds, states, x, offsets)
        stack.step_commit(buffers)
        return x

    def _step_tables(self, batch: int) -> list[dict]:
        """Each block's `step_tables` for `batch` rows, evaluated views made once and handed
        to the compiled step as inputs; made again, and the compiled steps dropped, when
        anything in the blocks was replaced (`StepTables`)."""
        tables = self._tables
        if tables.stale(self.layers):
            tables.clear()  # the replaced arrays are freed as the tables are made again
            self._fixed_steps.clear()
        made = tables.by_batch.get(batch)
        if made is None:
            made = []
            for layer in self.layers:  # layer by layer: one layer's fused copy at a time
                mx.eval(layer.parameters())  # the traces take them as constants
                made.append(layer.step_tables(batch))
                mx.eval(made[-1])
            if len(tables.by_batch) >= MAX_COMPILED_STEPS:
                tables.by_batch.clear()
            tables.by_batch[batch] = made
            tables.watch(self.layers)  # as the tables left them
        return made

    def _fixed_layers(self, kinds: tuple[tuple[type, ...], ...], x: mx.array,
                      offsets: mx.array, states: list[tuple], tables: list[dict]
                      ) -> tuple[mx.array, list]:
        """`states[b * layers + i]`: row b's layer-i cache buffers; returns the new ones in
        the same order. `tables[i]`: block i's `step_tables`."""
        n, (b, _, width) = len(self.layers), x.shape
        x = x.reshape(b, width)
        rotation = self.layers[0].self_attn.step_rotation(offsets, x.dtype)
        # One entry of kinds for all B rows (stacked caches, or B == 1): all positions at
        # once; else one per row.
        positions = [offsets] if len(kinds) == 1 else [offsets[r:r + 1] for r in range(b)]
        masks: list[dict] = [{} for _ in kinds]
        out: list[list] = [[None] * n for _ in kinds]
        for i, layer in enumerate(self.layers):
            rows = [(row_kinds[i], states[r * n + i], positions[r], masks[r])
                    for r, row_kinds in enumerate(kinds)]
            x, buffers = layer.fixed_step(x, rotation, rows, tables[i])
            for r, pair in enumerate(buffers):
                out[r][i] = pair
        return x.reshape(b, 1, width), [pair for row in out for pair in row]

    @staticmethod
    def _fixed_step_ready(caches: Sequence[Any]) -> bool:
        return all(getattr(c, "fixed_step_ready", lambda: False)() for c in caches)

    def step_rows(self, tokens: mx.array, caches: Sequence[Sequence[Any]]) -> mx.array:
        """The next-token logits `[B, vocab]` of `B` sequences, each one token `tokens[b]` on
        top of its own layer caches `caches[b]`: the compiled step when every cache has
        fixed-shape buffers, else `TransformerBlock.step_rows` layer by layer."""
        for rows in caches:
            self.check_positions(rows[0].offset, 1)
        x = self.embed(tokens.reshape(-1, 1))
        if all(self._fixed_step_ready(rows) for rows in caches):
            offsets = mx.array([rows[0].offset for rows in caches])
            if len(caches) > 1 and StackedRows.can_stack(caches):
                x = self._stacked_step(x, caches, offsets)
            else:
                x = self._compiled_step(x, caches, offsets)
            return self.head(self.final_norm(x))[:, -1, :]
        window = self.config.sliding_window
        masks = {sliding: [attention_mask(1, rows[i].offset, rows[i].length,
                                          window if sliding else None) for rows in caches]
                 for sliding, i in self._first_layer_of_each_kind().items()}
        for i, layer in enumerate(self.layers):
            x = layer.step_rows(x, masks[layer.sliding], [rows[i] for rows in caches])
        return self.head(self.final_norm(x))[:, -1, :]

    def _first_layer_of_each_kind(self) -> dict[bool, int]:
        """{sliding?: index of the first such layer}: layers of a kind share their masks."""
        first: dict[bool, int] = {}
        for i, layer in enumerate(self.layers):
            first.setdefault(layer.sliding, i)
        return first

    def embed(self, inputs: mx.array) -> mx.array:
        """Token ids -> activations (in `activation_dtype` when the loader set one)."""
        x = self.model.embed_tokens(inputs)
        return x if self.activation_dtype is None else x.astype(self.activation_dtype)

    def head(self, x: mx.array) -> mx.array:
        """Normalised activations -> logits, in the activations' dtype."""
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        project = head.as_linear if self.config.tie_word_embeddings else head
        if type(head) in (nn.Linear, nn.Embedding) and head.weight.dtype != x.dtype:
            # A dense head kept in its own dtype (see `activation_dtype`): multiply in it.
            return project(x.astype(head.weight.dtype)).astype(x.dtype)
        return project(x)


_rms_norm = mx.compile(mx.fast.rms_norm, shapeless=True)

# Compiled one-token steps kept per model (each one set of cache kinds and buffer shapes).
MAX_COMPILED_STEPS = 32

# Prompt tokens per prefill step: large enough that each expert sees many rows per pass over
# its weights, small enough to bound the full layers' attention scores (benchmarks/README.md).
PREFILL_CHUNK = 2048


def prefill(model: Model, tokens: mx.array, cache: list,
            chunk_size: int = PREFILL_CHUNK) -> mx.array:
    """Run `tokens [B, T]` through the cache in chunks; returns the last position's logits.

    Chunking bounds the attention scores of full layers to `chunk x context`; sliding layers
    attend in window-sized blocks whatever the chunk. Only the caches of the earlier chunks are
    evaluated, so the lazy graph never runs the head (or the last block's MLP) on them; the
    last chunk runs those for its last position only.
    """
    total = tokens.shape[1]
    if total == 0:
        raise ValueError("prefill needs at least one token")
    check_positions(model.config, cache[0].offset, total)  # before any chunk runs
    for start in range(0, total - chunk_size, chunk_size):
        model(tokens[:, start:start + chunk_size], cache=cache)
        mx.eval([c.state for c in cache])
    start = (total - 1) // chunk_size * chunk_size
    logits = model(tokens[:, start:], cache=cache, last_only=True)[:, -1, :]
    mx.eval(logits, [c.state for c in cache])
    return logits
