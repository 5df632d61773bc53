"""Same work, three implementations: mlx_smolvlm vs mlx-vlm vs transformers, in one run.

    python bench/bench_peers.py                 # full: 1 tile and 2048x2048 (17 tiles), f32/bf16/4-bit
    python bench/bench_peers.py --quick         # 1 tile, float32, 16 tokens, 1 run: minutes on a CPU
    python bench/bench_peers.py --configs bfloat16,bfloat16+kv8   # "+kv8"/"+kv4": quantized KV cache

SmolVLM-256M's real config with random weights (scripts/make_checkpoint.py), greedy decoding
with EOS ignored. Each (implementation, dtype, workload) runs in its own process so peak
memory is its own. Stages: vision (pixels -> merged prompt embeddings), LM prefill (prompt ->
first logits), decode after the image prompt and after a short text-only prompt.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("mlx_smolvlm", "mlx_vlm", "transformers")
# 4bit: bf16 model, 4-bit decoder. 4bit-f32: the same from float32 weights, so scales and
# activations are float32; MLX's CPU quantized matmul is ~9x slower with bf16 ones.
CONFIGS = ("float32", "bfloat16", "4bit", "4bit-f32")
# A config may end in "+kv8" or "+kv4": the decode loops keep a KV cache quantized from the
# start (group 64), e.g. "bfloat16+kv8"; transformers has no such cache and is skipped.
KV_SUFFIXES = ("", "+kv8", "+kv4")
# name -> (image side, split into tiles?): 512 unsplit is one tile; 2048 gives 4x4 tiles + global.
WORKLOADS = {"1tile": (512, False), "2048": (2048, True)}
Q_GROUP, Q_BITS = 64, 4

PROMPT = "Describe this image."
TEXT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def processor_inputs(model_dir: Path, side: int, split: bool):
    """transformers' processor on a synthetic `side`x`side` image: the same inputs for everyone."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    yy, xx = np.mgrid[0:side, 0:side]
    img = Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))

    def chat(content):
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    out = proc(text=chat([{"type": "image"}, {"type": "text", "text": PROMPT}]), images=[img],
               do_image_splitting=split, return_tensors="np")
    text_ids = proc(text=chat([{"type": "text", "text": TEXT_PROMPT}]), return_tensors="np")["input_ids"]
    return (out["pixel_values"].astype(np.float32), out["pixel_attention_mask"], out["input_ids"][0].tolist(),
            text_ids[0].tolist())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def median_runs(fn, runs: int):
    """(median seconds, last result) of `runs` calls."""
    times = []
    for _ in range(runs):
        t = clock()
        out = fn()
        times.append(clock() - t)
    return statistics.median(times), out


# ---------------------------------------------------------------- MLX implementations


def mlx_side(impl: str, model_dir: Path, config: str):
    """Load one MLX implementation as its user would and give the benchmark a common face:
    (decoder, separate head or None, embed(ids, pv, pam), lm(ids, cache, embeds), make_cache,
    generate(cache, prompt_ids, n) -> seconds for the n tokens after the first, with the cache
    holding all of the prompt but its last token)."""
    import mlx.core as mx
    import mlx.nn as nn

    config, _, kv = config.partition("+kv")
    kv_args = dict(kv_bits=int(kv), kv_group_size=64, quantized_kv_start=0) if kv else {}
    dtype = mx.float32 if config in ("float32", "4bit-f32") else mx.bfloat16
    if impl == "mlx_smolvlm":
        from mlx_smolvlm.models.cache import make_prompt_cache
        from mlx_smolvlm.generate import generate_step
        from mlx_smolvlm.loading import load_model

        model = load_model(model_dir, dtype=dtype)
        text, head = model.model.text_model, model.get("lm_head")
        embed = model.get_input_embeddings

        def lm(ids, cache, embeds=None):
            return model(ids, cache=cache, input_embeddings=embeds)

        def make_cache():
            return make_prompt_cache(model)

        def generate(cache, prompt_ids, n):
            steps = generate_step(prompt_ids[0], model, prompt_cache=cache, max_tokens=n + 1, **kv_args)
            return time_after_first(steps)

    else:
        from mlx.utils import tree_map
        from mlx_vlm.generate.ar import generate_step
        from mlx_vlm.models import cache as vlm_cache
        from mlx_vlm.utils import load_model

        model = load_model(model_dir)
        model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
        text, head = model.language_model, model.language_model.lm_head

        def embed(ids, pv, pam):
            return model.get_input_embeddings(ids, pv, pixel_attention_mask=pam).inputs_embeds

        def lm(ids, cache, embeds=None):
            return model.language_model(ids, inputs_embeds=embeds, cache=cache).logits

        def make_cache():
            return vlm_cache.make_prompt_cache(model.language_model)

        def generate(cache, prompt_ids, n):
            steps = generate_step(prompt_ids[:, -1:], model, None, None, max_tokens=n + 1, temperature=0.0,
                                  prompt_cache=cache, **kv_args)
            return time_after_first(steps)

    if config.startswith("4bit"):
        # The same layers on both sides: every decoder Linear/Embedding (vision stays float).
        nn.quantize(text, group_size=Q_GROUP, bits=Q_BITS)
        if impl == "mlx_smolvlm" and head is not None:  # mlx-vlm's head sits inside `text`
            nn.quantize(head, group_size=Q_GROUP, bits=Q_BITS)
    mx.eval(model.parameters())
    return text, head, embed, lm, make_cache, generate


def fill_cache(lm, make_cache, ids, embeds):
    """All prompt tokens but the last into a fresh cache (mlx-lm's prefill; logits never computed)."""
    import mlx.core as mx

    cache = make_cache()
    lm(ids[:, :-1], cache, embeds[:, :-1])
    mx.eval([c.state for c in cache])
    return cache


def prefill(lm, make_cache, ids, embeds):
    import mlx.core as mx

    cache = fill_cache(lm, make_cache, ids, embeds)
    logits = lm(ids[:, -1:], cache, embeds[:, -1:])
    mx.eval(logits)
    return logits


def time_after_first(steps) -> float:
    """Seconds for a generate loop's tokens after its first (the prompt's last step)."""
    next(steps)
    t = clock()
    for _ in steps:
        pass
    return clock() - t


def run_mlx(impl, model_dir, config, pv_np, pam_np, ids_list, text_list, args):
    import mlx.core as mx

    text, head, embed, lm, make_cache, generate = mlx_side(impl, model_dir, config)
    ids, pv, pam, text_ids = mx.array([ids_list]), mx.array(pv_np), mx.array(pam_np), mx.array([text_list])
    mx.reset_peak_memory()

    def vision():
        e = embed(ids, pv, pam)
        mx.eval(e)
        return e

    def decode_after(p_ids, p_emb):
        return generate(fill_cache(lm, make_cache, p_ids, p_emb), p_ids, args.tokens)

    # Warm-up on the text-only prompt: one pass of the image path is minutes on a CPU.
    text_emb = embed(text_ids, None, None)
    generate(fill_cache(lm, make_cache, text_ids, text_emb), text_ids, 4)

    t_vision, emb = median_runs(vision, args.runs)
    t_prefill, _ = median_runs(lambda: prefill(lm, make_cache, ids, emb), args.runs)
    t_first, _ = median_runs(lambda: prefill(lm, make_cache, ids, vision()), args.runs)
    t_dec_img = statistics.median(decode_after(ids, emb) for _ in range(args.runs))
    t_dec_txt = statistics.median(decode_after(text_ids, text_emb) for _ in range(args.runs))
    return dict(
        vision_s=t_vision, prefill_s=t_prefill, ttft_s=t_first, decode_img_s=t_dec_img, decode_txt_s=t_dec_txt,
        peak_gb=mx.get_peak_memory() / 1e9, bytes_per_token=decode_bytes(text, head),
    )


def decode_bytes(text, head) -> int:
    """Weights one decode step reads: decoder layers and head, one row of the embedding table."""
    from mlx.utils import tree_flatten

    def nbytes(m):
        return sum(v.nbytes for _, v in tree_flatten(m.parameters()))

    layers = nbytes(text) - nbytes(text.embed_tokens) - (nbytes(text.lm_head) if "lm_head" in text else 0)
    return layers + nbytes(text.embed_tokens if head is None else head)


# ---------------------------------------------------------------- transformers


def run_transformers(model_dir, config, pv_np, pam_np, ids_list, text_list, args):
    import torch
    from transformers import AutoModelForImageTextToText, DynamicCache

    if config.startswith("4bit") or "+kv" in config:
        return None  # no 4-bit weights or KV cache on a CPU in transformers without extra packages
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if config == "float32" else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).eval()
    ids, pv, pam = torch.tensor([ids_list]), torch.from_numpy(pv_np), torch.from_numpy(pam_np)
    text_ids = torch.tensor([text_list])

    def vision():
        feats = torch.cat(list(model.model.get_image_features(pv, pam).pooler_output))
        return model.model.inputs_merger(ids, model.get_input_embeddings()(ids), feats)

    def prefill_t(p_emb):
        cache = DynamicCache(config=model.config.text_config)
        out = model(inputs_embeds=p_emb, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits

    def decode_after(p_emb):
        cache, logits = prefill_t(p_emb)
        t = clock()
        y = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(args.tokens):
            logits = model(input_ids=y, past_key_values=cache, use_cache=True).logits
            y = logits[:, -1].argmax(-1, keepdim=True)
        return clock() - t

    with torch.inference_mode():
        text_emb = model.get_input_embeddings()(text_ids)
        decode_after(text_emb)  # warm-up
        t_vision, emb = median_runs(vision, args.runs)
        t_prefill, _ = median_runs(lambda: prefill_t(emb), args.runs)
        t_first, _ = median_runs(lambda: prefill_t(vision()), args.runs)
        t_dec_img = statistics.median(decode_after(emb) for _ in range(args.runs))
        t_dec_txt = statistics.median(decode_after(text_emb) for _ in range(args.runs))
    return dict(vision_s=t_vision, prefill_s=t_prefill, ttft_s=t_first, decode_img_s=t_dec_img, decode_txt_s=t_dec_txt,
                peak_gb=None, bytes_per_token=None)


# ---------------------------------------------------------------- driver


def worker(args):
    global clock
    clock = CLOCKS[args.clock]
    if args.impl == "mlx_smolvlm":
        # Before anything (transformers' processor too) imports mlx.core: the system BLAS, as
        # mlx_smolvlm's users get it; mlx-vlm keeps MLX's own, as its users do.
        import mlx_smolvlm  # noqa: F401
    side, split = WORKLOADS[args.workload]
    pv, pam, ids, text = processor_inputs(args.model, side, split)
    if args.impl == "transformers":
        r = run_transformers(args.model, args.config, pv, pam, ids, text, args)
    else:
        r = run_mlx(args.impl, args.model, args.config, pv, pam, ids, text, args)
    if r is not None:
        r.update(tiles=int(pv.shape[1]), prompt_tokens=len(ids), text_tokens=len(text),
                 rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    print("RESULT " + json.dumps(r))


def memory_bandwidth_gbs() -> tuple[float, float]:
    """(copy, read) GB/s over a 1 GB array, best of 5: a busy machine only ever slows it down."""
    import mlx.core as mx

    a = mx.random.uniform(shape=(256 * 1024 * 1024,))
    mx.eval(a)

    def best(fn):
        mx.eval(fn())
        times = []
        for _ in range(5):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        return min(times)

    return 2 * a.nbytes / best(lambda: a + 0) / 1e9, a.nbytes / best(lambda: a.sum()) / 1e9


def ensure_checkpoint(path: Path):
    """SmolVLM-256M's config with random bf16 weights, plus a processor folder built offline."""
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/make_checkpoint.py"), "smolvlm-256m", str(path),
                        "--dtype", "bfloat16"], check=True)
    if not (path / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/make_tokenizer.py"), str(path),
                        "--model-config", str(path / "config.json")], check=True)


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


# (title, key, format, ratio to mlx-vlm: speed-up for times and rates, share for memory)
COLUMNS = [
    ("vision s", "vision_s", ".2f", lambda ours, ref: ref / ours),
    ("prefill s", "prefill_s", ".2f", lambda ours, ref: ref / ours),
    ("prefill tok/s", "prefill_tps", ".0f", lambda ours, ref: ours / ref),
    ("first token s", "ttft_s", ".2f", lambda ours, ref: ref / ours),
    ("decode tok/s img", "dec_img_tps", ".1f", lambda ours, ref: ours / ref),
    ("decode tok/s txt", "dec_txt_tps", ".1f", lambda ours, ref: ours / ref),
    ("peak MLX GB", "peak_gb", ".2f", lambda ours, ref: ours / ref),
    ("peak RSS GB", "rss_gb", ".2f", lambda ours, ref: ours / ref),
]


def print_table(rows, bandwidth, args):
    copy_gbs, read_gbs = bandwidth
    print(f"\nmemory bandwidth (MLX, 1 GB): copy {copy_gbs:.1f} GB/s (read + write), read {read_gbs:.1f} GB/s; "
          f"{args.tokens} new tokens, median of {args.runs}, {args.clock} clock; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    head = ["workload", "dtype", "impl", "tiles", "prompt", "text prompt"] + [c[0] for c in COLUMNS] + ["decode limit tok/s"]
    lines = [head]
    for (wl, cfg, impl), r in rows.items():
        if r is None:
            lines.append([wl, cfg, impl] + ["n/a"] * (len(head) - 3))
            continue
        ref = rows.get((wl, cfg, "mlx_vlm"))
        cells = [r["tiles"], r["prompt_tokens"], r["text_tokens"]]
        for _, key, spec, ratio in COLUMNS:
            cell = fmt(r[key], spec)
            if impl == "mlx_smolvlm" and ref and r[key] and ref[key]:
                cell += f" ({ratio(r[key], ref[key]):.2f}x)"
            cells.append(cell)
        # Decode can go no faster than reading the decoder's weights once per token.
        limit = read_gbs * 1e9 / r["bytes_per_token"] if r["bytes_per_token"] else None
        lines.append([wl, cfg, impl] + cells + [fmt(limit, ".0f")])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    for i, l in enumerate(lines):
        print(" | ".join(str(c).ljust(w) for c, w in zip(l, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print("(Nx) on mlx_smolvlm rows: speed-up over mlx-vlm for times and rates, share of its memory for GB.")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "checkpoints/smolvlm-256m")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="cpu: this process's CPU seconds, steadier than wall time on a shared machine")
    p.add_argument("--quick", action="store_true", help="1 tile, float32, 16 tokens, 1 run")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "CONFIG", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl, args.config, args.workload = args.worker
        return worker(args)
    if args.quick:
        args.configs, args.workloads, args.tokens, args.runs = "float32", "1tile", 16, 1
    configs = tuple(c + kv for c in CONFIGS for kv in KV_SUFFIXES)
    for name, allowed in (("impls", IMPLS), ("configs", configs), ("workloads", WORKLOADS)):
        bad = set(getattr(args, name).split(",")) - set(allowed)
        if bad:
            sys.exit(f"error: unknown --{name} {', '.join(sorted(bad))} (choose from {', '.join(allowed)})")
    ensure_checkpoint(args.model)
    rows = {}
    for wl in args.workloads.split(","):
        for cfg in args.configs.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--worker", impl, cfg, wl, "--model", str(args.model),
                       "--tokens", str(args.tokens), "--runs", str(args.runs), "--threads", str(args.threads), "--clock", args.clock]
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    sys.exit(f"error: {impl} {cfg} {wl} failed: {tail}")
                r = json.loads(lines[-1][len("RESULT "):])
                if r is not None:
                    r["prefill_tps"] = r["prompt_tokens"] / r["prefill_s"]
                    r["dec_img_tps"] = args.tokens / r["decode_img_s"]
                    r["dec_txt_tps"] = args.tokens / r["decode_txt_s"]
                rows[(wl, cfg, impl)] = r
                print(f"{wl} {cfg} {impl}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    print_table(rows, memory_bandwidth_gbs(), args)


if __name__ == "__main__":
    main()
