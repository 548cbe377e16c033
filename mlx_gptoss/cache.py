"""KV caches: a growing one for full-attention layers, a bounded one for sliding layers.

Both follow mlx-lm's cache interface (`update_and_fetch`, `offset`, `state`, `is_trimmable`,
`trim`) so mlx-lm's generation utilities can drive the model. The sliding cache keeps only
the `window - 1` keys the next query can still see, plus an optional `slack` of older ones so a
prompt cache can be trimmed back a little without recomputation.
"""
from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of every position so far, grown in steps to avoid a copy per token."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        new = keys.shape[2]
        end = self.offset + new
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((new + self.step - 1) // self.step) * self.step
            b, h, _, d = keys.shape

            def extend(old: mx.array | None, like: mx.array) -> mx.array:
                fresh = mx.zeros((b, h, grow, like.shape[-1]), dtype=like.dtype)
                if old is None:
                    return fresh
                return mx.concatenate([old[..., : self.offset, :], fresh], axis=2)

            self.keys, self.values = extend(self.keys, keys), extend(self.values, values)
        self.keys[..., self.offset:end, :] = keys
        self.values[..., self.offset:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

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

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlidingWindowCache:
    """The last `window - 1 + slack` positions: memory is O(window), whatever the context."""

    def __init__(self, window: int, slack: int = 0) -> None:
        self.window = window
        self.slack = slack
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.window - 1 + self.slack

    @property
    def length(self) -> int:
        """How many earlier positions are kept (all visible to the next query or slack)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.offset += keys.shape[2]
        if self.keys is not None and self.keys.shape[2] > 0:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        total = keys.shape[2]
        keep = min(self.capacity, total)
        self.keys = keys[..., total - keep:, :]
        self.values = values[..., total - keep:, :]
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
            self.keys = self.keys[..., : self.length - n, :]
            self.values = self.values[..., : self.length, :]
            self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
