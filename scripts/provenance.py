"""What a golden fixture was made from: the reference's versions and a digest of each input.

Every golden writer stores `stamp(...)` beside its data, so that a test whose golden disagrees
with the live reference can say which one moved (tests/helpers.py).
"""

import hashlib
import importlib.metadata
import platform
from pathlib import Path

import numpy as np

# The packages whose behaviour a golden can depend on (those not installed are left out).
PACKAGES = ("transformers", "torch", "torchvision", "tokenizers", "av", "numpy", "pillow", "mlx",
            "mlx-vlm", "gguf", "jinja2")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def digest(data) -> str:
    """sha256 of a file's bytes, a bytes object, a string or an array's (dtype, shape, bytes)."""
    h = hashlib.sha256()
    if isinstance(data, Path):
        h.update(data.read_bytes())
    elif isinstance(data, (bytes, bytearray)):
        h.update(data)
    elif isinstance(data, str):
        h.update(data.encode())
    else:
        a = np.ascontiguousarray(data)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def stamp(made_by: str, inputs: dict) -> dict:
    """The provenance record a golden stores: writer, versions, input digests."""
    return {"made_by": made_by, "versions": versions(),
            "inputs": {name: digest(v) for name, v in sorted(inputs.items())}}


def stamp_array(record: dict) -> np.ndarray:
    """A provenance record as a 0-d string array, to store inside an .npz golden."""
    import json

    return np.array(json.dumps(record))


def read_stamp(npz) -> dict | None:
    import json

    return json.loads(str(npz["provenance"])) if "provenance" in npz.files else None
