"""Write random-weight SmolVLM checkpoints in the exact Hugging Face layout, with transformers.

    python scripts/make_checkpoint.py tiny-idefics3 tests/fixtures/tiny-idefics3
    python scripts/make_checkpoint.py smolvlm-256m checkpoints/smolvlm-256m --dtype bfloat16

Tiny presets keep the structure that matters (GQA, several layers, scale factors 3
and 4, untied and tied heads) at widths small enough for fixtures. The real presets
copy the published configs (see shared/notes/facts.md) for benchmarks. Weights are
drawn so activations stay at unit scale: the reference's own init (std 0.02) makes
near-uniform logits, which would hide errors in parity tests.
"""

import argparse
import json
import sys
from pathlib import Path

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=4,
)


def smollm2(hidden, layers, heads, kv_heads, mlp, theta, vocab=49280, head_dim=64, context=8192):
    return dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        rope_theta=theta,
        max_position_embeddings=context,
        model_type="llama",
    )


TINY_TEXT = smollm2(64, 2, 4, 2, 96, 100000.0, vocab=512, head_dim=16, context=2048)
SIGLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  patch_size=16, image_size=512)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14, image_size=384)
TEXT_135M = smollm2(576, 30, 9, 3, 1536, 100000.0)
TEXT_360M = smollm2(960, 32, 15, 5, 2560, 100000.0)
TEXT_1_7B = smollm2(2048, 24, 32, 32, 8192, 273768.0, vocab=49155)
# SmolVLM2-2.2B: same decoder with the 256M-style added tokens; theta taken from v1 (not checked
# against the published config, which cannot be downloaded here).
TEXT_1_7B_V2 = smollm2(2048, 24, 32, 32, 8192, 273768.0)

# granite-docling-258M (ibm-granite/granite-docling-258M-mlx config.json, mlx-vlm 0.3.3): the
# SigLIP2 base-patch16-512 tower has SigLIP base's shapes; a Llama decoder of SmolLM2-135M's
# shape with a 100352-token vocabulary.
TEXT_GRANITE_DOCLING = smollm2(576, 30, 9, 3, 1536, 100000.0, vocab=100352)

PRESETS = {
    # scale 4 over an 8x8 patch grid: 4 tokens per tile; untied head.
    "tiny-idefics3": dict(model_type="idefics3", scale_factor=4, image_token_id=300, tie_word_embeddings=False,
                          vision_config=dict(TINY_VISION, image_size=32), text_config=TINY_TEXT),
    # scale 3 over a 9x9 patch grid: 9 tokens per tile; tied head.
    "tiny-smolvlm": dict(model_type="smolvlm", scale_factor=3, image_token_id=300, tie_word_embeddings=True,
                         vision_config=dict(TINY_VISION, image_size=36), text_config=TINY_TEXT),
    # The 2.2B geometry at tiny widths: 384-px tiles, 14-px patches (27x27, the last 6 px
    # unseen), scale 3: 81 tokens per tile.
    "tiny-p14": dict(model_type="smolvlm", scale_factor=3, image_token_id=300, tie_word_embeddings=False,
                     vision_config=dict(TINY_VISION, patch_size=14, image_size=384), text_config=TINY_TEXT),
    "smolvlm-256m": dict(model_type="idefics3", scale_factor=4, image_token_id=49190,
                         vision_config=SIGLIP_B16, text_config=TEXT_135M),
    "smolvlm-500m": dict(model_type="idefics3", scale_factor=4, image_token_id=49190,
                         vision_config=SIGLIP_B16, text_config=TEXT_360M),
    "smolvlm-2.2b": dict(model_type="idefics3", scale_factor=3, image_token_id=49153,
                         vision_config=SIGLIP_SO400M, text_config=TEXT_1_7B),
    "smolvlm2-256m": dict(model_type="smolvlm", scale_factor=4, image_token_id=49190,
                          vision_config=SIGLIP_B16, text_config=TEXT_135M),
    "smolvlm2-500m": dict(model_type="smolvlm", scale_factor=4, image_token_id=49190,
                          vision_config=SIGLIP_B16, text_config=TEXT_360M),
    "smolvlm2-2.2b": dict(model_type="smolvlm", scale_factor=3, image_token_id=49190,
                          vision_config=SIGLIP_SO400M, text_config=TEXT_1_7B_V2),
    "granite-docling-258m": dict(model_type="idefics3", scale_factor=4, image_token_id=100270,
                                 vision_config=SIGLIP_B16, text_config=TEXT_GRANITE_DOCLING),
}


def build_model(preset: dict, seed: int = 0, layers: int | None = None):
    """The reference model of `preset` with random weights; `layers` cuts both towers' depth
    (real widths at a CPU test's cost)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig
    from transformers import SmolVLMForConditionalGeneration

    preset = json.loads(json.dumps(preset))
    if layers is not None:
        for key in ("vision_config", "text_config"):
            preset[key]["num_hidden_layers"] = layers
    if preset["model_type"] == "idefics3":
        config_cls, model_cls = Idefics3Config, Idefics3ForConditionalGeneration
    else:
        config_cls, model_cls = SmolVLMConfig, SmolVLMForConditionalGeneration
    preset.pop("model_type")
    config = config_cls(**preset)
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights():  # randomize() draws every parameter; the reference init is slow
        model = model_cls(config).eval()
    model.tie_weights()  # part of the init skipped above
    randomize(model)
    return model


def randomize(model):
    """Unit-scale random weights: linear/conv ~ N(0, 1/fan_in), norms near 1, embeddings ~ N(0, 1)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            elif "embed" in name and p.ndim == 2:
                p.normal_(0.0, 1.0)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="layers per tower (default: the preset's)")
    args = ap.parse_args(argv)

    import torch

    model = build_model(PRESETS[args.preset], args.seed, args.layers).to(getattr(torch, args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.preset} ({n / 1e6:.2f}M parameters, {args.dtype}) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
