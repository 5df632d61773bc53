"""Peak memory of SmolVLM2 video inputs: vision tower (bounded batches) + chunked prefill.

    python scripts/make_checkpoint.py smolvlm2-256m CKPT --dtype bfloat16
    python bench/video_memory.py CKPT --frames 8 32 64

Frames are random 512x512 pixels and the prompt has the video layout (intro, per frame a
timestamp and a 64-token image block, outro), so the shapes are those of a real video
prompt. Decoding is not run: after prefill it adds one token of KV cache per step.
`--stage vision|prefill` measures one part alone (on a slow CPU a 64-frame vision pass
takes hours; the vision peak is one batch's activations plus the pixel buffer).
`--vision-layers N` keeps N encoder layers: a layer's activations are freed before the next
runs, so the peak is the same but for the dropped layers' weights, which the table adds back.
"""

import argparse
import time

import mlx_smolvlm  # noqa: F401  isort: skip  (first: puts the fast BLAS under mlx.core)
from mlx.utils import tree_flatten

import mlx.core as mx
import numpy as np

from mlx_smolvlm.loading import load_model
from mlx_smolvlm.models.cache import make_prompt_cache
from mlx_smolvlm.video import frame_pixels

GB = 1e9
FRAME_TEXT = 7  # "\nFrame from 00:00:" is about 7 tokens
INTRO = 30


def video_inputs(cfg, frames: int, size: int, rng):
    def text(n):  # stand-ins for the intro, timestamps and the fake/global tokens
        return list(rng.integers(0, cfg.image_token_id, n))

    ids = text(INTRO)
    for _ in range(frames):
        ids += text(FRAME_TEXT + 2) + [cfg.image_token_id] * cfg.image_seq_len + text(1)
    ids += text(12)
    pixels = frame_pixels(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
    return mx.array(np.array([ids], np.int32)), mx.array(pixels[None])


def measure(model, frames, size, chunk, stage, rng):
    input_ids, pixel_values = video_inputs(model.config, frames, size, rng)
    mx.eval(input_ids, pixel_values)
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if stage == "prefill":  # stand-in features of the right shape: the prefill alone
        embeds = model.model.text_model.embed_tokens(input_ids)
    else:
        embeds = model.get_input_embeddings(input_ids, pixel_values)
    mx.eval(embeds)
    del pixel_values  # the processor's copy is dropped once the features exist
    t_vision, peak_vision = time.perf_counter() - t0, mx.get_peak_memory()
    t_prefill = 0.0
    if stage != "vision":
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        for i in range(0, embeds.shape[1], chunk):
            logits = model(None, cache=cache, input_embeddings=embeds[:, i : i + chunk])
            mx.eval(logits, [c.state for c in cache])
        t_prefill = time.perf_counter() - t0
    return input_ids.shape[1], t_vision, peak_vision, t_prefill, mx.get_peak_memory()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--frame-size", type=int, default=512)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--vision-batch", type=int, help="frames per vision-tower pass")
    ap.add_argument("--vision-layers", type=int, help="keep this many vision layers (a proxy)")
    ap.add_argument("--stage", choices=["all", "vision", "prefill"], default="all",
                    help="vision: skip the prefill; prefill: skip the vision tower")
    args = ap.parse_args()

    model = load_model(args.model)
    if args.vision_batch:
        model.vision_batch_size = args.vision_batch
    dropped = 0
    if args.vision_layers:
        layers = model.model.vision_model.encoder.layers
        dropped = sum(v.nbytes for l in layers[args.vision_layers :] for _, v in tree_flatten(l.parameters()))
        model.model.vision_model.encoder.layers = layers[: args.vision_layers]
        del layers  # the dropped layers' weights must really be gone
        mx.clear_cache()
    weights = mx.get_active_memory() + dropped
    rng = np.random.default_rng(0)
    print(f"model {args.model}: weights {weights / GB:.3f} GB, device {mx.default_device()}, "
          f"vision batch {model.vision_batch_size}, prefill chunk {args.prefill_chunk}, "
          f"stage {args.stage}"
          + (f", {args.vision_layers} vision layers (+{dropped / GB:.3f} GB of dropped weights added)"
             if dropped else ""))
    print("| frames | prompt tokens | vision s | peak after vision GB | prefill s | peak GB |")
    print("|---|---|---|---|---|---|")
    for f in args.frames:
        n, tv, pv, tp, peak = measure(
            model, f, args.frame_size, args.prefill_chunk, args.stage, rng
        )
        prefill = "-" if args.stage == "vision" else f"{tp:.1f}"
        pv, peak = pv + dropped, peak + dropped
        print(f"| {f} | {n} | {tv:.1f} | {pv / GB:.3f} | {prefill} | {peak / GB:.3f} |", flush=True)


if __name__ == "__main__":
    main()
