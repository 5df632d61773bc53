"""What a request's media may cost, judged from headers before anything is decoded.

Images: the pixel count in the header. Videos: the container must be one FFmpeg demuxer of
video.DEMUXERS (opened with FFmpeg's format and protocol whitelists); the frame size comes
from the stream header, and the frame count, duration, sampled frames and the frames the
decoder must run through to reach them (from the keyframe before each) from demuxing the
packets, without decoding: headers that understate the frame count change nothing.
"""

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import MediaError, VideoError
from .video import load_video, open_video


class MediaRefused(MediaError):
    """Media over a limit or in a refused format; the message names no server path."""


@dataclass
class MediaBudget:
    max_image_pixels: int = 4096 * 4096
    max_video_seconds: float = 600.0
    max_video_frames: int = 100_000  # frames in the file: demuxing costs ~10 us each
    max_video_frame_pixels: int = 3840 * 2160
    # Frames decoded (from the keyframe before each sampled one) x width x height: about
    # 16,500 frames of 1920x1088, what 64 samples of a 10-minute video with 10 s GOPs need.
    max_video_decode_pixels: int = 2**35
    # Sampled frames x width x height: each sampled frame is resized at full size (seconds
    # per 4K frame on a CPU). 64 frames of 1920x1088 fit.
    max_video_sample_pixels: int = 64 * 1920 * 1088
    fps: float = 1.0  # the processor's frame sampling, to count the sampled frames
    max_frames: int = 64
    skip_secs: float = 1.0


def image_size(data: bytes, budget: MediaBudget) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            w, h = im.size
    except Exception:
        raise MediaRefused("not a supported image format") from None
    if w * h > budget.max_image_pixels:
        raise MediaRefused(f"image of {w}x{h} pixels is over the limit of {budget.max_image_pixels}")
    return w, h


def check_video(path: str, budget: MediaBudget) -> dict:
    """Container and stream metadata of the video at `path`, if within `budget`."""
    try:  # every VideoError names `path`; the message sent back must not
        with open_video(Path(path)) as container:
            ctx = container.streams.video[0].codec_context
            w, h, fmt = ctx.width, ctx.height, container.format.name
        if w <= 0 or h <= 0:
            raise MediaRefused("the video stream has no frame size")
        if w * h > budget.max_video_frame_pixels:
            raise MediaRefused(f"video frames of {w}x{h} are over the limit of {budget.max_video_frame_pixels} pixels")
        # demuxes every packet (bounded by the body size) but decodes nothing
        v = load_video(path, budget.fps, budget.max_frames, budget.skip_secs, decode=False,
                       max_total_frames=budget.max_video_frames)
    except VideoError as e:
        raise MediaRefused(str(e).removeprefix(f"{path}: ")) from None
    sampled = len(v.indices)
    info = {"format": fmt, "width": w, "height": h, "frames": v.total_frames, "seconds": v.duration,
            "sampled": sampled, "decoded": v.decoded_frames}
    if v.duration > budget.max_video_seconds:
        raise MediaRefused(f"video of {v.duration:.0f} s is over the limit of {budget.max_video_seconds:g} s")
    if sampled * w * h > budget.max_video_sample_pixels:
        raise MediaRefused(f"{sampled} sampled frames of {w}x{h} are over the budget of "
                           f"{budget.max_video_sample_pixels} pixels")
    if v.decoded_frames * w * h > budget.max_video_decode_pixels:
        raise MediaRefused(f"decoding {v.decoded_frames} frames of {w}x{h} is over the decode budget of "
                           f"{budget.max_video_decode_pixels} pixels")
    return info
