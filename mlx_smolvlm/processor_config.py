"""The processor settings of a checkpoint folder, in either layout users have.

- The Hub's legacy layout (transformers 4 `save_pretrained`, the official repos):
  `preprocessor_config.json` is the image processor (SmolVLM2 repos put `video_sampling`
  there too), `processor_config.json` holds `image_seq_len`.
- transformers 5 `save_pretrained`: `processor_config.json` nests `image_processor` and
  `video_processor` dicts; the video processor has its own `size`, `max_image_size`,
  `video_sampling`, which may differ from the image processor's.

As transformers' `AutoVideoProcessor`, a folder without a video processor config gets one
built from the image processor's (`preprocessor_config.json`).
"""

from dataclasses import dataclass
from pathlib import Path

from .errors import ProcessorConfigError
from .tokenizer import read_json

LEGACY, NESTED = "preprocessor_config.json", "processor_config.json"
VIDEO = "video_preprocessor_config.json"  # transformers 4.5x wrote the video processor here


@dataclass
class ProcessorSettings:
    image: dict | None  # image processor config; None for a text-only model
    video: dict | None  # video processor config
    image_seq_len: int | None
    layout: str  # "transformers5", "legacy" or "text"


def read_processor_settings(path) -> ProcessorSettings:
    path = Path(path)
    processor = read_json(path / NESTED)
    nested = processor.get("image_processor")
    if isinstance(nested, dict):
        image, layout = nested, "transformers5"
        video = processor.get("video_processor") or read_json(path / VIDEO) or image
    elif image := read_json(path / LEGACY):
        layout, video = "legacy", read_json(path / VIDEO) or image
    elif "vision_config" in read_json(path / "config.json") or processor:
        found = ", ".join(sorted(p.name for p in path.glob("*.json"))) or "no JSON files"
        keys = f" ({NESTED} keys: {', '.join(sorted(processor))})" if processor else ""
        raise ProcessorConfigError(
            f"{path}: no image processor settings; found {found}{keys}; expected {LEGACY} "
            f"(Hub layout) or {NESTED} with an 'image_processor' entry "
            "(transformers 5 save_pretrained)"
        )
    else:
        return ProcessorSettings(None, None, None, "text")
    seq_len = processor.get("image_seq_len") or image.get("image_seq_len")
    return ProcessorSettings(image, video, seq_len, layout)
