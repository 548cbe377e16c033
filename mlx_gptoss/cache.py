"""KV caches: a growing one for full-attention layers, a bounded one for sliding layers, and
`PromptCache`, which reuses them across calls.

Both layer caches follow mlx-lm's cache interface (`update_and_fetch`, `offset`, `state`,
`is_trimmable`, `trim`) so mlx-lm's generation utilities can drive the model. The sliding cache
keeps only the `window - 1` keys the next query can still see, plus an optional `slack` of older
ones so a prompt cache can be trimmed back a little without recomputation.

Rewinding a sliding cache further than its slack is impossible by trimming: the keys are gone.
`PromptCache` therefore also keeps *snapshots* (the sliding layers' arrays are immutable, so a
snapshot is a few references, O(window) memory): one at the end of every prompt prefill, which is
where a chat's next turn departs from what was generated when it drops the turn's analysis. Not
every departure is there: a tool call re-rendered with the recipient first departs after the
round's analysis, a few tokens before the generated end, which the sliding layers' slack covers.
A rewind uses, in order: plain trimming, the latest snapshot at or before the common prefix, a
full re-prefill. Each is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from .errors import KVQuantizationError


@lru_cache(maxsize=64)
def _slots(size: int) -> mx.array:
    """`[1, 1, 1, size]` slot indices, a constant made from numpy (no graph node per step)."""
    return mx.array(np.arange(size, dtype=np.int32).reshape(1, 1, 1, size))


def write_step(state: tuple, at: mx.array, k: mx.array, v: mx.array):
    """The compiled one-token step's cache write: the new key and value of each row into its
    slot `at` (`[rows]`) of the buffers `state` `[rows, heads, slots, d]`, in place (MLX
    donates the buffers: no copy). Returns (keys, values, new buffers)."""
    if k.shape[0] == 1:
        keys = mx.slice_update(state[0], k, at, axes=(2,))
        values = mx.slice_update(state[1], v, at, axes=(2,))
    else:  # stacked rows (`StackedRows`), each at its own position: one scatter
        where = mx.broadcast_to(at.reshape(-1, 1, 1, 1), k.shape)
        keys = mx.put_along_axis(state[0], where, k, axis=2)
        values = mx.put_along_axis(state[1], where, v, axis=2)
    return keys, values, (keys, values)


@dataclass(frozen=True)
class FullStep:
    """Where the compiled one-token step writes a full layer's buffer and what it masks: the
    new position at the row's offset, the positions after it hidden (the buffer grows in
    steps of `KVCache.step`, so it is longer than the sequence). `position` is an array `[1]`,
    so one trace serves every position."""

    @staticmethod
    def prepare(state: tuple, position: mx.array) -> tuple[mx.array, mx.array]:
        """(the slot to write, the mask `[rows, 1, 1, slots]`) for the rows' positions
        `[rows]`: built once per step for all layers of the kind."""
        return position, _slots(state[0].shape[2]) <= position.reshape(-1, 1, 1, 1)


@dataclass(frozen=True)
class RingStep:
    """The same for a sliding layer's ring (`SlidingWindowCache.step_state`): the new
    position into slot `position % ring size`; slot s then holds the position `age` =
    `(position - s) % ring size` before it, and the query sees the last `window` positions
    that exist (`age < window` and `age <= position`). `masked` is False when that is every
    slot (no slack, a full window): no mask at all."""

    window: int
    masked: bool = True

    def prepare(self, state: tuple, position: mx.array) -> tuple[mx.array, mx.array | None]:
        size = state[0].shape[2]
        if not self.masked:
            return position % size, None
        position = position.reshape(-1, 1, 1, 1)
        age = (position - _slots(size)) % size
        return position.reshape(-1) % size, (age < self.window) & (age <= position)


class _Unstacked:
    """A full layer cache's `keys`/`values`: taken back from the stack first when the cache
    is in one (`StackedRows`), so no reader sees a stacked cache's stale buffers."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, cache: Any, owner: type | None = None) -> Any:
        if cache is None:
            return self
        if cache._stack is not None:
            cache._unstack()
        return getattr(cache, self.slot)

    def __set__(self, cache: Any, value: Any) -> None:
        if cache._stack is not None:
            cache._unstack()
        setattr(cache, self.slot, value)


_FULL_STEP = FullStep()
_ring_step = lru_cache(maxsize=None)(RingStep)  # asked for every step: made once each


class KVCache:
    """Keys and values of every position so far, grown in steps to avoid a copy per token."""

    step = 256

    def __init__(self) -> None:
        self._keys: mx.array | None = None
        self._values: mx.array | None = None
        self._stack: tuple[StackedRows, int, int] | None = None  # (stack, row, layer)
        self.offset = 0

    keys = _Unstacked()
    values = _Unstacked()

    def _unstack(self) -> None:
        """Take this row's buffers back from the stack it was decoding in (a copy, so the
        stack's memory can go) and leave it (see `StackedRows`)."""
        stack, row, layer = self._stack
        self._stack = None
        self._keys, self._values = stack.take(row, layer)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        new = keys.shape[2]
        end = self.offset + new
        self._reserve(end, keys, values)
        self.keys[..., self.offset:end, :] = keys
        self.values[..., self.offset:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _reserve(self, end: int, keys: mx.array, values: mx.array) -> None:
        """Room for positions up to `end`, grown in whole steps (shaped like `keys`/`values`)."""
        if self.keys is not None and end <= self.keys.shape[2]:
            return
        grow = ((end - self.offset + self.step - 1) // self.step) * self.step
        b, h, _, _ = keys.shape

        def extend(old: mx.array | None, like: mx.array) -> mx.array:
            fresh = mx.zeros((b, h, grow, like.shape[-1]), dtype=like.dtype)
            if old is None:
                return fresh
            return mx.concatenate([old[..., : self.offset, :], fresh], axis=2)

        self.keys, self.values = extend(self.keys, keys), extend(self.values, values)

    # The compiled one-token step (`model.Model._compiled_step`) works on fixed-shape
    # buffers: `step_state` hands them out (with room for one more position), `step_kind`
    # says how the trace writes and masks them (`FullStep`), `step_commit` takes them back.

    def fixed_step_ready(self) -> bool:
        return self._stack is not None or self._keys is not None

    @property
    def slots(self) -> int:
        """Positions the buffer has room for (the stack's, while stacked)."""
        if self._stack is not None:
            stack, _, layer = self._stack
            return stack.buffers[layer][0].shape[2]
        return 0 if self._keys is None else self._keys.shape[2]

    def step_state(self) -> tuple[mx.array, mx.array]:
        """The keys and values buffers, with room for one more position."""
        self._reserve(self.offset + 1, self.keys, self.values)
        return self.keys, self.values

    def step_kind(self) -> "FullStep":
        return _FULL_STEP

    def step_commit(self, keys: mx.array, values: mx.array) -> None:
        self.keys, self.values = keys, values
        self.step_advance()

    def step_advance(self) -> None:
        """One position written by the step (into these buffers or the stack's)."""
        self.offset += 1

    @property
    def length(self) -> int:
        """How many positions the next call will see before its own."""
        return self.offset

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def snapshot(self) -> int:
        """Positions before the snapshot are never overwritten, so the offset suffices."""
        return self.offset

    def restore(self, snapshot: int) -> None:
        if snapshot > self.offset:
            raise ValueError(f"cannot restore position {snapshot} in a cache at {self.offset}")
        self.offset = snapshot

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def fork(self) -> "KVCache":
        """An independent copy that shares the held positions until either one writes.

        MLX's slice assignment rewrites the array object in place, so the copy gets array
        objects of its own (views of the same buffer: the first write beyond them copies)."""
        copy = KVCache()
        if self.keys is not None:
            copy.keys = self.keys[..., : self.offset, :]
            copy.values = self.values[..., : self.offset, :]
        copy.offset = self.offset
        return copy


# What `mx.quantize` accepts: the bit widths a KV cache may use and its group sizes.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def check_kv_quantization(bits: int, group_size: int, head_dim: int) -> None:
    """Refuse, in one line, a KV quantization MLX cannot do on this model's heads."""
    if bits not in KV_BITS:
        raise KVQuantizationError(f"kv_bits must be one of {KV_BITS}, got {bits!r}")
    if group_size not in KV_GROUP_SIZES or head_dim % group_size:
        raise KVQuantizationError(
            f"kv_group_size must be one of {KV_GROUP_SIZES} and divide head_dim {head_dim}, "
            f"got {group_size!r}")


class QuantizedKVCache(KVCache):
    """A full-attention layer's keys and values, quantized (affine, `bits` per element, one
    scale and bias per `group_size` elements of a head's row) as they arrive.

    `update_and_fetch` returns `(packed, scales, biases)` triples for keys and for values,
    which `Attention` multiplies in place with `mx.quantized_matmul`: nothing is dequantized,
    so the cache's memory is what a long context costs. Positions, trimming and snapshots are
    `KVCache`'s (only the offset moves); only what is stored differs.
    """

    def __init__(self, bits: int = 8, group_size: int = 64) -> None:
        super().__init__()
        self.bits = bits
        self.group_size = group_size

    def fixed_step_ready(self) -> bool:
        """Its attention multiplies packed keys: the compiled step's dense path does not apply."""
        return False

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        new = keys.shape[2]
        end = self.offset + new
        qk, qv = (mx.quantize(x, group_size=self.group_size, bits=self.bits)
                  for x in (keys, values))
        if self.keys is None or end > self.keys[0].shape[2]:
            grow = ((new + self.step - 1) // self.step) * self.step

            def extend(old, like):
                fresh = tuple(mx.zeros((*a.shape[:2], grow, a.shape[-1]), dtype=a.dtype)
                              for a in like)
                if old is None:
                    return fresh
                return tuple(mx.concatenate([o[..., : self.offset, :], f], axis=2)
                             for o, f in zip(old, fresh))

            self.keys, self.values = extend(self.keys, qk), extend(self.values, qv)
        for held, fresh in ((self.keys, qk), (self.values, qv)):
            for a, b in zip(held, fresh):
                a[..., self.offset:end, :] = b
        self.offset = end
        return self._held(end)

    def _held(self, end: int):
        return (tuple(a[..., :end, :] for a in self.keys),
                tuple(a[..., :end, :] for a in self.values))

    @property
    def state(self):
        return () if self.keys is None else self._held(self.offset)

    @state.setter
    def state(self, value) -> None:
        self.keys, self.values = (tuple(v) for v in value)
        self.offset = self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in (*self.keys, *self.values))

    def fork(self) -> "QuantizedKVCache":
        """An independent copy sharing the held positions until either writes (see
        `KVCache.fork`)."""
        copy = QuantizedKVCache(self.bits, self.group_size)
        if self.keys is not None:
            copy.keys, copy.values = self._held(self.offset)
        copy.offset = self.offset
        return copy


class SlidingWindowCache:
    """The last `window - 1 + slack` positions: memory is O(window), whatever the context.

    Two layouts of the same content. *Ordered* (`keys`/`values` `[B, H, length, d]`, oldest
    first) is what prefill, trimming, snapshots and forks use. The compiled one-token step uses
    a *ring* of `window + slack` slots, position p in slot `p % ring size`, written in place:
    attention does not care about the order of its keys (RoPE is applied before they are
    stored), so a step costs one write instead of two concatenations and two slices. The
    cache enters the ring at the first compiled step and leaves it (one gather) when anything
    asks for the ordered layout.
    """

    def __init__(self, window: int, slack: int = 0) -> None:
        self.window = window
        self.slack = slack
        self._keys: mx.array | None = None
        self._values: mx.array | None = None
        self._ring: tuple[mx.array, mx.array] | None = None
        self._stack: tuple[StackedRows, int, int] | None = None  # its ring is in a stack
        self._held = 0  # positions kept, in either layout
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.window - 1 + self.slack

    @property
    def ring_size(self) -> int:
        return self.capacity + 1

    @property
    def length(self) -> int:
        """How many earlier positions are kept (all visible to the next query or slack)."""
        return self._held

    @property
    def keys(self) -> mx.array | None:
        self._leave_ring()
        return self._keys

    @keys.setter
    def keys(self, value: mx.array | None) -> None:
        self._leave_ring()
        self._keys = value
        self._held = 0 if value is None else value.shape[2]

    @property
    def values(self) -> mx.array | None:
        self._leave_ring()
        return self._values

    @values.setter
    def values(self, value: mx.array | None) -> None:
        self._leave_ring()
        self._values = value

    def _unstack(self) -> None:
        """Take this row's ring back from the stack it was decoding in (see `KVCache`)."""
        stack, row, layer = self._stack
        self._stack = None
        self._ring = stack.take(row, layer)

    def _leave_ring(self) -> None:
        """Back to the ordered layout: rolled so the oldest slot comes first, the held
        positions last (see `step_state`)."""
        if self._stack is not None:
            self._unstack()
        if self._ring is None:
            return
        size, shift = self.ring_size, self.offset % self.ring_size
        self._keys, self._values = (mx.roll(a, -shift, axis=2)[..., size - self._held:, :]
                                    for a in self._ring)
        self._ring = None

    def fixed_step_ready(self) -> bool:
        """Once anything is held: the ring has its size from the first token on (the
        positions that do not exist yet are masked, `RingStep`)."""
        return self.window > 1 and (self._held > 0 or self._stack is not None)

    def step_state(self) -> tuple[mx.array, mx.array]:
        """The ring (entered now if the cache is ordered). Padded in front with zeros to
        the ring's size, the ordered keys hold positions `offset - size ... offset - 1`, so
        entry j belongs in slot `(offset + j) % size`: a roll by `offset`. The zero slots are
        positions the query never sees (`RingStep.prepare`)."""
        if self._stack is not None:
            self._unstack()
        if self._ring is None:
            size, (b, h, held, d) = self.ring_size, self._keys.shape
            self._ring = tuple(
                mx.roll(mx.concatenate([mx.zeros((b, h, size - held, d), a.dtype), a], axis=2),
                        self.offset % size, axis=2)
                for a in (self._keys, self._values))
            self._keys = self._values = None
        return self._ring

    def step_kind(self) -> "RingStep":
        full = self.ring_size == self.window and self.offset >= self.window - 1
        return _ring_step(self.window, not full)

    def step_commit(self, keys: mx.array, values: mx.array) -> None:
        self._ring = (keys, values)
        self.step_advance()

    def step_advance(self) -> None:
        self.offset += 1
        self._held = min(self.capacity, self._held + 1)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        held_keys, held_values = self.keys, self.values  # ordered
        self.offset += keys.shape[2]
        if held_keys is not None and held_keys.shape[2] > 0:
            keys = mx.concatenate([held_keys, keys], axis=2)
            values = mx.concatenate([held_values, values], axis=2)
        total = keys.shape[2]
        keep = min(self.capacity, total)
        self._keys = keys[..., total - keep:, :]
        self._values = values[..., total - keep:, :]
        self._held = keep
        return keys, values

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        return () if self.keys is None else (self.keys, self.values)

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value

    def is_trimmable(self) -> bool:
        return True

    def can_trim(self, n: int) -> bool:
        """Whether the positions the query after a trim of `n` needs are still held."""
        if not 0 <= n <= self.offset:
            return False
        new_offset = self.offset - n
        oldest_kept = self.offset - self.length
        return oldest_kept <= max(0, new_offset - (self.window - 1))

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise ValueError(
                f"cannot trim {n} positions from a sliding-window cache holding {self.length}"
            )
        if n:
            keep = self.length - n
            self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
            self.offset -= n
        return n

    def snapshot(self) -> tuple[int, Any, Any]:
        """The arrays are replaced, never written in place: keeping references is a copy."""
        return self.offset, self.keys, self.values

    def restore(self, snapshot: tuple[int, Any, Any]) -> None:
        offset, self.keys, self.values = snapshot
        self.offset = offset

    @property
    def nbytes(self) -> int:
        if self._stack is not None:
            self._unstack()
        arrays = self._ring if self._ring is not None else (self._keys, self._values)
        return sum(a.nbytes for a in arrays if a is not None)

    def fork(self) -> "SlidingWindowCache":
        """The arrays are replaced, never written in place: sharing them is a copy."""
        copy = SlidingWindowCache(self.window, self.slack)
        copy.offset, copy.keys, copy.values = self.offset, self.keys, self.values
        return copy


class StackedRows:
    """The layer caches of several sequences stacked into one buffer per layer,
    `[rows, heads, slots, d]`, so that the batched engine's compiled step writes every row's
    new position with one scatter and attends all rows with one product per layer: the
    step's cost is then per batch, not per row (`Model.step_rows`).

    Full layers are padded to the longest row's buffer (positions past a row's own are
    masked, `FullStep`); sliding layers stack their rings (the same size for every row).
    While stacked, each layer cache points here instead of holding buffers; anything that
    reads one (a snapshot, a fork, the pool, a prefill) takes its row back out as a copy,
    which also ends this stack: the next step stacks the rows again. `release` gives every
    row back at once, when the batch changes.
    """

    def __init__(self, rows: Sequence[Sequence[Any]]) -> None:
        self.rows = [list(r) for r in rows]
        self.broken = False
        self.buffers: list[tuple[mx.array, mx.array]] = []
        for i in range(len(self.rows[0])):
            states = [_stacked_state(row[i]) for row in self.rows]
            slots = max(k.shape[2] for k, _ in states)
            self.buffers.append(tuple(
                mx.concatenate([_padded(st[j], slots) for st in states], axis=0)
                for j in (0, 1)))
        for r, row in enumerate(self.rows):
            for i, cache in enumerate(row):
                cache._stack = (self, r, i)
                cache._keys = cache._values = None
                if isinstance(cache, SlidingWindowCache):
                    cache._ring = None

    @staticmethod
    def can_stack(rows: Sequence[Sequence[Any]]) -> bool:
        """Rows whose layers step the same way, with the same ring sizes, and lengths close
        enough that padding every full layer to the longest row at most doubles their
        memory (one long context among short ones would multiply it: those rows attend one
        by one instead), or all short (`SHORT_SLOTS`)."""
        first = rows[0]
        alike = all(len(row) == len(first) and all(
            type(c) is type(f) and getattr(c, "window", None) == getattr(f, "window", None)
            and getattr(c, "ring_size", None) == getattr(f, "ring_size", None)
            for c, f in zip(row, first)) for row in rows[1:])
        full = next((i for i, c in enumerate(first) if isinstance(c, KVCache)), None)
        if not alike or full is None:
            return alike
        slots = [row[full].slots for row in rows]
        return max(slots) <= StackedRows.SHORT_SLOTS or len(slots) * max(slots) <= 2 * sum(slots)

    # Below this many positions per row, stacking's padding costs little whatever the mix.
    SHORT_SLOTS = 1024

    def step_kinds(self) -> tuple:
        """Each layer's step kind for all rows: a sliding layer is masked if any row's is."""
        kinds = []
        for layer in zip(*self.rows):
            kind = layer[0].step_kind()
            if isinstance(kind, RingStep) and not kind.masked:
                kind = next((k for k in (c.step_kind() for c in layer) if k.masked), kind)
            kinds.append(kind)
        return tuple(kinds)

    def holds(self, rows: Sequence[Sequence[Any]]) -> bool:
        """Whether this stack is still exactly these rows' caches, in this order."""
        return (not self.broken and len(rows) == len(self.rows) and all(
            len(a) == len(b) and all(x is y for x, y in zip(a, b))
            for a, b in zip(rows, self.rows)))

    def step_state(self) -> list[tuple[mx.array, mx.array]]:
        """Every layer's stacked buffers, a full layer's grown (by `KVCache.step` slots,
        zeros) when its longest row has no room for one more position."""
        for i, cache in enumerate(self.rows[0]):
            if isinstance(cache, KVCache):
                keys, values = self.buffers[i]
                need = max(row[i].offset for row in self.rows) + 1
                if need > keys.shape[2]:
                    slots = -(-need // KVCache.step) * KVCache.step
                    self.buffers[i] = (_padded(keys, slots), _padded(values, slots))
        return self.buffers

    def step_commit(self, buffers: Sequence[tuple[mx.array, mx.array]]) -> None:
        self.buffers = list(buffers)
        for row in self.rows:
            for cache in row:
                cache.step_advance()

    def take(self, row: int, layer: int) -> tuple[mx.array, mx.array]:
        """Row `row`'s buffers of layer `layer`, copied out; the stack is no longer whole."""
        self.broken = True
        keys, values = self.buffers[layer]
        return mx.contiguous(keys[row:row + 1]), mx.contiguous(values[row:row + 1])

    def release(self) -> None:
        """Every row still here takes its buffers back (when the batch changes: the rows
        that go on were moved to the new stack first)."""
        for row in self.rows:
            for cache in row:
                if cache._stack is not None and cache._stack[0] is self:
                    cache._unstack()
        self.buffers = []


def _stacked_state(cache: Any) -> tuple[mx.array, mx.array]:
    """A layer cache's step buffers for a new stack: a row still in an older stack lends
    its slice of that stack's buffers (a view: the new stack's concatenation is then the
    only copy), any other its own `step_state`."""
    if cache._stack is None:
        return cache.step_state()
    stack, row, layer = cache._stack
    keys, values = stack.buffers[layer]
    return keys[row:row + 1], values[row:row + 1]


def _padded(a: mx.array, slots: int) -> mx.array:
    """`a [rows, heads, n, d]` with zeros after, to `slots` positions."""
    extra = slots - a.shape[2]
    if extra == 0:
        return a
    b, h, _, d = a.shape
    return mx.concatenate([a, mx.zeros((b, h, extra, d), a.dtype)], axis=2)


LayerCache = KVCache | QuantizedKVCache | SlidingWindowCache


class PromptCache:
    """A model's layer caches plus the tokens they hold, reused from one call to the next.

    `prepare(prompt)` rewinds the caches to the longest prefix shared with `prompt` that can be
    restored exactly and returns the tokens still to prefill. It is empty only when a snapshot
    taken at the end of this very prompt kept its logits: then `logits` holds them. The
    generation loop reports every token it feeds through `advance`, and calls
    `mark(logits)` after each prompt prefill.
    """

    max_snapshots = 8

    def __init__(self, layers: Sequence[LayerCache]):
        self.layers = list(layers)
        self.tokens: list[int] = []
        self._snapshots: list[tuple[int, list[Any], Any]] = []
        self.logits: mx.array | None = None

    @classmethod
    def for_model(cls, model, sliding_slack: int = 0, kv_bits: int | None = None,
                  kv_group_size: int = 64) -> "PromptCache":
        """Fresh caches for `model`; `kv_bits` (8 or 4) quantizes the full layers' keys and
        values (see `QuantizedKVCache`)."""
        if kv_bits is None:
            return cls(model.make_cache(sliding_slack))
        return cls(model.make_cache(sliding_slack, kv_bits=kv_bits, kv_group_size=kv_group_size))

    @property
    def offset(self) -> int:
        return len(self.tokens)

    def advance(self, tokens: Sequence[int]) -> None:
        """Record tokens that were just run through the layer caches."""
        self.tokens.extend(int(t) for t in tokens)

    def mark(self, logits: mx.array | None = None) -> None:
        """Snapshot the current position (with the logits it produced, if given), so a later
        rewind to it costs nothing."""
        if self._snapshots and self._snapshots[-1][0] == self.offset:
            self._snapshots.pop()
        self._snapshots.append((self.offset, [c.snapshot() for c in self.layers], logits))
        del self._snapshots[:-self.max_snapshots]

    def checkpoint(self) -> tuple[int, list[Any], None]:
        """The current state, to `rollback` to (used to undo a speculative decode step)."""
        return self.offset, [c.snapshot() for c in self.layers], None

    def rollback(self, state: tuple[int, list[Any], Any]) -> None:
        position, snaps, _ = state
        for cache, snap in zip(self.layers, snaps):
            cache.restore(snap)
        del self.tokens[position:]
        self._snapshots = [s for s in self._snapshots if s[0] <= position]

    def reset(self) -> None:
        for cache in self.layers:
            cache.restore(_EMPTY[type(cache)])
        self.tokens = []
        self._snapshots = []

    def common_prefix(self, prompt: Sequence[int]) -> int:
        n = 0
        for held, new in zip(self.tokens, prompt):
            if held != new:
                break
            n += 1
        return n

    def rewind(self, position: int) -> int:
        """Go back to at most `position` tokens; returns where the caches now stand."""
        if position >= self.offset:
            return self.offset
        back = self.offset - position
        if all(c.can_trim(back) for c in self.layers):
            for cache in self.layers:
                cache.trim(back)
            del self.tokens[position:]
            self._snapshots = [s for s in self._snapshots if s[0] <= position]
            return position
        usable = [s for s in self._snapshots if s[0] <= position]
        if not usable:
            self.reset()
            return 0
        self.rollback(usable[-1])
        return self.offset

    def prepare(self, prompt: Sequence[int]) -> list[int]:
        """Rewind to what `prompt` shares with the cache; return the tokens left to prefill."""
        if not prompt:
            raise ValueError("the prompt is empty")
        self.logits = None
        shared = self.common_prefix(prompt)
        if shared == len(prompt):
            exact = [s for s in self._snapshots if s[0] == shared and s[2] is not None]
            if exact:
                self.rollback(exact[-1])
                self.logits = exact[-1][2]
                return []
        start = self.rewind(min(shared, len(prompt) - 1))
        return list(prompt[start:])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def fork(self) -> "PromptCache":
        """An independent copy (its tokens, layer caches and snapshots), O(1) in memory until
        it diverges: the pool hands out forks so that entries stay reusable."""
        copy = PromptCache([c.fork() for c in self.layers])
        copy.tokens = list(self.tokens)
        copy._snapshots = list(self._snapshots)
        copy.max_snapshots = self.max_snapshots
        return copy


# Sliding-window keys a pooled cache keeps beyond the window, so it can be trimmed back that
# far instead of re-prefilled (a few KB per layer at gpt-oss widths).
DEFAULT_SLIDING_SLACK = 256


class PromptCachePool:
    """Prompt caches shared by every request of an engine: longest-cached-prefix reuse.

    `acquire(prompt)` forks the held cache that shares the longest prefix with `prompt` (so
    two requests with the same system prompt both reuse it) and `release(cache)` keeps a
    finished request's cache, least recently used first out, within `max_bytes`. The caller
    then `prepare`s the fork as usual: trimming, snapshots (which the fork keeps) or a
    re-prefill give exactly what a fresh cache would. Not thread-safe: the engine's thread
    owns it.
    """

    def __init__(self, model, *, max_bytes: int = 2 << 30,
                 sliding_slack: int = DEFAULT_SLIDING_SLACK,
                 max_entries: int = 64, kv_bits: int | None = None, kv_group_size: int = 64):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model = model
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.sliding_slack = sliding_slack
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self._entries: list[PromptCache] = []  # least recently used first
        self.requests = 0
        self.hits = 0
        self.reused_tokens = 0  # prompt tokens not recomputed thanks to the pool

    def acquire(self, prompt: Sequence[int]) -> PromptCache:
        self.requests += 1
        best, shared = None, 0
        for entry in self._entries:
            n = entry.common_prefix(prompt)
            if n > shared:
                best, shared = entry, n
        if best is None:
            return PromptCache.for_model(self.model, self.sliding_slack, self.kv_bits,
                                         self.kv_group_size)
        self.hits += 1
        self._entries.remove(best)
        self._entries.append(best)  # most recently used
        return best.fork()

    def release(self, cache: PromptCache, reused: int = 0) -> None:
        """Keep `cache` for later requests; `reused` counts toward the stats."""
        self.reused_tokens += reused
        if not cache.tokens or self.max_bytes == 0:
            return
        # An entry that is a prefix of this one is superseded by it.
        self._entries = [e for e in self._entries
                         if not (len(e.tokens) <= len(cache.tokens)
                                 and e.common_prefix(cache.tokens) == len(e.tokens))]
        self._entries.append(cache)
        while self._entries and (len(self._entries) > self.max_entries
                                 or self.nbytes > self.max_bytes):
            self._entries.pop(0)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "hits": self.hits,
                "reused_tokens": self.reused_tokens, "entries": len(self._entries),
                "bytes": self.nbytes}


_EMPTY: dict[type, Any] = {KVCache: 0, QuantizedKVCache: 0, SlidingWindowCache: (0, None, None)}
