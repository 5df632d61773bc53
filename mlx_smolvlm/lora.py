"""Fine-tune a SmolVLM checkpoint with LoRA, DoRA or fully: `python -m mlx_smolvlm.lora`.

Flags and YAML `--config` keys are mlx-lm's (`mlx_lm.lora`); values given on the command line
win over the YAML file, which wins over the defaults below.

    python -m mlx_smolvlm.lora --model path/to/SmolVLM-256M-Instruct --train --data data/ \\
        --iters 200 --learning-rate 1e-4 --lora-rank 8 --lora-alpha 16 --adapter-path adapters
"""

import argparse
import math
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .errors import SmolVLMError
from .generate import load
from .tuner.adapters import load_adapters, save_adapters
from .tuner.datasets import load_split
from .tuner.layers import TEXT_KEYS, linear_to_lora_layers
from .tuner.trainer import TrainingArgs, build_schedule, evaluate, train

DEFAULTS = {
    "model": None,
    "train": False,
    "data": "data",
    "fine_tune_type": "lora",
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "seed": 0,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "train_vision": False,
    "train_connector": False,
    "no_split": False,
    "optimizer": "adamw",
    "optimizer_config": {},
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0, "keys": None},
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # every default is None: a flag not given leaves the YAML value or DEFAULTS in place
    p.add_argument("--model", help="checkpoint folder (float, or 4/8-bit for QLoRA) or Hub repo id")
    p.add_argument("--train", action="store_true", default=None, help="train")
    p.add_argument("--data", help="folder with train/valid/test .jsonl or .parquet, a datasets folder, or one .jsonl")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"])
    p.add_argument("--num-layers", type=int, help="decoder layers to adapt, from the last (-1: all)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--iters", type=int, help="optimizer steps")
    p.add_argument("--val-batches", type=int, help="-1: the whole valid split")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--steps-per-report", type=int)
    p.add_argument("--steps-per-eval", type=int)
    p.add_argument("--resume-adapter-file", help="adapters.safetensors to start from")
    p.add_argument("--adapter-path", help="folder the adapter is saved to")
    p.add_argument("--save-every", type=int)
    p.add_argument("--test", action="store_true", default=None, help="report the loss on the test split")
    p.add_argument("--test-batches", type=int)
    p.add_argument("--max-seq-length", type=int,
                   help="longer samples are cut in text after their last image, or dropped")
    p.add_argument("--seed", type=int)
    p.add_argument("--grad-checkpoint", action="store_true", default=None)
    p.add_argument("--grad-accumulation-steps", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float, help="PEFT's lora_alpha: scale = alpha / rank")
    p.add_argument("--lora-scale", type=float, help="mlx-lm's scale, used as is")
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--train-vision", action="store_true", default=None, help="adapt the vision tower too")
    p.add_argument("--train-connector", action="store_true", default=None, help="adapt the connector too")
    p.add_argument("--no-split", action="store_true", default=None, help="one global tile per image")
    p.add_argument("-c", "--config", help="YAML file of these settings (mlx-lm's keys)")
    return p


def settings(args) -> dict:
    """Command line over YAML over DEFAULTS; the --lora-* flags land in lora_parameters."""
    cfg = {}
    if args.config:
        import yaml

        try:
            cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--config {args.config}: {e}".splitlines()[0]) from None
        if not isinstance(cfg, dict):
            raise ValueError(f"--config {args.config}: expected a mapping of settings")
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"--config {args.config}: unknown keys {', '.join(sorted(unknown))}")
    out = {**DEFAULTS, **cfg}
    lora = {**DEFAULTS["lora_parameters"], **(cfg.get("lora_parameters") or {})}
    for k, v in vars(args).items():
        if v is None or k == "config":
            continue
        if k.startswith("lora_"):
            lora[k[5:]] = v
            if k == "lora_alpha":
                lora.pop("scale", None)
            if k == "lora_scale":
                lora.pop("alpha", None)
        else:
            out[k] = v
    out["lora_parameters"] = lora
    return out


def setup_model(model, s: dict) -> dict:
    """Freeze the model and make the chosen part trainable; the adapter config to save."""
    lora = dict(s["lora_parameters"])
    lora["keys"] = list(lora.get("keys") or TEXT_KEYS)
    if lora.get("alpha") is not None:
        lora["scale"] = lora["alpha"] / lora["rank"]
    model.freeze()
    if s["fine_tune_type"] in ("lora", "dora"):
        opts = {**lora, "train_vision": s["train_vision"], "train_connector": s["train_connector"]}
        linear_to_lora_layers(model, s["num_layers"], opts, use_dora=s["fine_tune_type"] == "dora")
    elif s["fine_tune_type"] == "full":
        layers = model.layers
        n = len(layers) if s["num_layers"] < 0 else s["num_layers"]
        for layer in layers[len(layers) - n :]:
            layer.unfreeze()
        if s["train_vision"]:
            model.model.vision_model.unfreeze()
        if s["train_connector"]:
            model.model.connector.unfreeze()
    else:
        raise ValueError(f"unknown fine_tune_type {s['fine_tune_type']!r}")
    return {
        "fine_tune_type": s["fine_tune_type"],
        "num_layers": s["num_layers"],
        "lora_parameters": lora,
        "train_vision": s["train_vision"],
        "train_connector": s["train_connector"],
        "base_model": str(s["model"]),
    }


def make_optimizer(s: dict):
    lr = build_schedule(s["lr_schedule"], s["learning_rate"])
    name, kw = s["optimizer"], dict(s["optimizer_config"] or {})
    if name == "adamw":
        # torch.optim.AdamW's update (bias-corrected) and default weight decay
        return optim.AdamW(lr, **{"weight_decay": 0.01, "bias_correction": True, **kw})
    if name == "adam":
        return optim.Adam(lr, **{"bias_correction": True, **kw})
    if name == "sgd":
        return optim.SGD(lr, **kw)
    raise ValueError(f"unknown optimizer {name!r} (adamw, adam, sgd)")


def run(s: dict, report=print):
    if not s["model"]:
        raise ValueError("--model is required")
    mx.random.seed(s["seed"])
    np.random.seed(s["seed"])
    model, processor = load(s["model"])
    if not hasattr(model, "model") or not hasattr(model.model, "text_model"):
        raise ValueError(f"{s['model']}: fine-tuning needs a SmolVLM checkpoint folder")
    adapter_path = Path(s["adapter_path"])
    if s["train"]:
        adapter_config = setup_model(model, s)
        if s["resume_adapter_file"]:
            model.load_weights(s["resume_adapter_file"], strict=False)
        n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        n_all = sum(v.size for _, v in tree_flatten(model.parameters()))
        report(f"Trainable parameters: {100 * n_train / n_all:.3f}% ({n_train / 1e6:.3f}M/{n_all / 1e6:.3f}M)")
    elif (adapter_path / "adapter_config.json").is_file():
        load_adapters(model, adapter_path)  # --test alone: the adapter as it was saved
        model.freeze()

    image_token_id = model.config.image_token_id
    controls = {"do_image_splitting": False} if s["no_split"] else {}
    data = lambda split: load_split(s["data"], split, processor, image_token_id,  # noqa: E731
                                    s["max_seq_length"], **controls)
    pad_id = processor.tokenizer.convert_tokens_to_ids(
        processor.tokenizer.special_tokens.get("pad_token") or "<|endoftext|>") or 0
    if s["train"]:
        train_set, val_set = data("train"), data("valid")
        if not train_set:
            raise ValueError(f"{s['data']}: no training samples")
        for name, ds in (("train", train_set), ("valid", val_set)):
            if ds is not None and ds.dropped:
                report(f"{name}: dropped {ds.dropped} sample(s) longer than --max-seq-length "
                       f"{s['max_seq_length']} (their image tokens cannot be cut)")

        def save(step):
            save_adapters(model, adapter_path, adapter_config)
            if step != s["iters"]:  # numbered checkpoints beside the latest, as mlx-lm keeps
                save_adapters(model, adapter_path, adapter_config, weights_file=f"{step:07d}_adapters.safetensors")
            report(f"Iter {step}: saved adapter weights to {adapter_path}")

        args = TrainingArgs(**{k: s[k] for k in TrainingArgs.__dataclass_fields__})
        with stop_on_sigint() as stopped:
            done = train(model, make_optimizer(s), train_set, val_set or None, args, save, report,
                         pad_id, stop=stopped.is_set)
        if stopped.is_set():
            raise KeyboardInterrupt(f"interrupted after step {done}")
    if s["test"]:
        test_set = data("test")
        if not test_set:
            raise ValueError(f"{s['data']}: no test split")
        model.eval()
        loss = evaluate(model, test_set, s["batch_size"], s["test_batches"], pad_id)
        report(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 50)):.3f}.")


@contextmanager
def stop_on_sigint():
    """A first Ctrl-C asks the loop to stop after the step it is in (an exception raised inside
    MLX's evaluation can leave its worker threads hanging at exit); a second one interrupts."""
    stopped = threading.Event()

    def handler(signum, frame):
        if stopped.is_set():
            raise KeyboardInterrupt
        stopped.set()
        print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(settings(args))
    except KeyboardInterrupt as e:
        # adapter files are replaced atomically: the last saved one is whole
        print(f"\n{e or 'interrupted'}: the last saved adapter (if any) is kept", file=sys.stderr)
        sys.exit(130)
    except (SmolVLMError, ValueError, OSError) as e:  # DatasetError, ImageError, missing files, bad YAML
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
