"""The cross-request prefix cache: a byte-bounded LRU over a token trie whose image tokens are
keyed by pixel digest. It reuses the longest shared prefix (trimming a copy of a longer stored
prompt), never across other pixels or partitions, never modifies what it stores, and works
with every cache kind (float, quantized, rotating)."""

from pathlib import Path

import mlx.core as mx
import pytest

from mlx_smolvlm.chat_cache import ChatCache
from mlx_smolvlm.loading import load_model
from mlx_smolvlm.models.cache import QuantizedKVCache
from mlx_smolvlm.prefix_cache import PrefixCache

TINY = Path(__file__).parent / "fixtures" / "tiny-idefics3"
IMG = 300  # the tiny checkpoints' image_token_id
PER_TILE = 4


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


def filled(model, ids, tiles=(), kind="float", seed=0):
    """A ChatCache holding random keys/values for `ids` (position p's values are seed + p)."""
    cache = ChatCache(model, max_kv_size=64 if kind == "rotating" else None)
    if kind == "quantized":
        cache.layers = [QuantizedKVCache(32, 8) for _ in cache.layers]
    L = len(ids)
    for i, c in enumerate(cache.layers):
        k = mx.random.normal((1, 2, L, 32), key=mx.random.key(seed * 100 + i))
        c.update_and_fetch(k, k + 1)
    cache.image_seq_len = PER_TILE
    cache.tokens, cache.tiles = list(ids), list(tiles)
    return cache


def leaves(cache):
    out = []
    for c in cache.layers:
        for x in c.state:
            out.extend(x if isinstance(x, tuple) else [x])
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(mx.array_equal(x, y).item() for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["float", "quantized", "rotating"])
def test_longest_shared_prefix_from_a_longer_prompt_without_touching_it(model, kind):
    store = PrefixCache(model)
    ids = list(range(1, 21))
    cache = filled(model, ids, kind=kind)
    store.store(cache)
    before = [mx.array(x) for x in leaves(cache)]
    got = store.lookup(ids[:10] + [99, 98], [], PER_TILE)
    assert got.offset == 10 and got.tokens == ids[:10]
    assert all(type(c) is type(s) for c, s in zip(got.layers, cache.layers))
    assert same([x[..., :10, :] for x in leaves(cache)], leaves(got))
    got.layers[0].update_and_fetch(*(mx.zeros((1, 2, 1, 32)),) * 2)  # the request writes on
    (entry,) = store.entries.values()
    assert entry.layers[0].offset == 20 and same(before, [x for c in entry.layers for x in _flat(c.state)])
    # The same prompt again: all but its last token (which must run for the next logits).
    assert store.lookup(ids, [], PER_TILE).offset == 19
    # A longer one reuses the whole stored prompt.
    assert store.lookup(ids + [7, 8], [], PER_TILE).offset == 20
    assert store.stats()["hits"] == 3


def _flat(state):
    return [x for t in state for x in (t if isinstance(t, tuple) else [t])]


def test_image_tokens_match_only_the_same_pixels(model):
    store = PrefixCache(model)
    ids = [1, 2] + [IMG] * 2 * PER_TILE + [3, 4, 5]
    store.store(filled(model, ids, [b"a", b"b"]))
    assert store.lookup(ids, [b"a", b"b"], PER_TILE).offset == len(ids) - 1
    other = store.lookup(ids, [b"a", b"c"], PER_TILE)  # the second tile's pixels differ
    assert other.offset == 2 + PER_TILE and other.tiles == [b"a"]
    assert store.lookup(ids, [b"z", b"b"], PER_TILE).offset == 2


def test_reuse_stops_before_a_tile_it_would_cut(model):
    store = PrefixCache(model)
    ids = [1, 2] + [IMG] * PER_TILE + [3]
    store.store(filled(model, ids, [b"a"]))
    # The new prompt's image holds more tokens per tile: a shared prefix ending mid-tile is cut.
    new = [1, 2] + [IMG] * 2 * PER_TILE
    assert store.lookup(new, [b"a"], 2 * PER_TILE).offset == 2


def test_partitions_never_share(model):
    store = PrefixCache(model)
    ids = list(range(1, 11))
    store.store(filled(model, ids), partition=b"tenant-a")
    assert store.lookup(ids, [], PER_TILE, partition=b"tenant-b").offset == 0
    assert store.lookup(ids, [], PER_TILE, partition=b"tenant-a").offset == 9


def test_byte_bound_evicts_least_recently_used(model):
    one = filled(model, list(range(1, 11)))
    size = sum(c.nbytes for c in one.layers)
    store = PrefixCache(model, max_bytes=int(2.5 * size))
    prompts = [[100 * j + i for i in range(1, 11)] for j in range(1, 5)]
    for j in range(3):
        store.store(filled(model, prompts[j], seed=j))
    assert len(store.entries) == 2 and store.nbytes == 2 * size  # the first went
    assert store.lookup(prompts[1], [], PER_TILE).offset == 9  # now the most recently used
    store.store(filled(model, prompts[3], seed=3))
    assert store.lookup(prompts[2], [], PER_TILE).offset == 0  # evicted, not prompts[1]
    assert store.lookup(prompts[1], [], PER_TILE).offset == 9


def test_a_longer_prompt_replaces_its_stored_prefix(model):
    store = PrefixCache(model)
    short, long = list(range(1, 11)), list(range(1, 21))
    store.store(filled(model, short))
    store.store(filled(model, long))
    assert len(store.entries) == 1 and store.lookup(short + [50], [], PER_TILE).offset == 10


def test_an_evicted_rotating_prompt_serves_only_itself(model):
    store = PrefixCache(model)
    ids = list(range(1, 101))  # more than the 64-position window: no longer trimmable
    store.store(filled(model, ids, kind="rotating"))
    assert store.lookup(ids[:50] + [999], [], PER_TILE).offset == 0
    assert store.lookup(ids + [5], [], PER_TILE).offset == 100
