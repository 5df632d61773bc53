"""Running streams' inter-token latency, and a newcomer's time to first token, while a
64-frame video joins the batch engine.

    python bench/batch_latency.py                   # SmolVLM2-256M widths, 1 vision + 2 text layers
    python bench/batch_latency.py --frames 32 --frame-size 128

`--streams` text requests decode (greedy) until they are all running; then a request with a
`--frames`-frame video and, right behind it, a short text request (the newcomer) are queued.
The engine is stepped on this thread, as the server's engine thread does. Reported: the
running streams' gaps between tokens from the video's arrival until the newcomer's and the
video's first tokens are both out (p50 / p95 / max), and each newcomer's time to first token.
The processor runs before the clock starts (the server runs it before the engine sees a request).
The model: SmolVLM2-256M's real config with random float32 weights and fewer layers
(bench/server_concurrency.py's reduced_checkpoint).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def video_file(frames: int, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from video_synth import make_video

    path = folder / f"video{frames}.mp4"
    make_video(path, frames / 8, 8, 128, 96)
    return path


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--frame-size", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=1)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    from mlx_smolvlm import load  # first: it puts the system BLAS under MLX (blas.py)
    from mlx_smolvlm.batch import BatchEngine, SamplingParams

    import mlx.core as mx

    from server_concurrency import reduced_checkpoint

    path = reduced_checkpoint(args.vision_layers, args.text_layers, "smolvlm2-256m")
    model, processor = load(path, dtype=mx.float32)
    engine = BatchEngine(model, processor, max_batch=args.streams + 2)
    times: dict[str, list[float]] = {}

    def on(name):
        times[name] = []
        return lambda e: times[name].append(time.perf_counter()) if e.token is not None else None

    def text(i):
        return processor([{"role": "user", "content": [{"type": "text", "text": f"Story number {i}: tell it."}]}])

    for i in range(args.streams):
        engine.add(text(i), SamplingParams(max_tokens=2000), on(f"stream{i}"))
    while any(not times.get(f"stream{i}") for i in range(args.streams)):
        engine.step()
    for _ in range(5):
        engine.step()

    with tempfile.TemporaryDirectory() as tmp:
        path = video_file(args.frames, Path(tmp))
        video = processor([{"role": "user", "content": [{"type": "video", "path": str(path)},
                                                        {"type": "text", "text": "Describe this video."}]}],
                          fps=8, max_frames=args.frames, frame_size=args.frame_size)
    newcomer = text(99)
    n_video = video["input_ids"].shape[1]
    t0 = time.perf_counter()
    engine.add(video, SamplingParams(max_tokens=2000), on("video"))
    engine.add(newcomer, SamplingParams(max_tokens=2000), on("newcomer"))
    while not (times["video"] and times["newcomer"]):
        engine.step()
    t1 = time.perf_counter()
    # gaps that end in the window, counted from its start at the earliest
    gaps = [b - max(a, t0) for i in range(args.streams)
            for a, b in zip(times[f"stream{i}"], times[f"stream{i}"][1:]) if t0 < b <= t1]
    ms = lambda x: f"{1000 * x:.0f}"  # noqa: E731
    print(f"| {args.label} | {args.frames} frames, {n_video} prompt tokens | {len(gaps)} | "
          f"{ms(statistics.median(gaps))} / {ms(pct(gaps, 0.95))} / {ms(max(gaps))} | "
          f"{ms(times['newcomer'][0] - t0)} | {ms(times['video'][0] - t0)} |")


if __name__ == "__main__":
    main()
