"""Pixel shuffle + modality projection: vision patches -> decoder embeddings."""

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .config import ModelConfig


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """(N, s*s, D) -> (N, s*s/r^2, r*r*D), each r x r block of patches folded into channels.

    One reshape/transpose with the same element order as the reference's six steps:
    output row (i, j) holds patches (i*r + a, j*r + b) in (a, b) order.
    """
    N, L, D = x.shape
    s = int(round(L**0.5))
    x = x.reshape(N, s // r, r, s // r, r, D).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, L // (r * r), r * r * D)


class ModalityProjection(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        in_dims = cfg.vision_config.hidden_size * cfg.scale_factor**2
        self.proj = nn.Linear(in_dims, cfg.text_config.hidden_size, bias=False)

    def __call__(self, x):
        return self.proj(x)


class Connector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.modality_projection = ModalityProjection(cfg)

    def __call__(self, x, use_kernel: bool = True):
        shuffle = kernels.pixel_shuffle if use_kernel and kernels.can_use_kernel() else pixel_shuffle
        return self.modality_projection(shuffle(x, self.scale_factor))
