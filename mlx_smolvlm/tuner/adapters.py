"""Adapter files: the trainable weights and the settings that rebuild the adapted model.

mlx-lm's layout: `adapters.safetensors` + `adapter_config.json`. Every file is written to a
temporary name in the same folder and moved over the old one, so an interrupted run leaves the
last complete checkpoint, never half of one.
"""

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

WEIGHTS, CONFIG = "adapters.safetensors", "adapter_config.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write):
    # same suffix as the target: mx.save_safetensors appends ".safetensors" to any other name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the final file is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapters(model, path, config: dict, fmt: str = "mlx", weights_file: str | None = None):
    """Write the model's trainable parameters and `config` (adapter_config.json) to folder `path`."""
    if fmt != "mlx":
        raise ValueError(f"unknown adapter format {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    _atomic(path / (weights_file or WEIGHTS), lambda f: mx.save_safetensors(f, weights))
    _atomic(path / CONFIG, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
