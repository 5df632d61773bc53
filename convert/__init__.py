"""Convert SmolVLM / SmolVLM2 checkpoints to MLX folders: `python -m mlx_smolvlm.convert --help`."""

from .converter import ConvertError, convert
from .recipes import RECIPES, quantize_model

__all__ = ["ConvertError", "RECIPES", "convert", "quantize_model"]
