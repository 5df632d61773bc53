"""python -m mlx_smolvlm.fuse: merge an adapter into its base model and save the result.

    python -m mlx_smolvlm.fuse --model BASE --adapter-path adapters --save-path fused

The adapter may be in mlx-lm's or PEFT's layout. A float result is written in transformers'
layout (PyTorch conv weights), so our loader, transformers and mlx-vlm all read it; pass it
through `python -m mlx_smolvlm.convert -q` for 4/8 bits, or quantize here with --quantize.
A quantized base stays quantized (each merged layer re-quantized as it was) unless --dequantize.
"""

import argparse
import signal
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .convert.compat import explicit_config, untie_head, with_reader_paths
from .convert.recipes import BITS, GROUP_SIZES, RECIPES, check_args, quantize_model
from .convert.save import copy_assets, save_weights, staged_folder, write_json
from .errors import ConvertError, SmolVLMError
from .loading import dequantize_model, get_model_path, load_config, load_model
from .tuner.adapters import load_adapters
from .tuner.layers import fuse_lora_layers

DTYPES = ("float16", "bfloat16", "float32")


def torch_layout(weights: dict) -> dict:
    """Our weights with the patch conv back in PyTorch's (out, in, kH, kW), as transformers reads it."""
    key = "model.vision_model.embeddings.patch_embedding.weight"
    if key in weights:
        weights[key] = weights[key].transpose(0, 3, 1, 2)
    return weights


def fuse(
    model_path: str,
    adapter_path: str | Path,
    save_path: str | Path,
    dequantize: bool = False,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    recipe: str = "all",
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write base + adapter as one checkpoint folder at `save_path`; return it."""
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype} is not supported (choose from {', '.join(DTYPES)})")
    if quantize:
        check_args(q_bits, q_group_size, recipe)
    path = get_model_path(str(model_path))
    raw = load_config(path)
    model = load_model(path, dtype=dtype and getattr(mx, dtype))
    load_adapters(model, adapter_path)
    quantized_base = bool(model.config.quantization)
    if quantize and quantized_base and not dequantize:
        raise ConvertError("--quantize needs a float model: add --dequantize for a quantized base")
    fuse_lora_layers(model, dequantize=dequantize)
    config = explicit_config(raw, model.config)
    if dequantize and quantized_base:
        dequantize_model(model, dtype=getattr(mx, dtype or "float32"))  # layers without an adapter too
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    quantization = quantize_model(model, q_bits, q_group_size, recipe) if quantize else None
    weights = dict(tree_flatten(model.parameters()))
    if model.config.tie_word_embeddings and "text_config" in config and (quantize or "quantization" not in config):
        # As the converter does: mlx-vlm needs the head as its own weight. (A kept quantized base
        # is read by MLX readers only, from its own config's quantization: left as it is.)
        untie_head(weights, config, quantization)
    if quantize:
        config["quantization"] = with_reader_paths(quantization)
        config.pop("quantization_config", None)
    weights = torch_layout(weights)
    out = Path(save_path).expanduser()
    with staged_folder(out, overwrite) as tmp:
        save_weights(tmp, weights)
        copy_assets(path, tmp)
        write_json(tmp / "config.json", config)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_smolvlm.fuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model: Hub repo id or local folder")
    p.add_argument("--adapter-path", default="adapters", help="adapter folder (mlx-lm or PEFT layout)")
    p.add_argument("--save-path", default="fused_model", help="output folder (default: fused_model)")
    p.add_argument("--dequantize", action="store_true", help="write a quantized base's layers as floats")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the fused model (MLX layout)")
    p.add_argument("--q-bits", type=int, choices=BITS, default=4)
    p.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, default=64)
    p.add_argument("--recipe", choices=list(RECIPES), default="all", help="what --quantize quantizes")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the float weights (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-path")
    args = p.parse_args(argv)
    # A terminated run unwinds like Ctrl-C, so the staged output is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        out = fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.quantize,
                   args.q_bits, args.q_group_size, args.recipe, args.dtype, args.overwrite)
    except (SmolVLMError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
