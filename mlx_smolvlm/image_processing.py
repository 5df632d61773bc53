"""SmolVLM / Idefics3 image processor in numpy + Pillow.

Mirrors transformers' `image_processing_pil_smolvlm.py` (identical in idefics3): every resize is a
Pillow resize of a uint8 RGB image, so pixels match the reference bit for bit.
"""

import base64
import io
import math
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, InvalidRequestError

# transformers' MAX_IMAGE_SIZE: a hard cap (4k) applied after the longest-edge resize
MAX_IMAGE_SIZE = 4096
URL_TIMEOUT = 10.0


def _name(source):
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    text = str(source)
    return text if len(text) < 80 else text[:77] + "..."


def _read_bytes(source, timeout):
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=timeout) as r:
                return r.read()
        except Exception as e:
            reason = getattr(e, "reason", None) or e
            raise ImageError(f"image {_name(source)}: cannot download ({reason})") from None
    if text.startswith("data:image/"):
        try:
            return base64.b64decode(text.split(",", 1)[1], validate=True)
        except Exception:
            raise ImageError(f"image {_name(source)}: invalid base64 data URI") from None
    path = Path(source)
    if path.is_file():
        return path.read_bytes()
    if len(text) > 256:
        # transformers' load_image also takes a bare base64 string
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:
            pass
    raise ImageError(f"image {_name(source)}: no such file")


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes as transformers' `load_image` does: EXIF orientation, then RGB."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except Image.UnidentifiedImageError:
        raise ImageError(f"image {name}: not a supported image format") from None
    except Exception as e:  # Pillow's decoders also raise RuntimeError, struct.error, EOFError...
        raise ImageError(f"image {name}: truncated or corrupt ({e})") from None


def load_image(source, timeout=URL_TIMEOUT):
    """Open an image from a path, an http(s) URL, a base64 string or data URI, or a PIL image.

    Sources given by name are decoded as transformers' `load_image` does: EXIF orientation
    applied, then `convert("RGB")` (alpha dropped, not composited). PIL images are returned
    unchanged; `to_rgb` composites their alpha onto white, as the reference does.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path)):
        image = decode_image(_read_bytes(source, timeout), _name(source))
    else:
        kind = type(source).__name__
        raise ImageError(f"image {_name(source)}: expected a path, URL or PIL image, got {kind}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image {_name(source)}: zero-size image ({image.width}x{image.height})")
    return image


def to_rgb(image):
    """RGB PIL image; transparency is composited onto white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def _fit_longest_edge(height, width, max_len):
    # transformers' _resize_output_size_rescale_to_max_len: the short side is rounded up to even
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def _cap_size(height, width, max_len):
    # transformers' _resize_output_size_scale_below_upper_bound
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def _tile_multiple(height, width, tile):
    # transformers' resize_for_vision_encoder; the second side is derived from the new first side
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


@dataclass
class ImagePlan:
    """Sizes, tiles and image tokens for one image, known before any pixel work."""

    height: int
    width: int
    resized: tuple  # (height, width) after the longest-edge resize
    encoder_size: tuple  # (height, width) before tiling (a tile square when unsplit)
    rows: int
    cols: int

    @property
    def num_tiles(self):
        """Images sent to the vision encoder: rows x cols tiles plus the global image."""
        return self.rows * self.cols + 1 if self.rows else 1


@dataclass
class ImageProcessor:
    """Parameters as in the checkpoint's preprocessor_config.json (defaults are the reference's)."""

    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict = field(default_factory=lambda: {"longest_edge": 364})
    resample: int = Image.Resampling.LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_convert_rgb: bool = True
    do_image_splitting: bool = True
    do_pad: bool = True

    @classmethod
    def from_dict(cls, config):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def tile_size(self):
        return self.max_image_size["longest_edge"]

    def plan(self, height, width, do_image_splitting=None, max_tiles=None, longest_edge=None):
        """Output sizes and tile grid for an upright `height` x `width` image.

        `do_image_splitting`, `longest_edge` override the config; `max_tiles` caps rows x cols by
        lowering the longest edge one tile at a time (off by default: exact reference behaviour).
        """
        if height < 1 or width < 1:
            raise ImageError(f"zero-size image ({width}x{height})")
        split = self.do_image_splitting if do_image_splitting is None else do_image_splitting
        edge = self.size["longest_edge"] if longest_edge is None else longest_edge
        if edge < 1:
            raise InvalidRequestError(f"longest_edge must be positive, got {edge}")
        if max_tiles is not None and max_tiles < 1:
            raise InvalidRequestError(f"max_tiles must be at least 1, got {max_tiles}")
        tile = self.tile_size
        while True:
            resized = (height, width)
            if self.do_resize:
                resized = _cap_size(*_fit_longest_edge(height, width, edge), MAX_IMAGE_SIZE)
            if not split:
                return ImagePlan(height, width, resized, (tile, tile), 0, 0)
            h, w = _tile_multiple(*resized, tile)
            rows, cols = (h // tile, w // tile) if h > tile or w > tile else (0, 0)
            if max_tiles is None or rows * cols <= max_tiles or edge <= tile:
                return ImagePlan(height, width, resized, (h, w), rows, cols)
            edge = max(edge - tile, tile)

    def _resize(self, image, size):
        return image.resize((size[1], size[0]), resample=self.resample)

    def tiles(self, image, plan):
        """The uint8 (H, W, 3) crops for `plan`: tiles row-major, then the global image."""
        if self.do_resize:
            image = self._resize(image, plan.resized)
        image = self._resize(image, plan.encoder_size)
        if not plan.rows:
            return [np.asarray(image)]
        t = self.tile_size
        pixels = np.asarray(image)
        crops = [
            pixels[r * t : (r + 1) * t, c * t : (c + 1) * t]
            for r in range(plan.rows)
            for c in range(plan.cols)
        ]
        return crops + [np.asarray(self._resize(image, (t, t)))]

    def normalize(self, pixels):
        """uint8 (H, W, C) -> float32 (C, H, W), rescaled and normalized as the reference does."""
        x = pixels.transpose(2, 0, 1)
        if self.do_rescale:
            # float64 product then float32, like transformers' rescale
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def __call__(self, images, **controls):
        """Process PIL images into `pixel_values` (1, N, 3, H, W) float32,
        `pixel_attention_mask` (1, N, H, W) bool and one `ImagePlan` per image."""
        plans, arrays = [], []
        for image in images:
            rgb = to_rgb(image) if self.do_convert_rgb else image
            plan = self.plan(rgb.height, rgb.width, **controls)
            plans.append(plan)
            arrays.extend(self.normalize(t) for t in self.tiles(rgb, plan))
        H = max(a.shape[1] for a in arrays)
        W = max(a.shape[2] for a in arrays)
        pixel_values = np.zeros((1, len(arrays), arrays[0].shape[0], H, W), np.float32)
        mask = np.zeros((1, len(arrays), H, W), bool)
        for i, a in enumerate(arrays):
            pixel_values[0, i, :, : a.shape[1], : a.shape[2]] = a
            mask[0, i, : a.shape[1], : a.shape[2]] = True
        return pixel_values, mask, plans
