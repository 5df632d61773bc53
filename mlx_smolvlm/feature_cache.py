"""Image features kept across chat turns, so the same image is encoded once."""

import hashlib
from collections import OrderedDict
from typing import Callable

import mlx.core as mx
import numpy as np


class VisionFeatureCache:
    """A small LRU of image features keyed by a hash of the pixel values (and mask).

    Keys hash the bytes, shape and dtype of the processor's outputs, which exist on the
    host before the vision tower runs, so hashing never waits on the model.
    """

    def __init__(self, max_entries: int = 8):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, mx.array] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(*arrays) -> str:
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            if a is None:
                h.update(b"none")
                continue
            # "mlx.core.float32" and numpy's "float32" name the same inputs.
            h.update(f"{str(a.dtype).split('.')[-1]}{tuple(a.shape)}".encode())
            if isinstance(a, mx.array) and a.dtype == mx.bfloat16:
                a = a.view(mx.uint16)  # numpy has no bfloat16; the bits are what matter
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get_or_compute(
        self, pixel_values, pixel_attention_mask, compute: Callable[[], mx.array]
    ) -> mx.array:
        """Cached features for these inputs, else `compute()` (stored, oldest entry evicted)."""
        k = self.key(pixel_values, pixel_attention_mask)
        if k in self._entries:
            self.hits += 1
            self._entries.move_to_end(k)
            return self._entries[k]
        self.misses += 1
        feats = compute()
        self._entries[k] = feats
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return feats

    def clear(self):
        self._entries.clear()
