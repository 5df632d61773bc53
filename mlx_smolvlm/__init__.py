"""SmolVLM and SmolVLM2 in MLX."""

from . import blas

try:
    blas.preload()  # before anything imports mlx.core: see blas.py
except blas.SettingError as e:
    if blas.started_as_cli():  # a user's typo in the environment: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    raise

try:
    import mlx.core  # noqa: F401
except ImportError as e:  # on Linux the `mlx` wheel alone has no backend (libmlx.so)
    raise ImportError(f"{e}: install MLX's backend: pip install 'mlx-smolvlm[cpu]' (or [cuda])") from e

import warnings

# `python -m mlx_smolvlm.generate` runs generate.py as __main__ after this package (which
# imports it below, as mlx-lm's does) has loaded it; runpy's warning about that is noise there.
warnings.filterwarnings("ignore", r"'mlx_smolvlm\.generate' found in sys\.modules", RuntimeWarning)

from .batch import batch_generate  # noqa: E402
from .generate import generate, load, stream_generate  # noqa: E402
from .loading import load_model  # noqa: E402

__all__ = ["batch_generate", "generate", "load", "load_model", "stream_generate"]
