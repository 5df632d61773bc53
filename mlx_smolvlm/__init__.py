"""SmolVLM and SmolVLM2 in MLX."""

from . import blas

blas.preload()  # before anything imports mlx.core: see blas.py

from .generation import generate, load, stream_generate
from .loading import load_model

__all__ = ["generate", "load", "load_model", "stream_generate"]
