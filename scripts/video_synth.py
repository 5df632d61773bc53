"""Synthetic test videos whose frames show their own index.

x264's output differs between machines and PyAV/FFmpeg builds, so the tests do not encode their
golden inputs: `python scripts/video_synth.py` writes them once to tests/fixtures/video/media/
(committed), and the goldens (scripts/make_video_golden.py) are made from those exact bytes.
make_video also serves the tests' bad-input cases, whose bytes do not matter.
"""

import sys
from pathlib import Path

import av
import numpy as np

BITS = 12  # index blocks per frame: up to 4095 frames

# name: (seconds, fps, width, height, codec, pix_fmt, display rotation in degrees)
VIDEOS = {
    "short_24fps": (3, 24, 96, 64, "libx264", "yuv420p", 0),
    "long_30fps": (70, 30, 64, 48, "libx264", "yuv420p", 0),
    "portrait_30fps": (2, 30, 48, 80, "libx264", "yuv420p", 0),
    "odd_size": (3, 25, 75, 45, "libx264", "yuv444p", 0),
    "mpeg4_odd": (2, 24, 75, 45, "mpeg4", "yuv420p", 0),
    "rotated_90": (3, 24, 96, 64, "libx264", "yuv420p", 90),
}


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """Frame `i`: its index as 12 black/white blocks on top, a colour ramp keyed to i below."""
    img = np.empty((height, width, 3), np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    img[..., 0] = (x * 255 // max(width - 1, 1) + 7 * i) % 256
    img[..., 1] = (y * 255 // max(height - 1, 1) + 3 * i) % 256
    img[..., 2] = (11 * i) % 256
    bw = max(width // BITS, 1)
    for b in range(BITS):
        img[: height // 4, b * bw : (b + 1) * bw] = 255 if (i >> b) & 1 else 0
    return img


def make_video(path, seconds, fps, width, height, codec="libx264", pix_fmt="yuv420p", rotation=0):
    """Write a video of `seconds * fps` index-coded frames; a small GOP so seeking is exercised."""
    path = Path(path)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        s.gop_size = 12
        s.codec_context.thread_count = 1  # threaded x264 encodes are not byte-reproducible
        if codec == "libx264":
            s.options = {"crf": "18", "bf": "2"}
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


MEDIA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "video" / "media"


def make_all(folder) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: make_video(folder / f"{name}.mp4", *spec) for name, spec in VIDEOS.items()}


def shipped() -> dict[str, Path]:
    """The committed test videos, by name."""
    return {name: MEDIA / f"{name}.mp4" for name in VIDEOS}


if __name__ == "__main__":
    # Rewrites the committed inputs: regenerate the video goldens afterwards.
    made = make_all(sys.argv[1] if len(sys.argv) > 1 else MEDIA)
    print({name: path.stat().st_size for name, path in made.items()})
