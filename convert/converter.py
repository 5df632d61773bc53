"""Convert a SmolVLM checkpoint for MLX: load (lazy) -> cast -> quantize -> save."""

import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_smolvlm.errors import ConvertError
from mlx_smolvlm.loading import get_model_path, load_config, load_model

from .card import model_card
from .compat import explicit_config, untie_head, with_reader_paths
from .quality import agreement, all_logits, image_prompt, text_ids
from .recipes import check_args, quantize_model, summarize
from .save import MAX_SHARD_BYTES, copy_assets, folder_bytes, save_weights, staged_folder, write_json

DTYPES = ("float16", "bfloat16", "float32")


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def measure_quality(source: Path, converted: Path, dtype: str | None) -> dict:
    """The converted folder vs the source model on fixed prompts."""
    # MLX's bfloat16 and quantized matmuls are very slow on CPUs; float32 is exact for both.
    compute = mx.float32 if mx.default_device() == mx.cpu else dtype and getattr(mx, dtype)
    reference = load_model(source, dtype=compute, lazy=True)
    candidate = load_model(converted, dtype=compute, lazy=True)
    config = reference.config
    texts = text_ids(source, config.text_config.vocab_size)
    prompts = [dict(input_ids=mx.array([ids])) for ids in texts] + [image_prompt(config)]
    result = agreement(all_logits(reference, prompts), all_logits(candidate, prompts))
    result["prompts"] = f"{len(texts)} text prompts, 1 small image"
    return result


def upload(folder: Path, repo: str):
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # the hub raises HTTP, auth and network errors of many types
        raise ConvertError(
            f"converted to {folder}, but uploading to {repo} failed: {type(e).__name__}: {e}"
        ) from None


def convert(
    hf_path: str,
    mlx_path: str | Path = "mlx_model",
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    recipe: str | None = None,
    upload_repo: str | None = None,
    overwrite: bool = False,
    evaluate: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write an MLX folder for `hf_path` (Hub id or folder) at `mlx_path`; return it.

    Nothing is written at `mlx_path` unless the whole conversion succeeds.
    """
    out = Path(mlx_path).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype} is not supported (choose from {', '.join(DTYPES)})")
    if not quantize and (q_bits or q_group_size or recipe):
        raise ConvertError("--q-bits, --q-group-size and --recipe need -q/--quantize")
    bits, group_size, recipe = q_bits or 4, q_group_size or 64, recipe or "all"
    if quantize:
        check_args(bits, group_size, recipe)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists (pass --overwrite to replace it)")

    _log(f"loading {hf_path}")
    path = get_model_path(hf_path)
    raw = load_config(path)
    model = load_model(path, dtype=dtype and getattr(mx, dtype), lazy=True)
    if quantize and model.config.quantization:
        raise ConvertError(f"{hf_path} is already quantized: convert from the float checkpoint")

    config = explicit_config(raw, model.config)
    quantization = layers = quality = None
    if quantize:
        _log(f"quantizing: recipe {recipe}, {bits} bits, group size {group_size}")
        quantization = quantize_model(model, bits, group_size, recipe)

    weights = dict(tree_flatten(model.parameters()))
    if model.config.tie_word_embeddings and "text_config" in config:
        untie_head(weights, config, quantization)
    if quantize:
        layers = summarize(quantization)
        config["quantization"] = with_reader_paths(quantization)
    float_dtype = next(v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating))
    del model  # quality is measured on the written folder; free this copy first
    with staged_folder(out, overwrite) as tmp:
        save_weights(tmp, weights, max_shard_bytes)
        del weights
        copy_assets(path, tmp)
        write_json(tmp / "config.json", config)
        if quantize and evaluate:
            _log("measuring next-token agreement with the float model")
            quality = measure_quality(path, tmp, dtype)
            _log(f"KL {quality['kl']:.4f} nats, top-1 agreement {100 * quality['top1']:.1f}%")
        card = model_card(
            source=hf_path,
            is_hub_id=not Path(hf_path).expanduser().exists(),
            dtype=str(float_dtype).removeprefix("mlx.core."),
            quantization=quantization,
            recipe=recipe if quantize else None,
            layers=layers,
            size=folder_bytes(tmp),
            quality=quality,
            model_ref=upload_repo or str(out),
        )
        (tmp / "README.md").write_text(card)
    _log(f"saved {out} ({folder_bytes(out) / 1e6:.1f} MB)")
    if upload_repo:
        upload(out, upload_repo)
        _log(f"uploaded to https://huggingface.co/{upload_repo}")
    return out
