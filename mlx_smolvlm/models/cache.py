"""Key/value caches for incremental decoding, every kind behind one interface.

- `KVCache`: float keys and values in buffers grown in steps of 256 positions, so a decode
  step writes one slice instead of concatenating the whole history.
- `QuantizedKVCache`: keys and values stored group-quantized (4 or 8 bits) as MLX's
  quantized triples (packed uint32, scales, biases), as mlx-lm's QuantizedKVCache: a decode
  step multiplies with `mx.quantized_matmul` (models/base.py), so the float history is never
  rebuilt for a token.
- `RotatingKVCache`: at most `max_size` positions, mlx-lm's `--max-kv-size` semantics.
- `BatchKVCache`: several left-padded sequences decoded together (the batch engine).

The interface (`_BaseCache`) is all that code outside this file uses: `state` (the arrays;
reading it gives new arrays, so a snapshot never sees later writes), `meta_state` (the rest,
as strings), `from_state` / `copy`, `offset`, `is_trimmable` / `trim` (chat turns and
speculative decoding roll back through them), `nbytes`, `make_mask`, and for the batch cache
`from_rows` / `extend` / `filter`.
"""

import mlx.core as mx

from ..errors import InvalidRequestError


def _leaves(tree) -> list:
    if isinstance(tree, (list, tuple)):
        return [x for t in tree for x in _leaves(t)]
    return [tree]


def _each(f, x):
    # A float cache's keys are one array, a quantized one's a (packed, scales, biases) triple:
    # the quantized and batch caches grow, pad and gather positions of either the same way.
    return tuple(f(a) for a in x) if isinstance(x, tuple) else f(x)


def _grown(x, prev: int, n: int):
    # The first `prev` positions of a buffer (an array or a quantized triple) and n zero ones after.
    def grown(a):
        return mx.concatenate([a[..., :prev, :], mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype)], axis=2)

    return _each(grown, x)


class _BaseCache:
    offset: int = 0

    @property
    def meta_state(self) -> tuple:
        return ()

    @meta_state.setter
    def meta_state(self, v: tuple):
        pass

    @classmethod
    def _from_meta(cls, meta_state: tuple):
        return cls()

    @classmethod
    def from_state(cls, state, meta_state: tuple = ()):
        """A cache holding `state`, as another cache's `state` and `meta_state` gave them."""
        c = cls._from_meta(meta_state)
        c.state = state
        c.meta_state = meta_state
        return c

    def copy(self):
        """An independent cache with the same contents: writes to one never reach the other."""
        return type(self).from_state(self.state, self.meta_state)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last `n` positions; returns how many were dropped (0 if not trimmable)."""
        n = min(self.offset, n) if self.is_trimmable() else 0
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in _leaves(self.state))

    def make_mask(self, N: int):
        # One new token attends to everything cached; a longer chunk needs causality.
        return "causal" if N > 1 else None


class KVCache(_BaseCache):
    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev = self.offset
        n = keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            if self.keys is None:
                B, H, _, Dk = keys.shape
                self.keys = mx.zeros((B, H, grow, Dk), keys.dtype)
                self.values = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            else:
                self.keys, self.values = _grown(self.keys, prev, grow), _grown(self.values, prev, grow)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self):
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @state.setter
    def state(self, v):
        self.keys, self.values = v if v else (None, None)
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    def to_quantized(self, group_size: int, bits: int) -> "QuantizedKVCache":
        q = QuantizedKVCache(group_size, bits)
        if self.keys is not None:
            q.update_and_fetch(*self.state)
        return q


class QuantizedKVCache(_BaseCache):
    step = 256

    def __init__(self, group_size: int = 64, bits: int = 8):
        self.group_size, self.bits = group_size, bits
        self.keys = self.values = None  # (packed, scales, biases), each (B, H, capacity, .)
        self.offset = 0

    def _empty(self, B, H, n, D, dtype):
        per_word = 32 // self.bits
        return (mx.zeros((B, H, n, D // per_word), mx.uint32), mx.zeros((B, H, n, D // self.group_size), dtype),
                mx.zeros((B, H, n, D // self.group_size), dtype))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, H, n, _ = keys.shape
        prev = self.offset
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            grow = -(-n // self.step) * self.step
            if self.keys is None:
                self.keys = self._empty(B, H, grow, keys.shape[3], keys.dtype)
                self.values = self._empty(B, H, grow, values.shape[3], values.dtype)
            else:
                self.keys, self.values = _grown(self.keys, prev, grow), _grown(self.values, prev, grow)
        self.offset += n
        for cached, new in ((self.keys, keys), (self.values, values)):
            for c, q in zip(cached, mx.quantize(new, group_size=self.group_size, bits=self.bits)):
                c[..., prev : self.offset, :] = q
        return self.state

    @property
    def state(self):
        if self.keys is None:
            return []
        return tuple(tuple(x[..., : self.offset, :] for x in t) for t in (self.keys, self.values))

    @state.setter
    def state(self, v):
        self.keys, self.values = (tuple(v[0]), tuple(v[1])) if v else (None, None)
        self.offset = 0 if self.keys is None else self.keys[0].shape[2]

    @property
    def meta_state(self) -> tuple:
        return (str(self.group_size), str(self.bits))

    @meta_state.setter
    def meta_state(self, v: tuple):
        self.group_size, self.bits = map(int, v)

    @classmethod
    def _from_meta(cls, meta_state: tuple):
        return cls(*map(int, meta_state))


class RotatingKVCache(_BaseCache):
    """A KV cache of at most `max_size` positions: the first `keep` are never evicted, the rest
    is a ring of the most recent ones. mlx-lm's RotatingKVCache semantics (`--max-kv-size`,
    keep=4), so a capped context behaves as it does there.

    Decoding one token overwrites the oldest slot in place (the ring is in no particular order:
    keys are rotated before they are cached, so attention does not care). A chunk of several
    tokens is appended to the history in time order, of which `max_size - 1` positions are kept,
    so every query in the chunk sees a full window; `make_mask` masks what lies beyond it.
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 4):
        if max_size <= keep:
            raise InvalidRequestError(f"max_kv_size must be more than the {keep} kept positions, got {max_size}")
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
        n = min(self.offset, self.keys.shape[2])  # a full (or wrapped) buffer is valid throughout
        return [self.keys[..., :n, :], self.values[..., :n, :]]

    @state.setter
    def state(self, v):
        self.keys, self.values = v if v else (None, None)

    @property
    def meta_state(self) -> tuple:
        return tuple(map(str, (self.keep, self.max_size, self.offset, self.idx)))

    @meta_state.setter
    def meta_state(self, v: tuple):
        self.keep, self.max_size, self.offset, self.idx = map(int, v)

    @classmethod
    def _from_meta(cls, meta_state: tuple):
        keep, max_size = map(int, meta_state[:2])
        return cls(max_size, keep)

    def is_trimmable(self) -> bool:
        # Nothing evicted yet: one token past a full window overwrites, and a chunk drops old
        # positions only once more than max_size - 1 are held, so up to max_size all are there.
        return self.offset <= self.max_size

    def trim(self, n: int) -> int:
        n = min(self.offset, n) if self.is_trimmable() else 0
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


def _pad_left(x, n: int):
    return _each(lambda a: mx.pad(a, [(0, 0), (0, 0), (n, 0), (0, 0)]), x) if n else x


def _cat(parts: list, axis: int):
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(list(p), axis=axis) for p in zip(*parts))
    return mx.concatenate(parts, axis=axis)


def _width(x) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[2]


class BatchKVCache(_BaseCache):
    """A left-padded key/value cache for decoding several sequences together.

    Each row is one sequence, right-aligned in a shared buffer: row b's first `left[b]`
    positions are padding, masked out of attention. Its rotary position is its own length
    (`offset[b]`), so a row decodes exactly as it would alone. Rows join (`extend`) after a
    prefill of their own and leave (`filter`) when they finish, without stopping the others.
    """

    step = 256

    def __init__(self, keys, values, left: list[int]):
        self.keys, self.values = keys, values  # (B, H, capacity, D), or such triples (quantized)
        self.left = list(left)
        self.idx = _width(keys)  # buffer position of the next token, the same for every row
        self._sync()

    def _sync(self):
        self._left = mx.array(self.left)
        self.offset = self.idx - self._left  # each row's own position (its RoPE offset)

    @classmethod
    def from_rows(cls, rows: list, *meta) -> "BatchKVCache":
        """Rows of (keys, values) (a single-sequence cache's `state` of this kind), each
        (1, H, L_i, D), right-aligned to the longest."""
        T = max(_width(k) for k, _ in rows)
        keys = _cat([_pad_left(k, T - _width(k)) for k, _ in rows], 0)
        values = _cat([_pad_left(v, T - _width(v)) for _, v in rows], 0)
        return cls(keys, values, [T - _width(k) for k, _ in rows], *meta)

    @classmethod
    def from_state(cls, state, meta_state: tuple = ()):
        return cls(*state, [int(x) for x in meta_state])

    @property
    def size(self) -> int:
        return len(self.left)

    def _upto(self, x):
        return _each(lambda a: a[..., : self.idx, :], x)

    @property
    def state(self):
        return [self._upto(self.keys), self._upto(self.values)]

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.idx = _width(self.keys)
        self._sync()

    @property
    def meta_state(self) -> tuple:
        return tuple(map(str, self.left))

    @meta_state.setter
    def meta_state(self, v: tuple):
        self.left = [int(x) for x in v]
        self._sync()

    def trim(self, n: int) -> int:
        n = max(0, min(n, self.idx - max(self.left)))  # never into a row's padding
        self.idx -= n
        self._sync()
        return n

    def extend(self, other: "BatchKVCache"):
        """Append `other`'s rows; the shorter side is padded on the left."""
        T = max(self.idx, other.idx)
        a, b = T - self.idx, T - other.idx
        (k1, v1), (k2, v2) = self.state, other.state
        self.keys = _cat([_pad_left(k1, a), _pad_left(k2, b)], 0)
        self.values = _cat([_pad_left(v1, a), _pad_left(v2, b)], 0)
        self.left = [l + a for l in self.left] + [l + b for l in other.left]
        self.idx = T
        self._sync()

    def filter(self, keep: list[int]):
        """Keep only rows `keep`, and drop the columns that are padding in every row left."""
        cut = min(self.left[i] for i in keep)
        rows = mx.array(keep)
        self.keys = _each(lambda a: a[rows, :, cut : self.idx], self.keys)
        self.values = _each(lambda a: a[rows, :, cut : self.idx], self.values)
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
        self.keys = _each(lambda a: mx.take_along_axis(a, src, axis=2), self._upto(self.keys))
        self.values = _each(lambda a: mx.take_along_axis(a, src, axis=2), self._upto(self.values))
        self.left = [l + k for l, k in zip(self.left, n)]
        self.filter(list(range(self.size)))  # drops the columns now padding in every row

    def make_mask(self, L: int) -> mx.array:
        """(B, 1, L, idx + L) boolean mask for L new tokens: causal, and no left padding."""
        cols = mx.arange(self.idx + L)
        causal = cols[None, :] <= mx.arange(self.idx, self.idx + L)[:, None]
        return (causal[None] & (cols >= self._left[:, None, None]))[:, None]

    def update_and_fetch(self, keys, values):
        prev, n = self.idx, _width(keys)
        if prev + n > _width(self.keys):
            grow = ((n + self.step - 1) // self.step) * self.step
            self.keys, self.values = _grown(self.keys, prev, grow), _grown(self.values, prev, grow)
        for b, x in zip(_leaves([self.keys, self.values]), _leaves([keys, values])):
            b[..., prev : prev + n, :] = x
        self.idx += n
        self.offset = self.offset + n
        return self.state


def _quantize(x: mx.array, group_size: int, bits: int) -> tuple:
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


class BatchQuantizedKVCache(BatchKVCache):
    """BatchKVCache with keys and values stored as QuantizedKVCache stores them (group-quantized
    triples); attention reads them as it reads a QuantizedKVCache's (models/base.py)."""

    def __init__(self, keys, values, left: list[int], group_size: int = 64, bits: int = 8):
        self.group_size, self.bits = group_size, bits
        super().__init__(keys, values, left)

    @classmethod
    def from_float(cls, c: BatchKVCache, group_size: int, bits: int) -> "BatchQuantizedKVCache":
        k, v = c.state
        return cls(_quantize(k, group_size, bits), _quantize(v, group_size, bits), c.left, group_size, bits)

    @classmethod
    def from_state(cls, state, meta_state: tuple = ()):
        return cls(*state, [int(x) for x in meta_state[2:]], *map(int, meta_state[:2]))

    @property
    def meta_state(self) -> tuple:
        return (str(self.group_size), str(self.bits), *map(str, self.left))

    @meta_state.setter
    def meta_state(self, v: tuple):
        self.group_size, self.bits = map(int, v[:2])
        BatchKVCache.meta_state.fset(self, v[2:])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        g, b = self.group_size, self.bits
        return super().update_and_fetch(_quantize(keys, g, b), _quantize(values, g, b))


def can_trim_prompt_cache(cache: list) -> bool:
    """Whether every layer can still drop positions (mlx-lm's name): a rotating one that has
    evicted cannot be rolled back."""
    return all(c.is_trimmable() for c in cache)


def make_prompt_cache(model, max_kv_size: int | None = None) -> list:
    """One cache per decoder layer; `max_kv_size` caps each at that many positions (rotating)."""
    if max_kv_size is not None:
        return [RotatingKVCache(max_kv_size) for _ in range(len(model.layers))]
    return [KVCache() for _ in range(len(model.layers))]


# Where kv_bits starts to apply, in positions. Quantized from position 0, a cache moves the real
# 135M decoder's first-token log-probs by up to 0.3-0.4 nats (8-bit) and flips near-tied answers
# to short questions (bench/kv_quality.py); mlx-lm starts at 5000, which a 64-frame video
# (~4.8k positions) never reaches. Short chats and one image stay float; videos are quantized.
QUANTIZED_KV_START = 2048


def maybe_quantize_kv_cache(cache: list, bits: int | None, group_size: int, start: int):
    """Swap float layers for quantized ones, in place, once they hold `start` positions."""
    if bits is None:
        return
    for i, c in enumerate(cache):
        if isinstance(c, KVCache) and c.offset >= start:
            cache[i] = c.to_quantized(group_size, bits)
