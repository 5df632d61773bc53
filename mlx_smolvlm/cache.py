"""Key/value cache for incremental decoding.

Keys and values live in buffers grown in steps of 256 positions, so a decode
step writes one slice instead of concatenating the whole history.
"""

import mlx.core as mx

from .cache_base import AppendCache
from .quantized_cache import QuantizedKVCache
from .rotating_cache import RotatingKVCache


class KVCache(AppendCache):
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev = self.offset
        n = keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            Dv = values.shape[3]
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, Dv), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self):
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    def to_quantized(self, group_size: int, bits: int) -> QuantizedKVCache:
        q = QuantizedKVCache(group_size, bits)
        if self.keys is not None:
            q.update_and_fetch(*self.state)
        return q

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state)


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
