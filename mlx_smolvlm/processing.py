"""SmolVLM / Idefics3 processor: chat template, image placeholders expanded into the exact
reference token layout, tokenization and pixels. No torch or transformers at run time."""

import math
import re
from functools import cached_property
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InvalidRequestError, MediaError
from .image_processing import URL_TIMEOUT, ImageError, ImageProcessor, load_image
from .processor_config import read_processor_settings
from .tokenizer import Tokenizer, load_tokenizer, read_json
from .video import CHAT_TEMPLATE as VIDEO_CHAT_TEMPLATE
from .video import VideoOptions, load_video, video_pixels, video_prompt

# transformers' defaults when the tokenizer or processor config does not name them
DEFAULT_IMAGE_SEQ_LEN = 169
IMAGE_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
}
IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_TOKEN = "<video>"
VIDEO_CONTROLS = ("fps", "max_frames", "skip_secs", "frame_size")
# transformers' Idefics3Processor has no video input: these models never saw the video prompt.
NO_VIDEO_MODEL_TYPES = ("idefics3",)


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


def message_images(messages, kind="image"):
    """Image (or, with kind="video", video) sources in the order they appear in
    transformers-format messages."""
    keys = (kind, *IMAGE_KEYS[1:])
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for block in content:
            if block.get("type") == kind:
                images.extend(block[k] for k in keys if k in block)
    return images


@dataclass
class Preflight:
    """Tiles and image tokens per image and in total, computed from image sizes only."""

    images: list  # ImagePlan per image
    image_seq_len: int
    prompt_tokens: list  # tokens each expanded placeholder adds to the prompt
    videos: list = field(default_factory=list)  # (VideoFrames, image tokens, prompt tokens)

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
        for i, (v, n, t) in enumerate(self.videos):
            lines.append(
                f"video {i}: {v.path}: {v.duration:.1f} s at {v.fps:g} fps -> "
                f"{len(v.indices)} frames, {n} image tokens ({t} prompt tokens)"
            )
        frames = sum(len(v.indices) for v, _, _ in self.videos)
        lines.append(
            f"total: {self.total_tiles} tile{'s' * (self.total_tiles != 1)}"
            f"{f' + {frames} frames' if self.videos else ''}, "
            f"{self.total_image_tokens + sum(n for _, n, _ in self.videos)} image tokens "
            f"({sum(self.prompt_tokens) + sum(t for _, _, t in self.videos)} prompt tokens)"
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
                 timeout=URL_TIMEOUT, video_options=None, model_type=None):
        self.tokenizer = tokenizer
        self.model_type = model_type  # the checkpoint's config.json model_type
        self.image_processor = image_processor
        self.video_options = video_options or VideoOptions()
        self.image_seq_len = image_seq_len
        self.timeout = timeout
        special = tokenizer.special_tokens
        self.image_tokens = {name: special.get(name, tok) for name, tok in IMAGE_TOKENS.items()}
        self.image_token = self.image_tokens["image_token"]
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """Render transformers-format messages with the checkpoint's chat template."""
        if message_images(messages, "video"):
            self._check_video()
            kwargs.setdefault("chat_template", VIDEO_CHAT_TEMPLATE)
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def reply_message(self, text: str) -> dict:
        """The assistant message to append to a chat history for a reply the model generated.

        SmolVLM's template ends the generation prompt with `Assistant:` but renders a stored
        reply as `Assistant: ` + text: the model's own leading space would be written twice,
        the history would differ from what the KV cache holds, and the next turn would prefill
        the reply again. What the template inserts there is read from the template itself
        (SmolVLM: a space; SmolLM2: nothing) and taken off the reply's start."""
        sep = self._reply_separator
        return self.text_message("assistant", text[len(sep) :] if sep and text.startswith(sep) else text)

    def text_message(self, role: str, text: str) -> dict:
        # Text-only chat templates (SmolLM2's) take a string; SmolVLM's take a content list.
        if self.image_processor is None:
            return {"role": role, "content": text}
        return {"role": role, "content": [{"type": "text", "text": text}]}

    @cached_property
    def _reply_separator(self) -> str:
        mark = "<<reply>>"
        user = [self.text_message("user", "?")]
        prompt = self.apply_chat_template(user)
        full = self.apply_chat_template(user + [self.text_message("assistant", mark)], False)
        if not full.startswith(prompt) or mark not in full[len(prompt) :]:
            return ""
        return full[len(prompt) : full.index(mark, len(prompt))]

    def _prompt_and_images(self, messages, images, add_generation_prompt):
        if isinstance(messages, str):
            return messages, list(images or [])
        if images:
            raise InvalidRequestError("pass images inside the messages, or a prompt string with `images=`")
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return prompt, message_images(messages)

    def _check_counts(self, prompt, images):
        n = prompt.count(self.image_token)
        if n != len(images):
            names = ", ".join(repr(getattr(i, "filename", None) or str(i)[:60]) for i in images)
            raise InvalidRequestError(
                f"the prompt has {n} {self.image_token} placeholder(s) but {len(images)} image(s) "
                f"were given{': ' + names if images else ''}"
            )
        if images and self.image_processor is None:
            raise InvalidRequestError("this model has no image processor: it takes text only")

    def preflight(self, messages_or_images, videos=None, **controls):
        """Tiles, frames and image tokens per image, per video and in total, from image
        headers and video containers only (nothing is decoded)."""
        video_controls = {k: controls.pop(k) for k in VIDEO_CONTROLS if k in controls}
        if messages_or_images and isinstance(messages_or_images[0], dict):
            sources = message_images(messages_or_images)
            videos = message_images(messages_or_images, "video") if videos is None else videos
        else:
            sources = list(messages_or_images)
        if sources and self.image_processor is None:
            raise InvalidRequestError("this model has no image processor: it takes text only")
        plans = [
            self.image_processor.plan(*_upright_size(s, self.timeout), **controls) for s in sources
        ]
        lengths = [len(self.tokenizer.encode(self._image_prompt(p))) for p in plans]
        probed = []
        if videos:
            side = self.image_processor.tile_size if sources else 0
            options, block = self._video_setup(video_controls, side)
        for source in videos or []:
            v = load_video(source, options.fps, options.max_frames, options.skip_secs, decode=False)
            text = video_prompt(v, block)
            probed.append((v, text.count(self.image_token), len(self.tokenizer.encode(text))))
        return Preflight(plans, self.image_seq_len, lengths, probed)

    def _image_prompt(self, plan):
        return image_prompt(plan.rows, plan.cols, self.image_seq_len, **self.image_tokens)

    def __call__(self, messages, images=None, add_generation_prompt=True, videos=None,
                 return_pieces=False, **controls):
        """Model inputs as numpy arrays (batch of 1): input_ids, attention_mask and, with images
        or videos, pixel_values and pixel_attention_mask (tiles and frames in prompt order).
        `controls`: do_image_splitting, max_tiles, longest_edge; for videos fps, max_frames,
        skip_secs, frame_size (all off by default). `return_pieces` adds "prompt_pieces": the
        prompt's text between placeholders at even indices, each placeholder's expansion at odd
        ones (the fine-tuning mask maps chat-template spans through them)."""
        prompt, sources = self._prompt_and_images(messages, images, add_generation_prompt)
        self._check_counts(prompt, sources)
        video_controls = {k: controls.pop(k) for k in VIDEO_CONTROLS if k in controls}
        if videos is None and not isinstance(messages, str):
            videos = message_images(messages, "video")
        # frames smaller than the image tiles are padded to them and cost a tile's tokens
        side = self.image_processor.tile_size if sources else 0
        media = self._videos(prompt, videos or [], video_controls, side)
        out, pieces = {}, [prompt]
        if sources:
            pil = [load_image(s, self.timeout) for s in sources]
            pixel_values, mask, plans = self.image_processor(pil, **controls)
            tiles = np.cumsum([0] + [p.num_tiles for p in plans])
            media["image"] = [
                (self._image_prompt(p), pixel_values[0, a:b], mask[0, a:b])
                for p, a, b in zip(plans, tiles, tiles[1:])
            ]
        if media["image"] or media["video"]:
            pieces, pixel_values, mask = self._expand(prompt, media)
            prompt = "".join(pieces)
            out = {"pixel_values": pixel_values, "pixel_attention_mask": mask}
        if return_pieces:
            out["prompt_pieces"] = pieces
        # chat-template output already holds its special tokens, as transformers assumes
        ids = self.tokenizer.encode(prompt, add_special_tokens=isinstance(messages, str))
        input_ids = np.array([ids], dtype=np.int64)
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), **out}

    def _videos(self, prompt, videos, controls, min_side=0):
        n = prompt.count(VIDEO_TOKEN)
        if n != len(videos):
            raise InvalidRequestError(
                f"the prompt has {n} {VIDEO_TOKEN} placeholder(s) but {len(videos)} video(s) "
                "were given"
            )
        if not videos:
            return {"image": [], "video": []}
        options, block = self._video_setup(controls, min_side)
        items = []
        for source in videos:
            video, pixels = video_pixels(
                source, options, options.image_mean, options.image_std, options.rescale_factor
            )
            items.append((video_prompt(video, block), pixels, np.ones(pixels[:, 0].shape, bool)))
        return {"image": [], "video": items}

    def _check_video(self):
        if self.image_processor is None:
            raise InvalidRequestError("this model has no image processor: it takes text only")
        if self.model_type in NO_VIDEO_MODEL_TYPES:
            raise MediaError(
                f"model_type {self.model_type!r} takes no video: it was not trained on video "
                "(transformers' Idefics3Processor has no video input); use a SmolVLM2 checkpoint"
            )

    def _video_setup(self, controls, min_side):
        """Video options with `controls` applied, and the image block of one frame."""
        self._check_video()
        options = VideoOptions(**{**vars(self.video_options), **controls})
        tile, size = self.image_processor.tile_size, options.frame_size
        unit = tile // math.isqrt(self.image_seq_len)  # patch size x scale factor
        # The tile is always whole (the 2.2B's 384 = 9 x 42 + 6: its 27x27 patch grid leaves
        # 6 px unseen). A smaller frame must be whole units, or its patch grid would not
        # divide by the scale factor.
        if not (size == tile or (0 < size < tile and size % unit == 0)):
            raise InvalidRequestError(f"frame_size must be {tile} or a multiple of {unit} below it, got {size}")
        # Tokens per frame follow its (padded) side: a smaller frame_size costs fewer.
        side = max(size, min_side)
        block = image_prompt(0, 0, (side // unit) ** 2, **self.image_tokens)
        return options, block

    def _expand(self, prompt, media):
        """Replace `<image>` / `<video>` in prompt order (returned as the new prompt's pieces);
        stack their tiles and frames, zero-padded to a common size as the reference pads a batch."""
        pattern = f"({re.escape(self.image_token)}|{re.escape(VIDEO_TOKEN)})"
        queues = {self.image_token: iter(media["image"]), VIDEO_TOKEN: iter(media["video"])}
        text, pixels, masks = [], [], []
        for piece in re.split(pattern, prompt):
            if piece in queues:
                piece, p, m = next(queues[piece])
                pixels.append(p)
                masks.append(m)
            text.append(piece)
        H = max(p.shape[2] for p in pixels)
        W = max(p.shape[3] for p in pixels)
        N = sum(len(p) for p in pixels)
        pixel_values = np.zeros((1, N, pixels[0].shape[1], H, W), np.float32)
        mask = np.zeros((1, N, H, W), bool)
        i = 0
        for p, m in zip(pixels, masks):
            pixel_values[0, i : i + len(p), :, : p.shape[2], : p.shape[3]] = p
            mask[0, i : i + len(p), : m.shape[1], : m.shape[2]] = m
            i += len(p)
        return text, pixel_values, mask


def load_processor(path, timeout=URL_TIMEOUT):
    """Load the processor of a checkpoint folder: its tokenizer and, for a VLM, the image and
    video processor settings in the Hub's legacy layout or transformers 5's."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    tokenizer = load_tokenizer(path)
    settings = read_processor_settings(path)
    if settings.image is None:
        return text_processor(tokenizer, timeout)
    model_type = read_json(path / "config.json").get("model_type")
    return Processor(
        tokenizer,
        ImageProcessor.from_dict(settings.image),
        image_seq_len=settings.image_seq_len or DEFAULT_IMAGE_SEQ_LEN,
        timeout=timeout,
        video_options=VideoOptions.from_config(settings.video),
        model_type=model_type,
    )


def text_processor(tokenizer: Tokenizer, timeout=URL_TIMEOUT):
    """A text-only processor around `tokenizer` (e.g. SmolLM2 loaded from a GGUF file)."""
    return Processor(tokenizer, None, timeout=timeout)
