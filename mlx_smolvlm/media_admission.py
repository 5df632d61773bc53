"""What a request's media may cost, judged from headers before anything is decoded.

Images: the pixel count in the header. Videos: the container must be one FFmpeg demuxer of
video.DEMUXERS (opened with FFmpeg's format and protocol whitelists), and its stream
metadata (frame size, frame count, duration) must fit a budget, since the frames that are
sampled may each need every frame since the last keyframe decoded.
"""

import io
from dataclasses import dataclass

from PIL import Image

from .errors import MediaError
from .video import OPEN_OPTIONS


class MediaRefused(MediaError):
    """Media over a limit or in a refused format; the message names no server path."""


@dataclass
class MediaBudget:
    max_image_pixels: int = 4096 * 4096
    max_video_seconds: float = 600.0
    max_video_frame_pixels: int = 3840 * 2160
    max_video_decode_pixels: int = 2**31  # frames x width x height of one video
    # Sampled frames x width x height: each sampled frame is resized at full size (seconds
    # per 4K frame on a CPU). 64 frames of 1920x1088 fit.
    max_video_sample_pixels: int = 64 * 1920 * 1088
    fps: float = 1.0  # the processor's frame sampling, to count the sampled frames
    max_frames: int = 64


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
    import av

    try:
        container = av.open(path, options=dict(OPEN_OPTIONS))
    except av.FFmpegError:
        raise MediaRefused("not a video in a supported container (mp4/mov, mkv/webm, avi, gif)") from None
    try:
        if not container.streams.video:
            raise MediaRefused("the video has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = (container.duration or 0) / av.time_base
        frames = stream.frames or int(seconds * rate + 1)
    finally:
        container.close()
    info = {"format": container.format.name, "width": w, "height": h, "frames": frames, "seconds": seconds}
    if budget.fps <= 0 or budget.max_frames <= 0:
        raise MediaRefused("video sampling is not configured")
    if w <= 0 or h <= 0 or rate <= 0:
        raise MediaRefused("the video stream has no frame size or frame rate")
    if w * h > budget.max_video_frame_pixels:
        raise MediaRefused(f"video frames of {w}x{h} are over the limit of {budget.max_video_frame_pixels} pixels")
    if seconds > budget.max_video_seconds:
        raise MediaRefused(f"video of {seconds:.0f} s is over the limit of {budget.max_video_seconds:g} s")
    sampled = min(max(round(budget.fps * seconds), 1), budget.max_frames, frames)
    if sampled * w * h > budget.max_video_sample_pixels:
        raise MediaRefused(f"{sampled} sampled frames of {w}x{h} are over the budget of "
                           f"{budget.max_video_sample_pixels} pixels")
    if frames * w * h > budget.max_video_decode_pixels:
        raise MediaRefused(f"video of {frames} frames of {w}x{h} is over the decode budget of "
                           f"{budget.max_video_decode_pixels} pixels")
    return info
