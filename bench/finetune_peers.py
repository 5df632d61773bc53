"""Fine-tuning speed and memory: our trainer vs mlx-vlm's vs transformers + PEFT, on this CPU.

    python bench/finetune_peers.py --work /tmp/ftbench [--steps 6] [--vision-layers 12]

The same checkpoint (SmolVLM-256M geometry, real SmolLM2-135M decoder; scripts/make_tuning_fixtures.py),
the same cards (one 512 px tile each, no tiling, "Which card is this?"), batch 1, LoRA rank 8,
alpha 16 on the decoder's seven projections in all 30 layers, AdamW lr 1e-3 weight decay 0.01,
loss on the answer only; each trainer with and without gradient checkpointing, each run in its
own process (peak RSS = the process's ru_maxrss). mlx-vlm runs with OpenBLAS preloaded as ours
does (import mlx_smolvlm first). s/step is the median over the steps after the first. LoRA
A matrices are drawn by each framework's own RNG, so losses agree in trend, not in digits.
Also: where a step's time goes (vision tower + connector vs decoder forward/backward). Ours
encodes the images of a frozen vision tower once (tuner/trainer.py) and steps on the decoder only;
"run wall s" includes that, the model load and process start.
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
TEXT_KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR, WD = 8, 16.0, 1e-3, 0.01


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def our_batches(model_path, data, steps):
    """The batches our trainer sees (same seed, same order), for the torch loop and the profile."""
    from mlx_smolvlm.generate import load
    from mlx_smolvlm.tuner.datasets import iterate_batches, load_split

    model, processor = load(model_path)
    ds = load_split(data, "train", processor, model.config.image_token_id, None, do_image_splitting=False)
    it = iterate_batches(ds, 1, train=True, pad_id=0, seed=0)
    return model, [next(it) for _ in range(steps)]


def run_ours(a) -> dict:
    from mlx_smolvlm.lora import build_parser, run, settings

    steps = []

    def report(line):
        m = re.search(r"train loss ([\d.]+).*it/s ([\d.]+).*peak mem ([\d.]+) GB", line)
        if m:
            steps.append({"loss": float(m[1]), "s": 1 / float(m[2]), "mlx_peak_gb": float(m[3])})

    args = ["--model", a.model, "--train", "--data", a.data, "--iters", str(a.steps), "--batch-size", "1",
            "--learning-rate", str(LR), "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA),
            "--num-layers", "-1", "--steps-per-report", "1", "--steps-per-eval", str(10**6),
            "--save-every", str(10**6), "--no-split", "--adapter-path", str(Path(a.out).with_suffix(""))]
    run(settings(build_parser().parse_args(args + (["--grad-checkpoint"] if a.grad_checkpoint else []))), report)
    return {"steps": steps}


def run_mlx_vlm(a) -> dict:
    from mlx_vlm.train import parse_args, run

    steps = []

    class Callback:
        def on_train_loss_report(self, m):
            steps.append({"loss": m["train_loss"], "s": m["step_time"], "mlx_peak_gb": m["peak_memory"]})

        def on_val_loss_report(self, m):
            pass

    args = ["--model", a.model, "--data", a.data, "--iters", str(a.steps), "--batch-size", "1",
            "--learning-rate", str(LR), "--weight-decay", str(WD), "--lora-rank", str(RANK),
            "--lora-alpha", str(ALPHA), "--target-modules", *[f"language_model.layers.{i}.{p}.{k}" for i in range(30)
                                                              for p, ks in (("self_attn", TEXT_KEYS[:4]), ("mlp", TEXT_KEYS[4:]))
                                                              for k in ks],
            "--steps-per-report", "1", "--steps-per-eval", str(10**6), "--steps-per-save", str(10**6),
            "--train-on-completions", "--adapter-file", a.out + ".mlxvlm.safetensors",
            "--grad-checkpoint" if a.grad_checkpoint else "--no-grad-checkpoint"]
    run(*parse_args(args), training_callback=Callback())
    return {"steps": steps}


def run_peft(a) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    _, batches = our_batches(a.model, a.data, a.steps)
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32)
    targets = [f"model.text_model.layers.{i}.{p}.{k}" for i in range(30)
               for p, ks in (("self_attn", TEXT_KEYS[:4]), ("mlp", TEXT_KEYS[4:])) for k in ks]
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0))
    if a.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    steps = []
    for b in batches:
        t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
        pixels, mask = b.media[0]  # one row: its images (N, C, H, W) and masks
        tic = time.perf_counter()
        loss = model(input_ids=t(b.input_ids), pixel_values=t(pixels)[None],
                     pixel_attention_mask=t(mask)[None], labels=t(b.labels).long()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append({"loss": loss.item(), "s": time.perf_counter() - tic})
    return {"steps": steps}


def run_profile(a) -> dict:
    """Where a step goes: the vision tower + connector forward (what a trainer that re-encodes
    every step pays; ours encodes a frozen tower's images once) vs the decoder's forward and
    backward with LoRA."""
    import dataclasses

    import mlx.core as mx
    import mlx.nn as nn

    from mlx_smolvlm.tuner.layers import linear_to_lora_layers
    from mlx_smolvlm.tuner.trainer import loss_fn

    model, batches = our_batches(a.model, a.data, a.steps)
    model.freeze()
    linear_to_lora_layers(model, -1, dict(rank=RANK, alpha=ALPHA, dropout=0.0))
    grad = nn.value_and_grad(model, loss_fn)
    vision, decoder = [], []
    for b in batches:
        tic = time.perf_counter()
        feats = model.encode_images(*b.media[0])
        mx.eval(feats)
        vision.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        (loss, _), g = grad(model, dataclasses.replace(b, media=[feats]))
        mx.eval(loss, g)
        decoder.append(time.perf_counter() - tic)
    return {"vision_s": statistics.median(vision[1:] or vision), "decoder_s": statistics.median(decoder[1:] or decoder),
            "tokens": int(batches[0].input_ids.size)}


RUNNERS = {"profile": run_profile, "ours": run_ours, "mlx-vlm": run_mlx_vlm, "transformers+peft": run_peft}


def child(a):
    import mlx_smolvlm  # noqa: F401  OpenBLAS under MLX, for mlx-vlm's run too

    result = RUNNERS[a.child](a)
    result["max_rss_gb"] = max_rss_gb()
    Path(a.out).write_text(json.dumps(result))


def summary(name, ckpt, r, tokens) -> dict:
    s = statistics.median([x["s"] for x in r["steps"][1:]] or [r["steps"][0]["s"]])
    peak = max((x.get("mlx_peak_gb", 0) for x in r["steps"]), default=0)
    return {"trainer": name, "grad ckpt": ckpt, "s/step": s, "tokens/s": tokens / s, "run wall s": r["wall_s"],
            "peak RSS GB": r["max_rss_gb"],
            "MLX peak GB": peak or None, "loss@1": r["steps"][0]["loss"], f"loss@{len(r['steps'])}": r["steps"][-1]["loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftbench"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--vision-layers", type=int, default=12, help="SigLIP depth (default: the 256M's 12)")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(RUNNERS))
    ap.add_argument("--child", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    from make_tuning_fixtures import write_cards, write_real_decoder_vlm

    model = a.work / f"smolvlm-256m-real-decoder-v{a.vision_layers}"
    if not (model / "config.json").is_file():
        import mlx.core as mx

        from mlx_smolvlm.fuse import torch_layout

        write_real_decoder_vlm(model, vision_layers=a.vision_layers, tile=512, tied=False)
        # transformers reads only PyTorch's conv layout (ours and mlx-vlm read both)
        f = str(model / "model.safetensors")
        mx.save_safetensors(f, torch_layout(mx.load(f)))
    # No valid split: neither trainer spends the run evaluating.
    data = write_cards(a.work / "cards")
    (data / "valid.jsonl").unlink()
    names = a.only.split(",") if a.only else list(RUNNERS)
    rows, profile = [], None
    for name in names:
        for ckpt in ([False] if name == "profile" else [False, True]):
            out = a.work / f"{name}{'-ckpt' if ckpt else ''}.json"
            cmd = [sys.executable, __file__, "--child", name, "--model", str(model), "--data", str(data),
                   "--steps", str(a.steps), "--out", str(out)] + (["--grad-checkpoint"] if ckpt else [])
            tic = time.perf_counter()
            log = out.with_suffix(".log")
            with open(log, "w") as f:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            if p.returncode:
                print(f"{name} (grad ckpt {ckpt}) failed:\n{log.read_text()[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(out.read_text())
            r["wall_s"] = time.perf_counter() - tic
            print(f"{name} grad ckpt {ckpt}: {r['wall_s']:.0f} s wall", file=sys.stderr, flush=True)
            if name == "profile":
                profile = r
            else:
                rows.append((name, ckpt, r))
    tokens = profile["tokens"] if profile else tokens_per_sample(model, data)
    rows = [summary(name, ckpt, r, tokens) for name, ckpt, r in rows]
    for row in rows:
        print(json.dumps(row))
    if profile:
        v, d = profile["vision_s"], profile["decoder_s"]
        print(f"where a step goes: vision tower + connector forward {v:.2f} s, decoder forward + backward "
              f"(LoRA) {d:.2f} s: re-encoding the image is {100 * v / (v + d):.0f}% of a step; "
              f"{profile['tokens']} tokens per sample")


def tokens_per_sample(model, data) -> int:
    _, batches = our_batches(str(model), str(data), 1)
    return int(batches[0].input_ids.size)


if __name__ == "__main__":
    main()
