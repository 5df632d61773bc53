"""Fine-tuning data: rows in the formats users have -> token ids, loss mask and pixels; batches.

Row formats (one JSON object per line of `train.jsonl` / `valid.jsonl` / `test.jsonl`):
  - mlx-vlm's: {"images": [...], "messages": [{"role", "content": str | parts}]}; images without
    a placeholder part go to the start of the first user turn, as mlx-vlm places them.
  - ours (transformers' message format): parts {"type": "image" | "video", "path" | "image" |
    "video" | "url": ...} inline, {"type": "text", "text": ...}; paths relative to the file.
  - The Cauldron's: {"images": [...], "texts": [{"user": ..., "assistant": ...}, ...]}.
  - a `datasets` folder (`save_to_disk`) or parquet files, read with pyarrow when it is installed.

Each row becomes a `samples.Sample` (tokens, assistant-token mask, pixels) through samples.encode.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import InvalidRequestError, SmolVLMError
from ..image_processing import decode_image
from ..processing import message_images
from .samples import Sample, encode, fit_length

ROLES = ("system", "user", "assistant")
MEDIA_KEYS = {"image": ("image", "path", "url", "base64"), "video": ("video", "path", "url")}


class DatasetError(InvalidRequestError):
    """A row that cannot be trained on; the message names its file and line."""


# ---------------------------------------------------------------- rows -> messages


def _media(value, base: Path):
    """A path relative to the data file made absolute; bytes rows (parquet) decoded."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return decode_image(value["bytes"], value.get("path") or "<bytes>")
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, Path)):
        s = str(value)
        if s.startswith(("http://", "https://", "data:")) or Path(s).is_absolute():
            return s
        return str(base / s)
    return value  # a PIL image (datasets' Image feature)


def _parts(content, where):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise DatasetError(f"{where}: message content must be a string or a list of parts")
    return [dict(p) if isinstance(p, dict) else {"type": "text", "text": str(p)} for p in content]


def row_messages(row: dict, where: str, base: Path) -> list[dict]:
    """One row in any supported format -> transformers-format messages with content parts."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    images = row.get("images", row.get("image")) or []
    images = images if isinstance(images, list) else [images]
    turns = row.get("messages", row.get("texts"))
    if turns is not None and not isinstance(turns, list):
        raise DatasetError(f"{where}: 'messages' / 'texts' must be a list")
    if "messages" in row:
        messages = [{"role": m.get("role"), "content": _parts(m.get("content"), where)}
                    if isinstance(m, dict) else None for m in row["messages"] or []]
    elif "texts" in row:  # The Cauldron
        messages = []
        for turn in row["texts"] or []:
            if not isinstance(turn, dict) or "user" not in turn or "assistant" not in turn:
                raise DatasetError(f"{where}: each entry of 'texts' needs 'user' and 'assistant'")
            messages += [{"role": "user", "content": _parts(turn["user"], where)},
                         {"role": "assistant", "content": _parts(turn["assistant"], where)}]
    else:
        raise DatasetError(f"{where}: a row needs 'messages' or 'texts' (The Cauldron)")
    for m in messages:
        if m is None or m["role"] not in ROLES:
            role = None if m is None else m["role"]
            raise DatasetError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: no assistant turn to learn from")
    _place_images(messages, images, where)
    for m in messages:
        for p in m["content"]:
            kind = p.get("type")
            if kind in ("image", "video"):  # a tuple: a type that is not hashable is refused below
                for k in MEDIA_KEYS[kind]:
                    if k in p:
                        p[k] = _media(p[k], base)
            elif kind != "text":
                raise DatasetError(f"{where}: unknown content part type {kind!r}")
    return messages


def _place_images(messages, images, where):
    """Fill source-less image parts with the row's `images` in order; with no image part at
    all, put them at the start of the first user turn."""
    empty = [p for m in messages for p in m["content"]
             if p.get("type") == "image" and not any(k in p for k in MEDIA_KEYS["image"])]
    if not images:
        if empty:
            raise DatasetError(f"{where}: {len(empty)} image placeholder(s) but no images")
        return
    if not empty:
        if any(p.get("type") == "image" for m in messages for p in m["content"]):
            raise DatasetError(f"{where}: {len(images)} image(s) in 'images' but every image "
                               "part already has its source")
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise DatasetError(f"{where}: images but no user turn to put them in")
        user["content"][:0] = [{"type": "image"} for _ in images]
        empty = user["content"][: len(images)]
    if len(empty) != len(images):
        raise DatasetError(f"{where}: {len(images)} image(s) but {len(empty)} image placeholder(s)")
    for part, image in zip(empty, images):
        part["image"] = image


# ---------------------------------------------------------------- files


def _pyarrow(path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DatasetError(f"{path}: reading parquet / datasets folders needs pyarrow "
                           "(pip install pyarrow)") from None
    return pyarrow


def read_rows(path: Path):
    """(where, row, base folder) for each row of a JSONL or parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        rows = _pyarrow(path).parquet.read_table(path).to_pylist()
        yield from ((f"{path}:row {i + 1}", row, path.parent) for i, row in enumerate(rows))
        return
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named like any bad line
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise DatasetError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
            yield f"{path}:{n}", row, path.parent


def _metadata(path: Path, key: str) -> list:
    """The list under `key` in a datasets folder's JSON metadata file."""
    try:
        value = json.loads(path.read_text())[key]
    except (ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, list):
        raise DatasetError(f"{path}: not a datasets metadata file (no {key!r} list)")
    return value


def _arrow_folder(folder: Path):
    """Rows of one `datasets.Dataset.save_to_disk` folder: Arrow stream files listed in its
    state.json (read with pyarrow alone; `datasets` is not needed). Images come as
    {"bytes", "path"} structs, datasets' Image feature."""
    pa = _pyarrow(folder)
    for f in _metadata(folder / "state.json", "_data_files"):
        name = f.get("filename") if isinstance(f, dict) else None
        if not isinstance(name, str) or Path(name).name != name:  # a bare file name, in this folder
            raise DatasetError(f"{folder / 'state.json'}: data file {name!r} is not a file name in the folder")
        with pa.memory_map(str(folder / name)) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
        yield from ((f"{folder / name}:row {i + 1}", row, folder) for i, row in enumerate(rows))


def split_rows(data: Path, split: str):
    """Rows of one split of `--data`: {split}.jsonl / {split}.parquet in a folder, a datasets
    folder (a DatasetDict's `validation` split serves as `valid`), or (train only) a single
    file or Dataset folder. None when the split is absent."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data}: no such data file or folder")
    if data.is_file():
        return read_rows(data) if split == "train" else None
    for ext in (".jsonl", ".parquet"):
        if (data / f"{split}{ext}").is_file():
            return read_rows(data / f"{split}{ext}")
    if (data / "dataset_dict.json").is_file():
        splits = _metadata(data / "dataset_dict.json", "splits")
        name = next((n for n in (split, {"valid": "validation"}.get(split)) if n in splits), None)
        return None if name is None else _arrow_folder(data / name)
    if (data / "state.json").is_file():
        return _arrow_folder(data) if split == "train" else None
    return None


class ChatDataset:
    """Encoded samples of one split, over-long ones cut after their last image or dropped.

    Every row is encoded once up front (which also checks its media). Pixels are kept while
    they fit in `cache_bytes`; past that a sample keeps its tokens and re-reads its media
    when a batch needs it (one 17-tile image is 53 MB of float32 pixels)."""

    def __init__(self, rows, processor, image_token_id: int, max_seq_length: int | None = None,
                 cache_bytes: int = 2 << 30, **controls):
        self.processor, self.controls = processor, controls
        self.feature_fn, self.feature_bytes = None, cache_bytes
        self.samples, self.sources, self.dropped, held = [], [], 0, 0
        for where, row, base in rows:
            messages = row_messages(row, where, base)
            sample = fit_length(self._encode(messages, where), max_seq_length, image_token_id)
            if sample is None:
                self.dropped += 1
                continue
            if sample.pixel_values is not None:
                held += sample.pixel_values.nbytes
                if held > cache_bytes:
                    sample = Sample(sample.input_ids, sample.mask)
            self.samples.append(sample)
            self.sources.append((messages, where))

    def _encode(self, messages, where):
        try:
            return encode(self.processor, messages, **self.controls)
        except (SmolVLMError, ValueError, OSError) as e:  # ImageError, VideoError, TokenizerError...
            raise DatasetError(f"{where}: {e}") from None

    def __len__(self):
        return len(self.samples)

    def cache_features(self, fn):
        """Keep `fn(pixel_values, pixel_attention_mask)` (the frozen vision tower and connector)
        per sample instead of its pixels, up to the byte budget: the tower then runs once per
        sample, not once per epoch, and a feature row is 1/20 of its tile's pixels. Samples
        holding pixels get theirs now; those that re-read their media, when batched."""
        self.feature_fn = fn
        for i, sample in enumerate(self.samples):
            if sample.pixel_values is not None:
                self[i]

    def __getitem__(self, i):
        sample = self.samples[i]
        if sample.features is not None:
            return sample
        messages, where = self.sources[i]
        if sample.pixel_values is None and (message_images(messages) or message_images(messages, "video")):
            full = self._encode(messages, where)
            sample = Sample(sample.input_ids, sample.mask, full.pixel_values, full.pixel_attention_mask)
        if self.feature_fn is None or sample.pixel_values is None:
            return sample
        feats = self.feature_fn(mx.array(sample.pixel_values), mx.array(sample.pixel_attention_mask))
        mx.eval(feats)
        sample = Sample(sample.input_ids, sample.mask, features=feats)
        if feats.nbytes <= self.feature_bytes:
            self.feature_bytes -= feats.nbytes
            self.samples[i] = sample
        return sample


def load_split(data, split, processor, image_token_id, max_seq_length=None, **controls):
    rows = split_rows(data, split)
    if rows is None:
        return None
    return ChatDataset(rows, processor, image_token_id, max_seq_length, **controls)


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: mx.array  # (B, L) int32, right-padded
    labels: mx.array  # (B, L): the token where it is a loss target, else -100 (transformers')
    media: list  # per row with images, in row order: features (N, T, D) or (pixels, mask)
    lengths: list  # real (unpadded) length of each row
    targets: mx.array  # (T,) flat positions b * L + t whose next token is a loss target


def collate(samples: list[Sample], pad_id: int = 0) -> Batch:
    """Right-pad to the longest sample (padding is never a target: causal attention keeps it
    from the real tokens). Images stay per row, at their own size: each row's image tokens
    were counted for its own tiles and frames."""
    B, L = len(samples), max(len(s) for s in samples)
    ids = np.full((B, L), pad_id, np.int32)
    labels = np.full((B, L), -100, np.int32)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = s.input_ids
        labels[i, : len(s)] = np.where(s.mask, s.input_ids, -100)
    media = [s.features if s.features is not None
             else (mx.array(s.pixel_values), mx.array(s.pixel_attention_mask))
             for s in samples if s.has_media()]
    # computed here, on the host, so the loss gathers its rows without a sync in the graph
    targets = np.flatnonzero(labels[:, 1:] != -100)
    targets = (targets // (L - 1)) * L + targets % (L - 1)
    return Batch(mx.array(ids), mx.array(labels), media, [len(s) for s in samples],
                 mx.array(targets.astype(np.int32)))


def iterate_batches(dataset, batch_size: int, train: bool = False, pad_id: int = 0, seed: int = 0):
    """Batches of similar-length samples (sorted, then consecutive); in training an endless
    shuffled stream, else one pass in order."""
    # a ChatDataset's lengths from its stored samples: dataset[i] may re-read media or run the tower
    samples = getattr(dataset, "samples", dataset)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    batch_size = min(batch_size, len(order))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if train:
        groups = [g for g in groups if len(g) == batch_size] or groups
    rng = np.random.default_rng(seed)
    while True:
        for k in (rng.permutation(len(groups)) if train else range(len(groups))):
            yield collate([dataset[i] for i in groups[k]], pad_id)
        if not train:
            return
