"""Bounded caches shared across requests: image features by pixel digest, and the prompt
KV of recent requests, so a repeated system prompt or image is neither encoded nor
prefilled again. Least recently used entries go first; hit counts are kept for /health."""

from collections import OrderedDict

import mlx.core as mx

from .chat_cache import ChatCache


class FeatureCache:
    """Image features (tokens, D) of one tile each, keyed by the tile's pixel digest."""

    def __init__(self, max_tiles: int = 64):
        self.max_tiles = max_tiles
        self.entries: OrderedDict[bytes, mx.array] = OrderedDict()
        self.hits = self.misses = 0

    def features(self, model, pixel_values, pixel_attention_mask, digests: list[bytes]) -> mx.array:
        """(len(digests), tokens, D) for tiles `pixel_values` (N, C, H, W), encoding only the misses."""
        missing = [i for i, d in enumerate(digests) if d not in self.entries]
        self.hits += len(digests) - len(missing)
        self.misses += len(missing)
        found = {d: self.entries[d] for d in digests if d in self.entries}
        if missing:
            idx = mx.array(missing)
            new = model.encode_images(mx.array(pixel_values)[idx], mx.array(pixel_attention_mask)[idx])
            found.update({digests[i]: new[j] for j, i in enumerate(missing)})
        for d in digests:
            self.entries[d] = found[d]
            self.entries.move_to_end(d)
        while len(self.entries) > self.max_tiles:
            self.entries.popitem(last=False)
        return mx.stack([found[d] for d in digests])

    def stats(self) -> dict:
        return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses}


class PrefixCache:
    """Prompt KV (batch of 1) of recent requests; a new request starts from the longest
    prefix it shares with one of them (same tokens and same image pixels)."""

    def __init__(self, model, max_entries: int = 8):
        self.model = model
        self.max_entries = max_entries
        self.entries: OrderedDict[int, ChatCache] = OrderedDict()
        self.hits = self.misses = self.tokens_reused = 0
        self._key = 0

    def lookup(self, ids: list[int], tiles: list[bytes], image_seq_len: int,
               partition: bytes = b"") -> ChatCache:
        """A fresh ChatCache holding the longest reusable prefix of `ids` (maybe none)
        among the entries stored with the same `partition`."""
        best, n = None, 0
        for key, entry in self.entries.items():
            if entry.partition != partition:
                continue
            entry.image_seq_len = image_seq_len
            m = entry.reusable_prefix(ids, tiles)
            if m > n:
                best, n = key, m
        out = ChatCache(self.model)
        out.image_seq_len = image_seq_len
        if best is None:
            self.misses += 1
            return out
        self.entries.move_to_end(best)
        self.hits += 1
        self.tokens_reused += n
        for c, (k, v) in zip(out.layers, self.entries[best].layers):
            # A slice is a new array: this request's writes never reach the stored one.
            c.keys, c.values, c.offset = k[..., :n, :], v[..., :n, :], n
        out.tokens = ids[:n]
        out.tiles = tiles[: out.tiles_in(out.tokens)]
        return out

    def store(self, cache: ChatCache, partition: bytes = b""):
        """Keep `cache`'s prompt (only its filled part, not the spare buffer)."""
        if self.max_entries <= 0 or not cache.tokens:
            return
        entry = ChatCache.__new__(ChatCache)
        entry.__dict__.update(cache.__dict__)
        entry.layers = [c.state for c in cache.layers]
        entry.partition = partition
        self.entries[self._key] = entry
        self._key += 1
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def stats(self) -> dict:
        return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses,
                "tokens_reused": self.tokens_reused}
