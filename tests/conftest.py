import json
import os

import pytest

# MLX's CUDA backend runs float32 matmuls in TF32 unless told otherwise: parity with the float32
# reference needs full float32 (set before mlx.core loads).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_smolvlm  # noqa: F401  before any test module imports mlx.core: see mlx_smolvlm/blas.py


@pytest.fixture(scope="session")
def processor_folder(tmp_path_factory):
    """Factory: `processor_folder(layout="smolvlm", tile=512, image_seq_len=64, ...)` writes a
    SmolVLM processor folder (tokenizer from the SmolLM2 GGUF, image processor configs) once
    per parameter set and returns its path. Arguments: scripts/make_tokenizer.py."""
    from make_tokenizer import write_processor_folder

    made = {}

    def make(**kwargs):
        key = json.dumps(kwargs, sort_keys=True)
        if key not in made:
            dest = tmp_path_factory.mktemp("processor")
            made[key] = write_processor_folder(dest, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory):
    """The committed tiny-idefics3 weights with a processor folder: a complete checkpoint."""
    from make_generate_golden import tiny_folder

    return tiny_folder("tiny-idefics3", tmp_path_factory.mktemp("tiny-idefics3"))


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """{"wide.png": path, "square.png": path}: small random images."""
    from make_generate_golden import write_images

    return write_images(tmp_path_factory.mktemp("images"))
