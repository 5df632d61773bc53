"""A KV cache of at most `max_size` positions: the first `keep` are never evicted, the rest
is a ring of the most recent ones. mlx-lm's RotatingKVCache semantics (`--max-kv-size`,
keep=4), so a capped context behaves as it does there.

Decoding one token overwrites the oldest slot in place (the ring is in no particular order:
keys are rotated before they are cached, so attention does not care). A chunk of several
tokens is appended to the history in time order, of which `max_size - 1` positions are kept,
so every query in the chunk sees a full window; `make_mask` masks what lies beyond it.
"""

import mlx.core as mx


class RotatingKVCache:
    step = 256

    def __init__(self, max_size: int, keep: int = 4):
        if max_size <= keep:
            raise ValueError(f"max_kv_size must be more than the {keep} kept positions, got {max_size}")
        self.max_size, self.keep = max_size, keep
        self.keys = self.values = None
        self.offset = 0  # positions seen
        self.idx = 0  # next slot to write; the buffer's first `idx` slots are valid before it fills

    def _in_time_order(self, x: mx.array) -> mx.array:
        if self.idx >= x.shape[2]:
            return x
        if self.offset > self.idx:  # wrapped: the oldest ring entries start at idx
            k = self.keep
            return mx.concatenate([x[..., :k, :], x[..., self.idx :, :], x[..., k : self.idx, :]], axis=2)
        return x[..., : self.idx, :]

    def _evict(self, x: mx.array, n: int) -> mx.array:
        # Drop the n oldest positions after the kept ones (x in time order).
        return x if n <= 0 else mx.concatenate([x[..., : self.keep, :], x[..., self.keep + n :, :]], axis=2)

    def _append(self, keys, values):
        n = keys.shape[2]
        if self.keys is not None:
            old_k, old_v = self._in_time_order(self.keys), self._in_time_order(self.values)
            drop = old_k.shape[2] - (self.max_size - 1)
            keys = mx.concatenate([self._evict(old_k, drop), keys], axis=2)
            values = mx.concatenate([self._evict(old_v, drop), values], axis=2)
        self.keys, self.values = keys, values
        self.offset += n
        self.idx = keys.shape[2]
        return keys, values

    def _write_one(self, keys, values):
        size = self.keys.shape[2] if self.keys is not None else 0
        if size < self.max_size and self.offset >= size:  # still filling: grow the buffer
            grow = min(self.step, self.max_size - self.offset)
            B, H, _, D = keys.shape
            zk, zv = mx.zeros((B, H, grow, D), keys.dtype), mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            self.keys = zk if self.keys is None else mx.concatenate([self.keys, zk], axis=2)
            self.values = zv if self.values is None else mx.concatenate([self.values, zv], axis=2)
            self.idx = self.offset
        if self.keys.shape[2] > self.max_size:  # a chunk left more than a window: back to max_size
            n = self.keys.shape[2] - self.max_size
            self.keys, self.values = self._evict(self.keys, n), self._evict(self.values, n)
            self.idx = self.max_size
        if self.idx == self.max_size:
            self.idx = self.keep
        self.keys[..., self.idx : self.idx + 1, :] = keys
        self.values[..., self.idx : self.idx + 1, :] = values
        self.offset += 1
        self.idx += 1
        return self.state

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[2] == 1:
            return self._write_one(keys, values)
        return self._append(keys, values)

    @property
    def state(self):
        if self.keys is None:
            return []
        if self.offset < self.keys.shape[2]:
            return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]
        return [self.keys, self.values]

    def can_trim(self) -> bool:
        return self.offset < self.max_size  # nothing evicted yet

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        self.idx -= n
        return n

    def make_mask(self, N: int):
        if N == 1:
            return None  # one new token sees the whole window
        past = min(self.max_size - 1, self.offset)
        if past + N <= self.max_size:
            return "causal"
        # Query i (absolute past + i) sees key j if j is not in its future and either j is a
        # kept position or within the window of max_size - keep recent positions.
        q = mx.arange(past, past + N)[:, None]
        k = mx.arange(past + N)[None]
        return (q >= k) & ((k < self.keep) | (q < k + self.max_size - self.keep))
