"""SmolVLM / Idefics3 processor: chat template, image placeholders expanded into the exact
reference token layout, tokenization and pixels. No torch or transformers at run time."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image_processing import URL_TIMEOUT, ImageError, ImageProcessor, load_image
from .tokenizer import Tokenizer, load_tokenizer, read_json

# transformers' defaults when the tokenizer or processor config does not name them
DEFAULT_IMAGE_SEQ_LEN = 169
IMAGE_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
}
IMAGE_KEYS = ("image", "url", "path", "base64")


def image_prompt(rows, cols, image_seq_len, image_token, fake_image_token, global_image_token):
    """The text one `<image>` becomes for an image in `rows` x `cols` tiles (0 x 0: unsplit)."""
    image = image_token * image_seq_len
    glob = f"{fake_image_token}{global_image_token}{image}{fake_image_token}"
    if rows == 0 and cols == 0:
        return glob
    text = ""
    for r in range(1, rows + 1):
        text += "".join(f"{fake_image_token}<row_{r}_col_{c}>{image}" for c in range(1, cols + 1))
        text += "\n"
    return text + "\n" + glob


def message_images(messages):
    """Image sources in the order they appear in transformers-format messages."""
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for block in content:
            if block.get("type") == "image":
                images.extend(block[k] for k in IMAGE_KEYS if k in block)
    return images


@dataclass
class Preflight:
    """Tiles and image tokens per image and in total, computed from image sizes only."""

    images: list  # ImagePlan per image
    image_seq_len: int
    prompt_tokens: list  # tokens each expanded placeholder adds to the prompt

    @property
    def tiles(self):
        return [p.num_tiles for p in self.images]

    @property
    def image_tokens(self):
        return [t * self.image_seq_len for t in self.tiles]

    @property
    def total_tiles(self):
        return sum(self.tiles)

    @property
    def total_image_tokens(self):
        return sum(self.image_tokens)

    def __str__(self):
        lines = [
            f"image {i}: {p.width}x{p.height} -> {p.rows}x{p.cols} grid + global = "
            f"{p.num_tiles} tiles, {n} image tokens ({t} prompt tokens)"
            if p.rows
            else f"image {i}: {p.width}x{p.height} -> 1 tile (unsplit), {n} image tokens "
            f"({t} prompt tokens)"
            for i, (p, n, t) in enumerate(zip(self.images, self.image_tokens, self.prompt_tokens))
        ]
        lines.append(
            f"total: {self.total_tiles} tiles, {self.total_image_tokens} image tokens "
            f"({sum(self.prompt_tokens)} prompt tokens)"
        )
        return "\n".join(lines)


def _upright_size(source, timeout):
    # Header-only read; EXIF orientations 5-8 swap width and height, as exif_transpose does
    if isinstance(source, Image.Image):
        return source.height, source.width
    if not Path(str(source)).is_file():
        image = load_image(source, timeout)  # URL or data URI: needs the bytes anyway
        return image.height, image.width
    try:
        with Image.open(source) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise ImageError(f"image {source}: cannot read ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


class Processor:
    """Turns a conversation (text and images) into model inputs exactly like transformers'
    SmolVLMProcessor / Idefics3Processor (PIL image-processor path)."""

    def __init__(self, tokenizer, image_processor=None, image_seq_len=DEFAULT_IMAGE_SEQ_LEN,
                 timeout=URL_TIMEOUT):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.timeout = timeout
        special = tokenizer.special_tokens
        self.image_tokens = {name: special.get(name, tok) for name, tok in IMAGE_TOKENS.items()}
        self.image_token = self.image_tokens["image_token"]
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """Render transformers-format messages with the checkpoint's chat template."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _prompt_and_images(self, messages, images, add_generation_prompt):
        if isinstance(messages, str):
            return messages, list(images or [])
        if images:
            raise ValueError("pass images inside the messages, or a prompt string with `images=`")
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return prompt, message_images(messages)

    def _check_counts(self, prompt, images):
        n = prompt.count(self.image_token)
        if n != len(images):
            names = ", ".join(repr(getattr(i, "filename", None) or str(i)[:60]) for i in images)
            raise ValueError(
                f"the prompt has {n} {self.image_token} placeholder(s) but {len(images)} image(s) "
                f"were given{': ' + names if images else ''}"
            )
        if images and self.image_processor is None:
            raise ValueError("this model has no image processor: it takes text only")

    def preflight(self, messages_or_images, **controls):
        """Tiles and image tokens per image and in total, from image headers only."""
        if messages_or_images and isinstance(messages_or_images[0], dict):
            sources = message_images(messages_or_images)
        else:
            sources = list(messages_or_images)
        if sources and self.image_processor is None:
            raise ValueError("this model has no image processor: it takes text only")
        plans = [
            self.image_processor.plan(*_upright_size(s, self.timeout), **controls) for s in sources
        ]
        lengths = [len(self.tokenizer.encode(self._image_prompt(p))) for p in plans]
        return Preflight(plans, self.image_seq_len, lengths)

    def _image_prompt(self, plan):
        return image_prompt(plan.rows, plan.cols, self.image_seq_len, **self.image_tokens)

    def __call__(self, messages, images=None, add_generation_prompt=True, **controls):
        """Model inputs as numpy arrays (batch of 1): input_ids, attention_mask and, with images,
        pixel_values and pixel_attention_mask. `controls`: do_image_splitting, max_tiles,
        longest_edge (all off by default)."""
        prompt, sources = self._prompt_and_images(messages, images, add_generation_prompt)
        self._check_counts(prompt, sources)
        out = {}
        if sources:
            pil = [load_image(s, self.timeout) for s in sources]
            pixel_values, mask, plans = self.image_processor(pil, **controls)
            pieces = prompt.split(self.image_token)
            expanded = [pieces[0]]
            for plan, piece in zip(plans, pieces[1:]):
                expanded += [self._image_prompt(plan), piece]
            prompt = "".join(expanded)
            out = {"pixel_values": pixel_values, "pixel_attention_mask": mask}
        # chat-template output already holds its special tokens, as transformers assumes
        ids = self.tokenizer.encode(prompt, add_special_tokens=isinstance(messages, str))
        input_ids = np.array([ids], dtype=np.int64)
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), **out}


def load_processor(path, timeout=URL_TIMEOUT):
    """Load the processor of a checkpoint folder (tokenizer files plus, for a VLM,
    preprocessor_config.json and processor_config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    tokenizer = load_tokenizer(path)
    image_config = read_json(path / "preprocessor_config.json")
    image_processor = ImageProcessor.from_dict(image_config) if image_config else None
    proc_config = read_json(path / "processor_config.json")
    image_seq_len = proc_config.get("image_seq_len", image_config.get("image_seq_len"))
    return Processor(
        tokenizer,
        image_processor,
        image_seq_len=image_seq_len or DEFAULT_IMAGE_SEQ_LEN,
        timeout=timeout,
    )


def text_processor(tokenizer: Tokenizer, timeout=URL_TIMEOUT):
    """A text-only processor around `tokenizer` (e.g. SmolLM2 loaded from a GGUF file)."""
    return Processor(tokenizer, None, timeout=timeout)
