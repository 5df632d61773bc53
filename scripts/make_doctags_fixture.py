"""A tiny granite-docling-shaped checkpoint that answers one page with a DocTags document
(a heading and a table): tests/fixtures/tiny-granite-docling (config.json, model.safetensors,
provenance.json). Random weights answer junk; docling needs DocTags it can parse.

    python scripts/make_doctags_fixture.py [--steps 200] [--out tests/fixtures/tiny-granite-docling]

How it is made: granite-docling-258M's config (conformance_presets) at reduced width and depth,
random weights, then its decoder overfitted with a plain MLX loop (nn.value_and_grad + Adam) on
one example: the chat prompt docling sends ("Convert this page to docling." and the page, as
docling renders it from `page_pdf`: pypdfium2 at scale 2, and the source image) -> `DOCTAGS` then
`<|end_of_text|>`; the loss is on the answer only. The vision tower and connector keep their
random weights (their features are computed once). The 100352-row embedding is stored 8-bit
(group 32), the rest float32, to keep the file small; the margins below are measured on the stored model.
This model has memorized one answer: it does not read pages.
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx_smolvlm  # noqa: F401  before mlx.core: the system BLAS (mlx_smolvlm/blas.py)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "tiny-granite-docling"
PRESET = "ibm-granite/granite-docling-258M"
PROMPT = "Convert this page to docling."  # docling's DOCLING_BASE_PAGE_PROMPT
HEADING = "Quarterly Report"
TABLE = [["Fruit", "Count"], ["Apples", "12"], ["Pears", "7"]]
DOCTAGS = (
    f"<doctag><section_header_level_1>{HEADING}</section_header_level_1><otsl>"
    + "".join(("<ched>" if i == 0 else "<fcel>").join([""] + row) + "<nl>" for i, row in enumerate(TABLE))
    + "</otsl></doctag>"
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
QUANT = {"group_size": 32, "bits": 8}
EMBED = "model.text_model.embed_tokens"


def page_image() -> Image.Image:
    """The page: a heading over a two-column table, 612x792 pixels."""
    im = Image.new("RGB", (612, 792), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=28)
    d.text((60, 60), HEADING, fill="black", font=font)
    for r, row in enumerate(TABLE):
        for c, cell in enumerate(row):
            x, y = 60 + 200 * c, 150 + 50 * r
            d.rectangle([x, y, x + 200, y + 50], outline="black", width=2)
            d.text((x + 12, y + 12), cell, fill="black", font=ImageFont.load_default(size=22))
    return im


def page_pdf(path: Path, pages: int = 1) -> Path:
    """`pages` copies of the page as a PDF of 306x396-point pages (612x792 at docling's scale 2)."""
    im = page_image()
    im.save(path, "PDF", resolution=144.0, save_all=True, append_images=[im] * (pages - 1))
    return path


def rendered(path: Path, scale: float = 2.0) -> Image.Image:
    """Page 1 of `path` as docling's PDF backends render it (pypdfium2)."""
    import pypdfium2

    pdf = pypdfium2.PdfDocument(str(path))
    try:
        return pdf[0].render(scale=scale).to_pil().convert("RGB")
    finally:
        pdf.close()


def write_processor(dest: Path) -> Path:
    """granite-docling's tokenizer (real flags), chat template and image processor settings."""
    from conformance_presets import write_legacy_processor

    return write_legacy_processor(PRESET, dest)


def config() -> dict:
    from conformance_presets import config_json

    c = config_json(PRESET)
    c["text_config"].update(TEXT)
    c["vision_config"].update(VISION)
    return c


def example(model, processor, image):
    """(input embeddings, answer positions, answer ids) of the prompt with `image` and DOCTAGS."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": PROMPT}]}]
    inputs = processor(messages)
    tok = processor.tokenizer
    answer = tok.encode(DOCTAGS) + [tok.convert_tokens_to_ids("<|end_of_text|>")]
    ids = mx.array(np.concatenate([np.asarray(inputs["input_ids"])[0], answer[:-1]]))[None]
    pixels, pam = mx.array(inputs["pixel_values"]), mx.array(inputs["pixel_attention_mask"])
    B, N, C, H, W = pixels.shape
    feats = model.encode_images(pixels.reshape(B * N, C, H, W), pam.reshape(B * N, H, W))
    n = np.asarray(inputs["input_ids"]).shape[1]
    return ids, mx.stop_gradient(feats), mx.arange(n - 1, n - 1 + len(answer)), mx.array(answer)


def answer_logprobs(model, ids, feats, positions):
    from mlx_smolvlm.models.language import lm_logits

    tm = model.model.text_model
    h = tm(ids, None, model.merge_image_features(ids, feats))
    return nn.log_softmax(lm_logits(tm, model.get("lm_head"), h[0, positions]).astype(mx.float32), axis=-1)


def margins(model, examples) -> list[float]:
    """Per example, the smallest (answer token - best other token) log-prob gap over the answer."""
    out = []
    for ids, feats, pos, target in examples:
        lp = answer_logprobs(model, ids, feats, pos)
        chosen = mx.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
        other = mx.max(mx.where(mx.arange(lp.shape[-1]) == target[:, None], -mx.inf, lp), axis=-1)
        out.append(float(mx.min(chosen - other)))
    return out


def train(model, examples, steps: int, lr: float):
    model.freeze()
    model.model.text_model.unfreeze()

    def loss_fn(model):
        total = 0.0
        for ids, feats, pos, target in examples:
            lp = answer_logprobs(model, ids, feats, pos)
            total = total - mx.take_along_axis(lp, target[:, None], axis=-1).mean()
        return total / len(examples)

    step = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=lr)
    for i in range(steps):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i}: loss {loss.item():.4f}", flush=True)
    model.unfreeze()


def main(argv=None):
    from mlx_smolvlm.models.config import ModelConfig
    from mlx_smolvlm.generate import load
    from mlx_smolvlm.models.smolvlm import Model
    from mlx_smolvlm.processing import load_processor
    from provenance import stamp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    mx.random.seed(a.seed)
    cfg = config()
    model = Model(ModelConfig.from_dict(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_processor(Path(tmp) / "checkpoint")
        processor = load_processor(folder)
        pdf = page_pdf(Path(tmp) / "page.pdf")
        images = [rendered(pdf), page_image()]
        train(model, [example(model, processor, im) for im in images], a.steps, a.lr)

        nn.quantize(model, class_predicate=lambda p, m: p == EMBED and QUANT, **QUANT)
        weights = dict(tree_flatten(model.parameters()))  # float32: MLX's CPU float16 is slow
        a.out.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(a.out / "model.safetensors"), weights, metadata={"format": "mlx"})
        (a.out / "config.json").write_text(json.dumps({**cfg, "quantization": QUANT}, indent=2))

        # the margins of the model as stored, loaded as the tests load it
        for f in ("config.json", "model.safetensors"):
            (folder / f).write_bytes((a.out / f).read_bytes())
        stored, processor = load(folder)
        found = margins(stored, [example(stored, processor, im) for im in images])
        print(f"smallest log-prob margin over the answer, per image: {found}")
        record = stamp("scripts/make_doctags_fixture.py", {"doctags": DOCTAGS, "prompt": PROMPT,
                                                           "page": np.asarray(images[0])})
        record.update(steps=a.steps, lr=a.lr, seed=a.seed, doctags=DOCTAGS, min_margins=found)
        (a.out / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
    print(a.out)


if __name__ == "__main__":
    main()
