"""SmolVLM and SmolVLM2 in MLX."""

from .loading import load_model

__all__ = ["load_model"]
