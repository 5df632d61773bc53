"""SmolVLM2 video input: decode, sample frames, frame pixels and the video prompt.

Matches transformers' `SmolVLMVideoProcessor` (frame sampling, two-step resize, no
tiling) and `SmolVLMProcessor.replace_video_token` (the trained video prompt).
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import VideoError

# Strings of transformers' processing_smolvlm.py; the model was trained on them.
VIDEO_INTRO = (
    "You are provided the following series of {frame_count} frames "
    "from a {video_duration} [H:MM:SS] video.\n"
)
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"
MAX_IMAGE_SIZE = 4096
# FFmpeg may open only real containers and only the one file: never concat lists, HLS
# playlists, image2 patterns or anything else that reads other files or URLs.
DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif"
OPEN_OPTIONS = {"format_whitelist": DEMUXERS, "protocol_whitelist": "file"}
# transformers' SmolVLM2 DEFAULT_CHAT_TEMPLATE: the reference renders any conversation that
# holds a video with it, whatever template the checkpoint ships.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class VideoOptions:
    """How frames are sampled and sized; `from_config` reads a preprocessor config."""

    fps: float = 1.0
    max_frames: int = 64
    skip_secs: float = 1.0
    longest_edge: int = 2048  # first resize: the frame's longest edge (the reference's `size`)
    frame_size: int = 512  # second resize: a square frame (`max_image_size`), one image block
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "VideoOptions":
        # As SmolVLMVideoProcessor.__init__: `size` wins over `video_sampling.video_size`.
        sampling = cfg.get("video_sampling", {})
        size = cfg.get("size") or sampling.get("video_size") or {"longest_edge": 4 * 364}
        opts = cls(
            fps=sampling.get("fps", 1.0),
            max_frames=sampling.get("max_frames", 64),
            longest_edge=size["longest_edge"],
            frame_size=cfg.get("max_image_size", {"longest_edge": 364})["longest_edge"],
            image_mean=tuple(cfg.get("image_mean", cls.image_mean)),
            image_std=tuple(cfg.get("image_std", cls.image_std)),
            rescale_factor=cfg.get("rescale_factor", cls.rescale_factor),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        return opts


@dataclass
class VideoFrames:
    """Sampled frames of one video: RGB uint8 (N, H, W, 3) at the decoded size, upright."""

    path: str
    frames: np.ndarray | None  # None when only probed (load_video(decode=False))
    indices: np.ndarray
    fps: float  # the stream's average frame rate
    total_frames: int
    duration: float  # seconds, total_frames / fps as the reference computes it
    decoded_frames: int = 0  # frames decoded to reach the sampled ones (from keyframes)

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.indices]


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    duration: float,
    fps: float,
    max_frames: int,
    skip_secs: float = 1,
) -> np.ndarray:
    """Frame indices exactly as `SmolVLMVideoProcessor.sample_frames`."""
    desired = max(min(int(round(fps * duration)), max_frames), 1)
    start, end = 0, total_frames - 1
    # The reference compares the kept span with max_frames * fps (not / fps); kept as is.
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * video_fps)
        end = int(total_frames - skip_secs * video_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def open_video(path: Path):
    """The container at `path` (one of DEMUXERS, local files only) with a decodable video
    stream; VideoError otherwise."""
    import av

    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty")
    try:  # metadata in no valid UTF-8 must not fail the open (UnicodeDecodeError)
        container = av.open(str(path), options=dict(OPEN_OPTIONS), metadata_errors="replace")
    except av.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video in a supported container "
                         f"(mp4/mov, mkv/webm, avi, gif) ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream (audio only?)")
    if container.streams.video[0].codec_context is None:  # a codec id FFmpeg has no decoder for
        container.close()
        raise VideoError(f"{path}: the video stream's codec is not supported")
    return container


def _frame_pts(container, stream, limit: int | None = None) -> tuple[list[int], set[int]]:
    # Demux without decoding: presentation-ordered pts of every frame (frame i is the
    # i-th frame the decoder emits, as the reference counts) and the keyframes among them.
    pts, keys = [], set()
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        pts.append(packet.pts)
        if limit is not None and len(pts) > limit:  # each packet costs ~10 us to demux
            raise VideoError(f"the video has more than {limit} frames")
        if packet.is_keyframe:
            keys.add(packet.pts)
    container.seek(0)
    return sorted(pts), keys


def _key_before(keys: np.ndarray, x: int) -> int | None:
    # The last of the sorted `keys` at or before `x` (the first if none is; None if no keys).
    return int(keys[max(np.searchsorted(keys, x, side="right") - 1, 0)]) if len(keys) else None


def _decode(container, stream, pts: list[int], keys: set[int], indices: np.ndarray, limit: int | None = None):
    # Seek to the keyframe before a wanted frame when that skips decoding; otherwise
    # decode on. Yields only the wanted frames. More than `limit` frames from the decoder
    # is a VideoError: a seek index that lands before the flagged keyframes would otherwise
    # decode the video up to once per sampled frame, past the budget `_decoded_count` judged.
    key_pts = np.array(sorted(keys), np.int64)
    it, last, produced = None, None, 0
    for target in (pts[i] for i in indices):
        k = _key_before(key_pts, target)
        if it is None or (k is not None and last is not None and k > last):
            container.seek(k if k is not None else 0, stream=stream, backward=True)
            it = container.decode(stream)
        for frame in it:
            produced += 1
            if limit is not None and produced > limit:
                raise VideoError(f"{container.name}: reaching the sampled frames decodes more than {limit} "
                                 "frames (the seek index and the keyframes disagree)")
            last = frame.pts
            if frame.pts is not None and frame.pts >= target:
                yield frame
                break
        else:
            return


def _decoded_count(pts: list[int], keys: set[int], indices: np.ndarray) -> int:
    # How many frames `_decode` runs through: from the keyframe before a wanted frame when
    # it seeks, else on from the last wanted one.
    key_idx = np.array([i for i, p in enumerate(pts) if p in keys], np.int64)
    n, last = 0, None
    for i in indices:
        j = _key_before(key_idx, i) or 0
        start = j if last is None or j > last else last + 1
        n += i - start + 1
        last = i
    return int(n)


def _reason(e) -> str:
    return e.strerror or type(e).__name__


def load_video(
    path,
    fps: float = 1.0,
    max_frames: int = 64,
    skip_secs: float = 1.0,
    decode: bool = True,
    frame_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    max_total_frames: int | None = None,
) -> VideoFrames:
    """Decode only the frames SmolVLM2 samples from `path`, upright, as RGB uint8.

    `frame_fn` maps each frame as soon as it is decoded (a resize: full-size frames are
    then never all held). With `decode=False` nothing is decoded: `frames` is None.
    `max_total_frames` refuses a longer video while demuxing it.
    """
    import av

    path = Path(path)
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            pts, keys = _frame_pts(container, stream, max_total_frames)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video is corrupt ({_reason(e)})") from None
        # The reference trusts the container's frame count; fall back to the demuxed one.
        total = min(stream.frames, len(pts)) if stream.frames else len(pts)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if total == 0 or rate <= 0:
            raise VideoError(f"{path}: the video has no frames")
        duration = total / rate
        indices = sample_frame_indices(total, rate, duration, fps, max_frames, skip_secs)
        if not decode:
            return VideoFrames(str(path), None, indices, rate, total, duration,
                               _decoded_count(pts, keys, indices))
        frames, declared = [], stream.codec_context.width * stream.codec_context.height
        # Twice the count, plus a few frames per seek (leading B-frames of an open GOP).
        limit = 2 * _decoded_count(pts, keys, indices) + 8 * len(indices)
        try:
            for f in _decode(container, stream, pts, keys, indices, limit):
                if declared and f.width * f.height > declared:  # budgets were judged on the header
                    raise VideoError(f"{path}: a frame of {f.width}x{f.height} is larger than the stream's "
                                     f"{stream.codec_context.width}x{stream.codec_context.height}")
                rgb = _upright(f.to_ndarray(format="rgb24"), f.rotation)
                frames.append(frame_fn(rgb) if frame_fn else rgb)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video is corrupt ({_reason(e)})") from None
        if not frames:
            raise VideoError(f"{path}: no frame could be decoded (truncated or corrupt video)")
        frames = np.stack(frames)
    finally:
        container.close()
    return VideoFrames(str(path), frames, indices[: len(frames)], rate, total, duration)


def _upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
    # The display matrix turns the stored frame counterclockwise by `rotation` degrees.
    k = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The reference's first resize: longest edge to `longest_edge`, the other even."""
    side = min(MAX_IMAGE_SIZE, longest_edge)
    if width >= height:
        h, w = int(side / (width / height)), side
        h += h % 2
    else:
        h, w = side, int(side * (width / height))
        w += w % 2
    return max(h, 1), max(w, 1)


def _lanczos(x: np.ndarray) -> np.ndarray:
    # Lanczos-3: sinc(x) * sinc(x / 3) on [-3, 3)
    return np.where((x >= -3) & (x < 3), np.sinc(x) * np.sinc(x / 3), 0.0)


def _axis_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices, int weights and their fixed-point shift for one axis.

    torch's uint8 antialiased resize (what the reference runs on frames): Pillow's
    support and weights, normalized in float64, then rounded to int16 with as many
    fraction bits as the largest weight allows.
    """
    scale = in_size / out_size
    support = 3.0 * scale if scale >= 1 else 3.0
    inv = 1 / scale if scale >= 1 else 1.0
    taps = int(np.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, taps), np.int64)
    w = np.zeros((out_size, taps))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        ww = _lanczos((np.arange(n) + lo - center + 0.5) * inv)
        idx[i, :n], idx[i, n:] = lo + np.arange(n), lo
        w[i, :n] = ww / ww.sum()
    bits = next(b for b in range(23) if b == 22 or int(0.5 + w.max() * (1 << (b + 1))) >= 1 << 15)
    q = np.trunc(w * (1 << bits) + np.where(w < 0, -0.5, 0.5)).astype(np.int32)
    return idx, q, bits


@lru_cache(maxsize=16)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    idx, q, bits = _axis_taps(in_size, out_size)
    return idx.astype(np.intp), q, bits


def _resample(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    # int32 in [0, 255] -> the same along `axis` resized to `size`, rounded and clipped per
    # pass as the reference's uint8 kernel does. numpy, not MLX: the processor runs beside the
    # engine thread, which owns every MLX array; integer arithmetic, so the result is exact.
    if x.shape[axis] == size:
        return x
    idx, q, bits = _taps(x.shape[axis], size)
    x = np.moveaxis(x, axis, 0)
    extra = (slice(None),) + (None,) * (x.ndim - 1)
    acc = np.full((size, *x.shape[1:]), 1 << (bits - 1), np.int32)
    for t in range(idx.shape[1]):
        acc += q[:, t][extra] * np.take(x, idx[:, t], axis=0)
    return np.moveaxis(np.clip(acc >> bits, 0, 255), 0, axis)


def resize_frame(frame: np.ndarray, longest_edge: int, frame_size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (frame_size, frame_size, 3) uint8, resized twice as the reference:
    Lanczos with antialias, bit-exact with torch's uint8 kernel (separable, horizontal pass
    first). One frame at a time: the first resize may upscale to 2048 px."""
    h, w = resized_shape(*frame.shape[:2], longest_edge)
    x = _resample(_resample(frame.astype(np.int32), w, 1), h, 0)
    return _resample(_resample(x, frame_size, 1), frame_size, 0).astype(np.uint8)


def frame_pixels(frames: np.ndarray, mean=(0.5,) * 3, std=(0.5,) * 3, rescale=1 / 255):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), rescale and normalize fused as the reference."""
    # float32 mean * (1 / rescale): 127.5 exactly for mean 0.5, as torch computes it
    m = np.array(mean, np.float32) * np.float32(1 / rescale)
    s = np.array(std, np.float32) * np.float32(1 / rescale)
    x = frames.astype(np.float32).transpose(0, 3, 1, 2)
    return (x - m[:, None, None]) / s[:, None, None]


def video_pixels(source, options: VideoOptions, mean=(0.5,) * 3, std=(0.5,) * 3, rescale=1 / 255):
    """Load a video as the vision tower takes it: its `VideoFrames` (frames resized as they
    are decoded) and float32 pixels (N, 3, frame_size, frame_size)."""
    def resize(frame):
        return resize_frame(frame, options.longest_edge, options.frame_size)

    video = load_video(source, options.fps, options.max_frames, options.skip_secs, frame_fn=resize)
    return video, frame_pixels(video.frames, mean, std, rescale)


def video_prompt(video: VideoFrames, frame_block: str) -> str:
    """The text that replaces one `<video>`: intro, per frame a timestamp and `frame_block`
    (the unsplit-image block of the frame's tokens), outro."""
    from num2words import num2words

    # The reference writes the padded frame count of the whole batch here; with several
    # videos of different lengths that miscounts, so each video states its own count.
    text = VIDEO_INTRO.format(
        frame_count=num2words(len(video.indices)),
        video_duration=str(timedelta(seconds=int(video.duration))),
    )
    for t in video.timestamps:
        stamp = f"{int(t // 60):02d}:{int(t % 60):02d}"
        text += FRAME_TIMESTAMP.format(timestamp=stamp) + frame_block
    return text + MEDIA_OUTRO
