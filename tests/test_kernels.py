"""Fused pixel-shuffle kernel vs its plain-MLX twin, and the twin vs the reference's six steps.

A pixel shuffle is a permutation, so every comparison is exact (mx.array_equal / np.array_equal).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm.errors import InvalidRequestError
from mlx_smolvlm.models import connector, kernels
from make_checkpoint import PRESETS
from mlx_smolvlm.models.config import ModelConfig

GPU_REASON = "no GPU backend: MLX here has neither Metal nor CUDA, the kernel cannot run"
needs_gpu = pytest.mark.skipif(not kernels.can_use_kernel(), reason=GPU_REASON)


def six_step_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    # transformers' SmolVLMConnector.pixel_shuffle, step for step.
    B, L, D = x.shape
    h = w = int(L**0.5)
    x = x.reshape(B, h, w, D)
    x = x.reshape(B, h, w // r, D * r)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(B, w // r, h // r, D * r * r)
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(B, L // (r * r), D * r * r)


@pytest.mark.parametrize("r,s", [(2, 8), (3, 9), (3, 27), (4, 16), (4, 32)])
def test_twin_matches_six_steps(r, s):
    x = np.random.default_rng(r).standard_normal((2, s * s, 5)).astype(np.float32)
    assert np.array_equal(np.array(connector.pixel_shuffle(mx.array(x), r)), six_step_shuffle(x, r))


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("r,s", [(2, 8), (3, 27), (4, 32)])
@pytest.mark.parametrize("N", [1, 3, 17])
@pytest.mark.parametrize("D", [32, 768, 1152])
def test_kernel_matches_twin(dtype, r, s, N, D):
    x = mx.random.normal((N, s * s, D)).astype(dtype)
    assert mx.array_equal(kernels.pixel_shuffle(x, r), connector.pixel_shuffle(x, r))


@needs_gpu
@pytest.mark.parametrize("r", [2, 3, 4])
def test_kernel_non_contiguous_input(r):
    s, D = 12, 48
    x = mx.random.normal((D, s * s, 2)).transpose(2, 1, 0)  # a (2, s*s, D) view
    assert mx.array_equal(kernels.pixel_shuffle(x, r), connector.pixel_shuffle(x, r))


@needs_gpu
def test_kernel_rejects_bad_grid():
    with pytest.raises(InvalidRequestError, match="square patch grid"):
        kernels.pixel_shuffle(mx.zeros((1, 10 * 10, 4)), 3)


def tiny_connector() -> connector.Connector:
    # tiny-smolvlm: scale 3, 32-wide vision features over a 9x9 patch grid.
    return connector.Connector(ModelConfig.from_dict(PRESETS["tiny-smolvlm"]))


def test_connector_falls_back_without_gpu(monkeypatch):
    # No kernel (this machine, or a CPU default device): the twin runs and the kernel is never called.
    def must_not_run(*args, **kwargs):
        raise AssertionError("kernel called without a GPU backend")

    monkeypatch.setattr(kernels, "pixel_shuffle_kernel", None)
    monkeypatch.setattr(kernels, "pixel_shuffle", must_not_run)
    conn = tiny_connector()
    x = mx.random.normal((2, 81, 32))
    expected = conn.modality_projection(connector.pixel_shuffle(x, 3))
    assert mx.array_equal(conn(x), expected)
    assert not kernels.can_use_kernel()


def test_connector_dispatches_to_kernel(monkeypatch):
    # With a kernel and the GPU as default device, the connector goes through kernels.pixel_shuffle
    # (faked here by the twin) unless use_kernel=False.
    calls = []

    def fake(x, r):
        calls.append(r)
        return connector.pixel_shuffle(x, r)

    monkeypatch.setattr(kernels, "pixel_shuffle_kernel", object())
    monkeypatch.setattr(kernels, "pixel_shuffle", fake)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    conn = tiny_connector()
    x = mx.random.normal((1, 81, 32))
    conn(x)
    assert calls == [3]
    conn(x, use_kernel=False)
    assert calls == [3]

