"""Write the tiny checkpoints and transformers' per-stage outputs that tests/test_model.py checks.

    python scripts/make_golden.py        # needs torch + transformers; rewrites tests/fixtures/tiny-*

The inputs are one batch of two samples: the first with three full tiles, the second with
one full tile, one tile whose right half is padding (pixel_attention_mask False) and one
all-zero padding image, which the reference drops before the vision tower.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

TINY = ("tiny-idefics3", "tiny-smolvlm")


def make_inputs(config: dict, seed: int = 0):
    """Pixel values, masks and input_ids in the processor's (and transformers') layout."""
    S = config["vision_config"]["image_size"]
    p = config["vision_config"]["patch_size"]
    r = config["scale_factor"]
    T = (S // p // r) ** 2
    rng = np.random.default_rng(seed)
    pv = rng.uniform(-1, 1, (2, 3, 3, S, S)).astype(np.float32)
    pam = np.ones((2, 3, S, S), dtype=bool)
    pv[1, 1, :, :, S // 2 :] = 0
    pam[1, 1, :, S // 2 :] = False
    pv[1, 2] = 0
    pam[1, 2] = False
    L = 7 + 3 * T
    ids = rng.integers(0, config["image_token_id"] - 10, (2, L))
    ids[0, 3 : 3 + 3 * T] = config["image_token_id"]
    ids[1, 5 : 5 + 2 * T] = config["image_token_id"]
    return {"pixel_values": pv, "pixel_attention_mask": pam, "input_ids": ids.astype(np.int64)}


def reference_outputs(model, inputs: dict) -> dict:
    """transformers' vision hidden states, connector output, merged embeddings and logits."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    captured = {}
    hook = model.model.text_model.register_forward_hook(
        lambda mod, args, kwargs, out: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        feats = model.model.get_image_features(t["pixel_values"], t["pixel_attention_mask"], return_dict=True)
        out = model(**t)
    hook.remove()
    f32 = lambda x: x.float().numpy()  # noqa: E731
    return {
        "vision_hidden": f32(feats.last_hidden_state),
        "connector": f32(torch.cat(feats.pooler_output)),
        "embeds": f32(captured["embeds"]),
        "logits": f32(out.logits),
    }


def load_reference(path: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.eval()


def main(rebuild_weights: bool = False):
    """Rewrite each tiny checkpoint's golden.npz from its committed weights (the weights too with
    --rebuild-weights: torch's RNG may differ between releases, which changes every golden)."""
    from make_checkpoint import PRESETS, build_model
    from provenance import stamp, stamp_array

    for name in TINY:
        out = FIXTURES / name
        if rebuild_weights or not (out / "model.safetensors").exists():
            build_model(PRESETS[name], seed=0).save_pretrained(out)
        inputs = make_inputs(PRESETS[name])
        golden = {f"input.{k}": v for k, v in inputs.items()}
        for dtype in ("float32", "bfloat16"):
            ref = reference_outputs(load_reference(out, dtype), inputs)
            golden.update({f"{dtype}.{k}": v for k, v in ref.items()})
        record = stamp("scripts/make_golden.py", {"weights": out / "model.safetensors", **inputs})
        np.savez_compressed(out / "golden.npz", provenance=stamp_array(record), **golden)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(rebuild_weights="--rebuild-weights" in sys.argv[1:])
