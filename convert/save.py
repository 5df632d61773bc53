"""Write a converted folder: atomically, with sharded weights and the source's assets."""

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

MAX_SHARD_BYTES = 5 << 30
# Tokenizer, processor, chat template and generation files travel with the weights.
ASSET_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
NOT_ASSETS = {"config.json", "model.safetensors.index.json"}


class OutputExistsError(FileExistsError):
    pass


@contextmanager
def staged_folder(out: Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`; it becomes `out` only if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary folder is removed
    and `out` is left as it was.
    """
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would carry over to `out`
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.rename(tmp.with_suffix(".old"))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def make_shards(weights: dict, max_bytes: int = MAX_SHARD_BYTES) -> list:
    shards, current, size = [], {}, 0
    for k in sorted(weights):
        v = weights[k]
        if current and size + v.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += v.nbytes
    return shards + [current]


def save_weights(folder: Path, weights: dict, max_shard_bytes: int = MAX_SHARD_BYTES):
    """model.safetensors, or model-0000i-of-0000n.safetensors with an index past one shard."""
    shards = make_shards(weights, max_shard_bytes)
    if len(shards) == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": weight_map,
    }
    write_json(folder / "model.safetensors.index.json", index)


def copy_assets(src: Path, dst: Path) -> list:
    copied = []
    for pattern in ASSET_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.name not in NOT_ASSETS and f.is_file():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
