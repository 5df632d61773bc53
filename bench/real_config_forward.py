"""Load a real-config random checkpoint and run one image tile with a text prompt.

    python scripts/make_checkpoint.py smolvlm-256m /tmp/256m --dtype bfloat16
    python bench/real_config_forward.py /tmp/256m --text-tokens 100 [--compare]

Prints load time, vision / full-forward time and peak memory; `--compare` also runs
transformers (float32) on the same inputs and prints the max logit difference.
"""

import argparse
import time

import mlx_smolvlm  # noqa: F401  isort: skip  (first: puts the fast BLAS under mlx.core)
import mlx.core as mx
import numpy as np

from mlx_smolvlm.loading import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compare", action="store_true", help="compare logits with transformers (float32)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = load_model(args.path, dtype=getattr(mx, args.dtype) if args.dtype else None)
    load_s = time.perf_counter() - t0
    cfg = model.config
    S, T = cfg.vision_config.image_size, cfg.image_seq_len
    rng = np.random.default_rng(0)
    pv = rng.uniform(-1, 1, (1, 1, 3, S, S)).astype(np.float32)
    n_text = args.text_tokens
    ids = rng.integers(3, 49152, (1, n_text + T))
    ids[0, n_text // 2 : n_text // 2 + T] = cfg.image_token_id
    ids_mx, pv_mx = mx.array(ids), mx.array(pv)

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    embeds = model.get_input_embeddings(ids_mx, pv_mx)
    mx.eval(embeds)
    vision_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = model(ids_mx, input_embeddings=embeds)
    mx.eval(logits)
    prefill_s = time.perf_counter() - t0
    dtype = model.model.text_model.norm.weight.dtype
    print(f"| {mlx_smolvlm.blas.describe()} |")
    print(f"| checkpoint | {args.path} ({dtype}) |")
    print(f"| prompt | {ids.shape[1]} tokens ({T} image tokens, one {S}x{S} tile) |")
    print(f"| load s | {load_s:.2f} |")
    print(f"| vision + connector s | {vision_s:.2f} |")
    print(f"| decoder prefill s | {prefill_s:.2f} |")
    print(f"| peak memory GB | {mx.get_peak_memory() / 1e9:.2f} |")
    print(f"| logits finite | {bool(mx.isfinite(logits).all())} |")

    if args.compare:
        import torch
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(args.path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pv)).logits.numpy()
        ours = np.array(logits.astype(mx.float32))
        diff = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
        agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
        print(f"| max logit diff vs transformers f32 (relative) | {diff:.2e} |")
        print(f"| argmax agreement | {agree:.3f} |")


if __name__ == "__main__":
    main()
