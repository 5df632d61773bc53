"""Bounded caches shared across requests: image features by pixel digest, and the prompt KV
of recent requests, so a repeated system prompt or image is neither encoded nor prefilled
again. Least recently used entries go first; hit counts are kept for /health."""

from collections import OrderedDict

import mlx.core as mx

from .chat_cache import ChatCache, cut_before_tile
from .models.cache import can_trim_prompt_cache


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
            pam = None if pixel_attention_mask is None else mx.array(pixel_attention_mask)[idx]
            new = model.encode_images(mx.array(pixel_values)[idx], pam)
            found.update({digests[i]: new[j] for j, i in enumerate(missing)})
        for d in digests:
            self.entries[d] = found[d]
            self.entries.move_to_end(d)
        while len(self.entries) > self.max_tiles:
            self.entries.popitem(last=False)
        return mx.stack([found[d] for d in digests])

    def stats(self) -> dict:
        return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses}


class _Node:
    __slots__ = ("children", "entry")

    def __init__(self):
        self.children: dict = {}
        self.entry = None  # the key of an entry ending here


class _Entry:
    __slots__ = ("layers", "tokens", "tiles", "image_seq_len", "nbytes")

    def __init__(self, cache: ChatCache):
        # Copies: the request that made them keeps writing to its own layers.
        self.layers = [c.copy() for c in cache.layers]
        self.tokens, self.tiles, self.image_seq_len = list(cache.tokens), list(cache.tiles), cache.image_seq_len
        self.nbytes = sum(c.nbytes for c in self.layers)


class PrefixCache:
    """Prompt KV (batch of 1) of recent requests, at most `max_bytes` of it, in a trie over the
    prompt's tokens in which an `<image>` token is keyed by its tile's pixel digest: a new
    request starts from the longest prefix it shares with a stored one (same tokens, same
    pixels). A stored prompt longer than the shared part serves it by trimming a copy (any
    trimmable cache kind); stored entries are never modified. mlx-lm's LRUPromptCache idea."""

    def __init__(self, model, max_bytes: int = 1 << 30):
        self.model, self.max_bytes = model, max_bytes
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.root = _Node()
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.hits = self.misses = self.tokens_reused = 0

    def _key(self, ids: list[int], tiles: list, per_tile: int, partition: bytes) -> tuple:
        n_image, key = 0, [partition]
        for t in ids:
            if t == self.image_token_id:
                key.append(tiles[n_image // per_tile] if n_image // per_tile < len(tiles) else None)
                n_image += 1
            else:
                key.append(t)
        return tuple(key)

    def lookup(self, ids: list[int], tiles: list, per_tile: int, partition: bytes = b"") -> ChatCache:
        """A fresh ChatCache holding the longest reusable prefix of `ids` (maybe none) among
        the prompts stored with the same `partition`."""
        key = self._key(ids, tiles, per_tile, partition)  # key[0] is the partition
        limit = len(key) - 1  # the last token must run to give the next token's logits
        node, depth, best, best_n = self.root, 0, None, 0  # trie depth = 1 + tokens
        while depth < limit and key[depth] in node.children:
            node = node.children[key[depth]]
            depth += 1
            if node.entry is not None:
                best, best_n = node.entry, depth
        if depth > best_n:  # a longer stored prompt shares `depth` positions: trim a copy of it
            below = node
            while below.entry is None and below.children:
                below = next(iter(below.children.values()))
            if below.entry is not None and can_trim_prompt_cache(self.entries[below.entry].layers):
                best, best_n = below.entry, depth
        out = ChatCache(self.model)
        out.image_seq_len = per_tile
        # A prefix ending inside a tile's image tokens stops before that tile: features are
        # spliced a whole tile at a time.
        n = cut_before_tile(ids, best_n - 1, self.image_token_id, per_tile) if best is not None else 0
        entry = self.entries[best] if n else None
        if entry is None or (n < len(entry.tokens) and not can_trim_prompt_cache(entry.layers)):
            self.misses += 1
            return out
        self.entries.move_to_end(best)
        self.hits += 1
        self.tokens_reused += n
        out.layers = [c.copy() for c in entry.layers]
        for c in out.layers:
            c.trim(c.offset - n)
        out.tokens = ids[:n]
        out.tiles = tiles[: out.tiles_in(out.tokens)]
        return out

    def store(self, cache: ChatCache, partition: bytes = b""):
        """Keep a copy of `cache`'s prompt KV (evicting least recently used entries past max_bytes)."""
        if self.max_bytes <= 0 or not cache.tokens:
            return
        key = self._key(cache.tokens, cache.tiles, cache.image_seq_len, partition)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        entry = _Entry(cache)
        if entry.nbytes > self.max_bytes:
            return
        node, shorter = self.root, []
        for k in key:
            node = node.children.setdefault(k, _Node())
            if node.entry is not None:
                shorter.append(node.entry)
        node.entry = key
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        if can_trim_prompt_cache(entry.layers):
            for k in shorter:  # a shorter stored prompt on the way is served by this one, trimmed
                self._remove(k)
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self.entries)))

    def _remove(self, key: tuple):
        self.nbytes -= self.entries.pop(key).nbytes
        path, node = [], self.root
        for k in key:
            path.append((node, k))
            node = node.children[k]
        node.entry = None
        for parent, k in reversed(path):  # prune the branch up to where another entry needs it
            child = parent.children[k]
            if child.entry is not None or child.children:
                break
            del parent.children[k]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "tokens_reused": self.tokens_reused}
