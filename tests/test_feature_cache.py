import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm.feature_cache import VisionFeatureCache


def pixels(seed, shape=(1, 2, 3, 8, 8)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def counting_compute(calls, value):
    def compute():
        calls.append(value)
        return mx.full((2, 4), value)

    return compute


def test_same_image_is_encoded_once():
    cache, calls = VisionFeatureCache(), []
    pv, mask = pixels(0), np.ones((1, 2, 8, 8), dtype=bool)
    first = cache.get_or_compute(pv, mask, counting_compute(calls, 1.0))
    # A later turn rebuilds the arrays from the same image: equal bytes, new objects.
    again = cache.get_or_compute(pv.copy(), mask.copy(), counting_compute(calls, 2.0))
    assert calls == [1.0] and again is first
    assert (cache.hits, cache.misses) == (1, 1)


def test_different_inputs_get_different_entries():
    cache, calls = VisionFeatureCache(), []
    pv = pixels(0)
    cache.get_or_compute(pv, None, counting_compute(calls, 1.0))
    cache.get_or_compute(pixels(1), None, counting_compute(calls, 2.0))
    # Same bytes, other shape or dtype, or another mask: not the same input.
    cache.get_or_compute(pv.reshape(2, 1, 3, 8, 8), None, counting_compute(calls, 3.0))
    cache.get_or_compute(pv.astype(np.float16), None, counting_compute(calls, 4.0))
    cache.get_or_compute(pv, np.zeros((1, 2, 8, 8), dtype=bool), counting_compute(calls, 5.0))
    assert calls == [1.0, 2.0, 3.0, 4.0, 5.0] and len(cache) == 5


def test_mlx_inputs_hash_like_numpy():
    pv = pixels(3)
    assert VisionFeatureCache.key(mx.array(pv), None) == VisionFeatureCache.key(pv, None)
    bf = mx.array(pv).astype(mx.bfloat16)
    assert VisionFeatureCache.key(bf, None) != VisionFeatureCache.key(bf.astype(mx.float16), None)


def test_least_recently_used_is_evicted():
    cache, calls = VisionFeatureCache(max_entries=2), []
    a, b, c = pixels(0), pixels(1), pixels(2)
    for i, pv in enumerate((a, b, a, c)):  # touching `a` again makes `b` the oldest
        cache.get_or_compute(pv, None, counting_compute(calls, float(i)))
    assert len(cache) == 2
    assert VisionFeatureCache.key(a, None) in cache and VisionFeatureCache.key(b, None) not in cache
    cache.clear()
    assert len(cache) == 0


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="max_entries"):
        VisionFeatureCache(max_entries=0)
