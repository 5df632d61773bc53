"""How close a converted model's next-token distributions are to the float model's."""

from pathlib import Path

import mlx.core as mx
import numpy as np

# Fixed text for models that ship a tokenizer; others get fixed random ids.
TEXTS = (
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, "
    "and a small model can describe one in a sentence or two.",
    "User: What is shown in this photo?\nAssistant: A red bicycle is leaning against a "
    "brick wall next to a wooden door, with flowers in a pot on the ground.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])",
)


def text_ids(path: Path | None, vocab_size: int, length: int = 48, seed: int = 0) -> list:
    """Token ids of TEXTS (with the folder's tokenizer.json) or seeded random ids."""
    tok = path / "tokenizer.json" if path is not None else None
    if tok is not None and tok.is_file():
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tok))
        return [t.encode(s).ids[:length] for s in TEXTS]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length).tolist() for _ in TEXTS]


def image_prompt(config, n_text: int = 8, seed: int = 0) -> dict:
    """A small fixed smooth image between text tokens.

    The image is 2 x scale_factor patches a side (4 feature rows), not a full tile: the
    vision tower maps any grid onto its position table, and a 512px tile costs minutes
    on a CPU.
    """
    v = config.vision_config
    side = min(2 * config.scale_factor, v.patches_per_side) * v.patch_size
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(seed)
    pixels = np.stack([np.sin(6 * x + 2 * c) * np.cos(4 * y - c) for c in range(v.num_channels)], -1)
    pixels = 0.8 * pixels + 0.2 * rng.uniform(-1, 1, pixels.shape)
    text = rng.integers(0, config.image_token_id, (2, n_text))
    return dict(before=mx.array(text[:1]), pixels=mx.array(pixels[None].astype(np.float32)),
                after=mx.array(text[1:]))


def logits(model, prompt: dict) -> mx.array:
    """Logits of a text prompt ({input_ids}) or an image prompt ({before, pixels, after})."""
    if "pixels" not in prompt:
        return model(input_ids=prompt["input_ids"])
    pixels, p = prompt["pixels"], model.config.vision_config.patch_size
    patch_mask = mx.ones((1, pixels.shape[1] // p, pixels.shape[2] // p), dtype=mx.bool_)
    embed = model.get_input_embeddings
    before, after = embed(prompt["before"]), embed(prompt["after"])
    feats = model.get_image_features(pixels, patch_mask).astype(before.dtype)
    return model(input_embeddings=mx.concatenate([before, feats, after], axis=1))


def all_logits(model, prompts: list) -> list:
    out = []
    for prompt in prompts:
        out.append(logits(model, prompt).astype(mx.float32))
        mx.eval(out[-1])
    return out


def agreement(reference: list, candidate: list) -> dict:
    """Mean KL(reference || candidate) in nats and top-1 agreement over all positions."""
    kls, same = [], []
    for p, q in zip(reference, candidate):
        lp = p - mx.logsumexp(p, axis=-1, keepdims=True)
        lq = q - mx.logsumexp(q, axis=-1, keepdims=True)
        kls.append((mx.exp(lp) * (lp - lq)).sum(axis=-1).reshape(-1))
        same.append((p.argmax(axis=-1) == q.argmax(axis=-1)).reshape(-1))
    kl, agree = mx.concatenate(kls), mx.concatenate(same)
    return dict(
        kl=kl.mean().item(),
        kl_max=kl.max().item(),
        top1=agree.astype(mx.float32).mean().item(),
        positions=kl.size,
    )
