"""A left-padded key/value cache for decoding several sequences together.

Each row is one sequence, right-aligned in a shared buffer: row b's first `left[b]`
positions are padding, masked out of attention. Its rotary position is its own length
(`offset[b]`), so a row decodes exactly as it would alone. Rows join (`extend`) after a
prefill of their own and leave (`filter`) when they finish, without stopping the others.
"""

import mlx.core as mx


def _pad_left(x: mx.array, n: int) -> mx.array:
    return mx.pad(x, [(0, 0), (0, 0), (n, 0), (0, 0)]) if n else x


class BatchKVCache:
    step = 256

    def __init__(self, keys: mx.array, values: mx.array, left: list[int]):
        self.keys, self.values = keys, values  # (B, H, capacity, D)
        self.left = list(left)
        self.idx = keys.shape[2]  # buffer position of the next token, the same for every row
        self._sync()

    def _sync(self):
        self._left = mx.array(self.left)
        self.offset = self.idx - self._left  # each row's own position (its RoPE offset)

    @classmethod
    def from_rows(cls, rows: list[tuple[mx.array, mx.array]]) -> "BatchKVCache":
        """Rows of (keys, values), each (1, H, L_i, D), right-aligned to the longest."""
        T = max(k.shape[2] for k, _ in rows)
        keys = mx.concatenate([_pad_left(k, T - k.shape[2]) for k, _ in rows])
        values = mx.concatenate([_pad_left(v, T - v.shape[2]) for _, v in rows])
        return cls(keys, values, [T - k.shape[2] for k, _ in rows])

    @property
    def size(self) -> int:
        return len(self.left)

    @property
    def state(self):
        return [self.keys[..., : self.idx, :], self.values[..., : self.idx, :]]

    def extend(self, other: "BatchKVCache"):
        """Append `other`'s rows; the shorter side is padded on the left."""
        T = max(self.idx, other.idx)
        a, b = T - self.idx, T - other.idx
        (k1, v1), (k2, v2) = self.state, other.state
        self.keys = mx.concatenate([_pad_left(k1, a), _pad_left(k2, b)])
        self.values = mx.concatenate([_pad_left(v1, a), _pad_left(v2, b)])
        self.left = [l + a for l in self.left] + [l + b for l in other.left]
        self.idx = T
        self._sync()

    def filter(self, keep: list[int]):
        """Keep only rows `keep`, and drop the columns that are padding in every row left."""
        cut = min(self.left[i] for i in keep)
        rows = mx.array(keep)
        self.keys = self.keys[rows, :, cut : self.idx]
        self.values = self.values[rows, :, cut : self.idx]
        self.left = [self.left[i] - cut for i in keep]
        self.idx -= cut
        self._sync()

    def trim_rows(self, n: list[int]):
        """Drop the last n[b] positions of each row b (rejected drafts). Rows stay right-aligned:
        row b moves n[b] slots right and gains as much left padding; its keys were rotated
        at their own positions before caching, so moving them changes nothing else."""
        if not any(n):
            return
        src = mx.maximum(mx.arange(self.idx)[None] - mx.array(n)[:, None], 0)[:, None, :, None]
        self.keys = mx.take_along_axis(self.keys[..., : self.idx, :], src, axis=2)
        self.values = mx.take_along_axis(self.values[..., : self.idx, :], src, axis=2)
        self.left = [l + k for l, k in zip(self.left, n)]
        self.filter(list(range(self.size)))  # drops the columns now padding in every row

    def make_mask(self, L: int) -> mx.array:
        """(B, 1, L, idx + L) boolean mask for L new tokens: causal, and no left padding."""
        cols = mx.arange(self.idx + L)
        causal = cols[None, :] <= mx.arange(self.idx, self.idx + L)[:, None]
        return (causal[None] & (cols >= self._left[:, None, None]))[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, n = self.idx, keys.shape[2]
        if prev + n > self.keys.shape[2]:
            B, H, _, D = self.keys.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            self.keys = mx.concatenate([self.keys[..., :prev, :], mx.zeros((B, H, grow, D), keys.dtype)], 2)
            Dv = self.values.shape[3]
            self.values = mx.concatenate(
                [self.values[..., :prev, :], mx.zeros((B, H, grow, Dv), values.dtype)], 2
            )
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.idx += n
        self.offset = self.offset + n
        return self.keys[..., : self.idx, :], self.values[..., : self.idx, :]
