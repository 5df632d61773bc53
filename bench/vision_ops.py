"""Where a SigLIP layer's time goes on one tile: each op in MLX (CPU) next to torch.

    python bench/vision_ops.py [--runs 5] [--hidden 768 --mlp 3072 --heads 12 --tokens 1024]

Prints per-op median ms for MLX float32, MLX bfloat16 and torch float32, and the layer sum
(x layers gives the tower). Which BLAS MLX uses is printed first (mlx_smolvlm/blas.py).
"""

import argparse
import statistics
import time

import mlx_smolvlm  # noqa: F401  isort: skip  (first: puts the fast BLAS under mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
import torch.nn.functional as F

from mlx_smolvlm.models.vision import gelu_tanh


def ops(lib, L, D, M, H, dtype):
    """name -> zero-argument callable for one SigLIP layer's ops on (1, L, D) activations."""
    rng = np.random.default_rng(0)
    shapes = {"x": (1, L, D), "w": (D, D), "w1": (M, D), "w2": (D, M), "q": (1, H, L, D // H), "h": (1, L, M)}
    a = {k: rng.standard_normal(s).astype(np.float32) * 0.05 for k, s in shapes.items()}
    if lib == "mlx":
        t = {k: mx.array(v).astype(dtype) for k, v in a.items()}
        g, b = mx.ones((D,), dtype), mx.zeros((D,), dtype)
        mask = mx.ones((1, 1, 1, L), mx.bool_)
        return {
            "q/k/v/out proj (4x)": lambda: [t["x"] @ t["w"].T for _ in range(4)],
            "fc1": lambda: t["x"] @ t["w1"].T,
            "fc2": lambda: t["h"] @ t["w2"].T,
            "attention (sdpa)": lambda: mx.fast.scaled_dot_product_attention(t["q"], t["q"], t["q"], scale=0.125),
            "attention (sdpa, bool mask)": lambda: mx.fast.scaled_dot_product_attention(
                t["q"], t["q"], t["q"], scale=0.125, mask=mask),
            "gelu tanh": lambda: gelu_tanh(t["h"]),
            "layer norm (2x)": lambda: [mx.fast.layer_norm(t["x"], g, b, 1e-6) for _ in range(2)],
        }
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    return {
        "q/k/v/out proj (4x)": lambda: [F.linear(t["x"], t["w"]) for _ in range(4)],
        "fc1": lambda: F.linear(t["x"], t["w1"]),
        "fc2": lambda: F.linear(t["h"], t["w2"]),
        "attention (sdpa)": lambda: F.scaled_dot_product_attention(t["q"], t["q"], t["q"]),
        "attention (sdpa, bool mask)": lambda: F.scaled_dot_product_attention(t["q"], t["q"], t["q"]),
        "gelu tanh": lambda: F.gelu(t["h"], approximate="tanh"),
        "layer norm (2x)": lambda: [F.layer_norm(t["x"], (D,), eps=1e-6) for _ in range(2)],
    }


def median_ms(fn, runs, sync):
    sync(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--mlp", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.tokens, args.hidden, args.mlp, args.heads)
    cols = {
        "MLX f32": (ops("mlx", *shape, mx.float32), mx.eval),
        "MLX bf16": (ops("mlx", *shape, mx.bfloat16), mx.eval),
        "torch f32": (ops("torch", *shape, None), lambda _: None),
    }
    print(mlx_smolvlm.blas.describe(), f"| torch threads {args.threads}")
    print(f"| op (L={args.tokens}, D={args.hidden}) | " + " | ".join(f"{c} ms" for c in cols) + " | MLX f32 / torch |")
    print("|---" * (len(cols) + 2) + "|")
    times = {c: {n: median_ms(f, args.runs, sync) for n, f in fns.items()} for c, (fns, sync) in cols.items()}
    for n in times["MLX f32"]:
        row = [times[c][n] for c in cols]
        print(f"| {n} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {row[0] / row[-1]:.1f}x |")
    layer = [n for n in times["MLX f32"] if "mask" not in n]  # the tower runs one attention flavour
    sums = [sum(times[c][n] for n in layer) for c in cols]
    print("| layer (unmasked) | " + " | ".join(f"{v:.1f}" for v in sums) + f" | {sums[0] / sums[-1]:.1f}x |")


if __name__ == "__main__":
    main()
