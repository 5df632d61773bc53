"""Same work, three implementations: mlx_smolvlm vs mlx-vlm vs transformers, in one run.

    python bench/bench_peers.py                 # full: 1 tile and 2048x2048 (17 tiles), f32/bf16/4-bit
    python bench/bench_peers.py --quick         # 1 tile, float32, 16 tokens, 1 run: minutes on a CPU

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
CONFIGS = ("float32", "bfloat16", "4bit")
# name -> (image side, split into tiles?): 512 unsplit is one tile; 2048 gives 4x4 tiles + global.
WORKLOADS = {"1tile": (512, False), "2048": (2048, True)}
TEXT_CONTEXT = 32
Q_GROUP, Q_BITS = 64, 4

# Token ids of SmolVLM-256M (shared/notes/facts.md). Text tokens are stand-ins of the
# right count: with random weights only the lengths matter.
IM_START, FAKE, GLOBAL, IMAGE, END_UTT, NEWLINE = 1, 49189, 49152, 49190, 49279, 198


def row_col(r, c):
    return 49153 + (r - 1) * 6 + (c - 1)


def prompt_ids(rows: int, cols: int, per_tile: int = 64) -> list[int]:
    """`<|im_start|>User:<image block>Describe this image.<end_of_utterance>\\nAssistant:`"""
    ids = [IM_START, 4093, 42]
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            ids += [FAKE, row_col(r, c)] + [IMAGE] * per_tile
        ids.append(NEWLINE)
    ids += ([NEWLINE] if rows else []) + [FAKE, GLOBAL] + [IMAGE] * per_tile + [FAKE]
    return ids + [19161, 451, 2443, 30, END_UTT, NEWLINE, 9519, 42]


def processor_inputs(side: int, split: bool):
    """Pixels from transformers' SmolVLM-256M image processor for a synthetic `side`x`side` image."""
    import numpy as np
    from PIL import Image
    from transformers import Idefics3ImageProcessor

    proc = Idefics3ImageProcessor(
        do_image_splitting=split, size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}
    )
    yy, xx = np.mgrid[0:side, 0:side]
    img = Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
    out = proc(images=[[img]], return_tensors="np", return_row_col_info=True)
    rows, cols = out["rows"][0][0], out["cols"][0][0]
    return out["pixel_values"].astype(np.float32), out["pixel_attention_mask"], prompt_ids(rows, cols)


def median_runs(fn, runs: int):
    """(median seconds, last result) of `runs` calls."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ---------------------------------------------------------------- MLX implementations


def mlx_side(impl: str, model_dir: Path, config: str):
    """model, its decoder, a separate head (or None), embed(ids, pv, pam), lm(ids, cache, embeds), make_cache."""
    import mlx.core as mx
    import mlx.nn as nn

    dtype = mx.float32 if config == "float32" else mx.bfloat16
    if impl == "mlx_smolvlm":
        from mlx_smolvlm.cache import make_prompt_cache
        from mlx_smolvlm.loading import load_model

        model = load_model(model_dir, dtype=dtype)
        text, head = model.model.text_model, model.get("lm_head")
        embed = model.get_input_embeddings

        def lm(ids, cache, embeds=None):
            return model(ids, cache=cache, input_embeddings=embeds)

        def make_cache():
            return make_prompt_cache(model)

    else:
        from mlx.utils import tree_map
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

    if config == "4bit":
        # The same layers on both sides: every decoder Linear/Embedding (vision stays float).
        nn.quantize(text, group_size=Q_GROUP, bits=Q_BITS)
        if impl == "mlx_smolvlm" and head is not None:  # mlx-vlm's head sits inside `text`
            nn.quantize(head, group_size=Q_GROUP, bits=Q_BITS)
    mx.eval(model.parameters())
    return model, text, head, embed, lm, make_cache


def prefill(lm, make_cache, ids, embeds):
    """mlx-lm's pattern: run all but the last token for the cache, then the last for logits."""
    import mlx.core as mx

    cache = make_cache()
    if embeds.shape[1] > 1:
        lm(ids[:, :-1], cache, embeds[:, :-1])
        mx.eval([c.state for c in cache])
    logits = lm(ids[:, -1:], cache, embeds[:, -1:])
    mx.eval(logits)
    return cache, logits


def decode(lm, cache, logits, n: int):
    """Greedy, one step ahead: step k+1 is queued before token k is read (EOS ignored)."""
    import mlx.core as mx

    y = mx.argmax(logits[:, -1], axis=-1)
    mx.async_eval(y)
    out = []
    for _ in range(n):
        nxt = mx.argmax(lm(y[:, None], cache)[:, -1], axis=-1)
        mx.async_eval(nxt)
        out.append(y.item())
        y = nxt
    return out


def run_mlx(impl, model_dir, config, pv_np, pam_np, ids_list, args):
    import mlx.core as mx

    model, text, head, embed, lm, make_cache = mlx_side(impl, model_dir, config)
    ids, pv, pam = mx.array([ids_list]), mx.array(pv_np), mx.array(pam_np)
    text_ids = mx.array([ids_list[:1] + list(range(1000, 1000 + TEXT_CONTEXT - 1))])
    mx.reset_peak_memory()

    def vision():
        e = embed(ids, pv, pam)
        mx.eval(e)
        return e

    # Warm-up on the text-only prompt: the full image path is minutes on a CPU.
    c, lg = prefill(lm, make_cache, text_ids, embed(text_ids, None, None))
    decode(lm, c, lg, 4)

    t_vision, emb = median_runs(vision, args.runs)
    t_prefill, _ = median_runs(lambda: prefill(lm, make_cache, ids, emb), args.runs)

    def decode_after(p_ids, p_emb):
        cache, logits = prefill(lm, make_cache, p_ids, p_emb)
        t = time.perf_counter()
        decode(lm, cache, logits, args.tokens)
        return time.perf_counter() - t

    t_dec_img = statistics.median(decode_after(ids, emb) for _ in range(args.runs))
    t_dec_txt = statistics.median(decode_after(text_ids, embed(text_ids, None, None)) for _ in range(args.runs))
    return dict(
        vision_s=t_vision, prefill_s=t_prefill, decode_img_s=t_dec_img, decode_txt_s=t_dec_txt,
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


def run_transformers(model_dir, config, pv_np, pam_np, ids_list, args):
    import torch
    from transformers import AutoModelForImageTextToText, DynamicCache

    if config == "4bit":
        return None  # no 4-bit CPU path in transformers without extra packages
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if config == "float32" else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).eval()
    ids, pv, pam = torch.tensor([ids_list]), torch.from_numpy(pv_np), torch.from_numpy(pam_np)
    text_ids = torch.tensor([ids_list[:1] + list(range(1000, 1000 + TEXT_CONTEXT - 1))])

    def vision():
        feats = torch.cat(list(model.model.get_image_features(pv, pam).pooler_output))
        return model.model.inputs_merger(ids, model.get_input_embeddings()(ids), feats)

    def prefill_t(p_emb):
        cache = DynamicCache(config=model.config.text_config)
        out = model(inputs_embeds=p_emb, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits

    def decode_after(p_emb):
        cache, logits = prefill_t(p_emb)
        t = time.perf_counter()
        y = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(args.tokens):
            logits = model(input_ids=y, past_key_values=cache, use_cache=True).logits
            y = logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t

    with torch.inference_mode():
        text_emb = model.get_input_embeddings()(text_ids)
        decode_after(text_emb)  # warm-up
        t_vision, emb = median_runs(vision, args.runs)
        t_prefill, _ = median_runs(lambda: prefill_t(emb), args.runs)
        t_dec_img = statistics.median(decode_after(emb) for _ in range(args.runs))
        t_dec_txt = statistics.median(decode_after(text_emb) for _ in range(args.runs))
    return dict(vision_s=t_vision, prefill_s=t_prefill, decode_img_s=t_dec_img, decode_txt_s=t_dec_txt,
                peak_gb=None, bytes_per_token=None)


# ---------------------------------------------------------------- driver


def worker(args):
    side, split = WORKLOADS[args.workload]
    pv, pam, ids = processor_inputs(side, split)
    if args.impl == "transformers":
        r = run_transformers(args.model, args.config, pv, pam, ids, args)
    else:
        r = run_mlx(args.impl, args.model, args.config, pv, pam, ids, args)
    if r is not None:
        r.update(tiles=int(pv.shape[1]), prompt_tokens=len(ids),
                 rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    print("RESULT " + json.dumps(r))


def memory_bandwidth_gbs() -> float:
    """Copy a 1 GB array: bytes read + written per second."""
    import mlx.core as mx

    a = mx.random.uniform(shape=(256 * 1024 * 1024,))
    mx.eval(a)

    def copy():
        mx.eval(a + 0)

    copy()
    return 2 * a.nbytes / median_runs(copy, 5)[0] / 1e9


def ensure_checkpoint(path: Path):
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/make_checkpoint.py"), "smolvlm-256m", str(path),
                        "--dtype", "bfloat16"], check=True)


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


# (title, key, format, ratio to mlx-vlm: speed-up for times and rates, share for memory)
COLUMNS = [
    ("vision s", "vision_s", ".2f", lambda ours, ref: ref / ours),
    ("prefill s", "prefill_s", ".2f", lambda ours, ref: ref / ours),
    ("prefill tok/s", "prefill_tps", ".0f", lambda ours, ref: ours / ref),
    ("decode tok/s img", "dec_img_tps", ".1f", lambda ours, ref: ours / ref),
    ("decode tok/s txt", "dec_txt_tps", ".1f", lambda ours, ref: ours / ref),
    ("peak MLX GB", "peak_gb", ".2f", lambda ours, ref: ours / ref),
    ("peak RSS GB", "rss_gb", ".2f", lambda ours, ref: ours / ref),
]


def print_table(rows, bandwidth, args):
    print(f"\nmemory bandwidth (MLX copy): {bandwidth:.1f} GB/s; {args.tokens} new tokens, median of {args.runs};"
          f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    head = ["workload", "dtype", "impl", "tiles", "prompt"] + [c[0] for c in COLUMNS] + ["decode limit tok/s"]
    lines = [head]
    for (wl, cfg, impl), r in rows.items():
        if r is None:
            lines.append([wl, cfg, impl] + ["n/a"] * (len(head) - 3))
            continue
        ref = rows.get((wl, cfg, "mlx_vlm"))
        cells = [r["tiles"], r["prompt_tokens"]]
        for _, key, spec, ratio in COLUMNS:
            cell = fmt(r[key], spec)
            if impl == "mlx_smolvlm" and ref and r[key] and ref[key]:
                cell += f" ({ratio(r[key], ref[key]):.2f}x)"
            cells.append(cell)
        # Decode can go no faster than streaming the decoder's weights once per token.
        limit = bandwidth * 1e9 / r["bytes_per_token"] if r["bytes_per_token"] else None
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
    p.add_argument("--quick", action="store_true", help="1 tile, float32, 16 tokens, 1 run")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "CONFIG", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl, args.config, args.workload = args.worker
        return worker(args)
    if args.quick:
        args.configs, args.workloads, args.tokens, args.runs = "float32", "1tile", 16, 1
    for name, allowed in (("impls", IMPLS), ("configs", CONFIGS), ("workloads", WORKLOADS)):
        bad = set(getattr(args, name).split(",")) - set(allowed)
        if bad:
            sys.exit(f"error: unknown --{name} {', '.join(sorted(bad))} (choose from {', '.join(allowed)})")
    ensure_checkpoint(args.model)
    rows = {}
    for wl in args.workloads.split(","):
        for cfg in args.configs.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--worker", impl, cfg, wl, "--model", str(args.model),
                       "--tokens", str(args.tokens), "--runs", str(args.runs), "--threads", str(args.threads)]
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
