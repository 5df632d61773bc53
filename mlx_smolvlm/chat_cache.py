"""A prompt cache for multi-turn chat: the KV cache plus what it holds (tokens and image
tiles), so a later turn prefills only what follows the part it shares with the cache."""

import hashlib

from .models.cache import can_trim_prompt_cache, make_prompt_cache


class ChatCache:
    """A KV cache that remembers what it holds (tokens and image tiles), so a later chat
    turn prefills only what follows the part it shares with the cache."""

    def __init__(self, model, max_kv_size: int | None = None):
        self.fresh = lambda: make_prompt_cache(model, max_kv_size)
        self.layers = self.fresh()
        self.tokens: list[int] = []
        self.tiles: list[bytes] = []  # digests of the cached image tiles, in prompt order
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.image_seq_len = getattr(model.config, "image_seq_len", 1)

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def tiles_in(self, ids: list[int]) -> int:
        # Each tile's features fill `image_seq_len` consecutive `<image>` tokens, in order.
        return ids.count(self.image_token_id) // self.image_seq_len

    def reusable_prefix(self, ids: list[int], tiles: list[bytes]) -> int:
        """Length of the cached prefix of `ids` whose image tiles are also the same pixels."""
        # At most all but one token: the last one must run to give the next token's logits.
        n, limit = 0, min(len(self.tokens), len(ids) - 1)
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        same = 0
        while same < min(len(tiles), len(self.tiles)) and tiles[same] == self.tiles[same]:
            same += 1
        # Equal ids, other pixels (or a tile cut in two): stop before that tile.
        return cut_before_tile(ids, n, self.image_token_id, self.image_seq_len, same)

    def trim_to(self, n: int) -> int:
        """Keep the first `n` positions; returns how many are kept: none once a rotating
        cache has evicted some, as it can no longer be rolled back."""
        if self.offset > n and not can_trim_prompt_cache(self.layers):
            self.layers[:] = self.fresh()
            n = 0
        for c in self.layers:
            c.trim(c.offset - n)
        self.tokens = self.tokens[:n]
        self.tiles = self.tiles[: self.tiles_in(self.tokens)]
        return n

    def record(self, ids: list[int], generated: list[int], tiles: list[bytes]):
        # The layers hold the prompt and every token fed back so far (one step runs ahead).
        self.tokens = (ids + generated)[: self.offset]
        self.tiles = tiles[: self.tiles_in(ids[: self.offset])]


def cut_before_tile(ids: list[int], n: int, image_token_id, per_tile: int, tiles: int | None = None) -> int:
    """`n`, or the position of the first `<image>` token in `ids[:n]` past the first `tiles`
    tiles (None: all the whole tiles there, so a prefix never ends inside a tile)."""
    image_pos = [i for i in range(n) if ids[i] == image_token_id]
    keep = (len(image_pos) // per_tile if tiles is None else tiles) * per_tile
    return image_pos[keep] if len(image_pos) > keep else n


def n_tiles(inputs: dict) -> int:
    pv = inputs.get("pixel_values")
    return 0 if pv is None else pv.shape[1]


def tile_digests(inputs: dict) -> list[bytes]:
    pv, pam = inputs.get("pixel_values"), inputs.get("pixel_attention_mask")
    if pv is None:
        return []
    return [
        hashlib.sha1(pv[0, i].tobytes() + (b"" if pam is None else pam[0, i].tobytes())).digest()
        for i in range(pv.shape[1])
    ]
