"""Named quantization recipes: which parts of the model get how many bits."""

import mlx.nn as nn

from mlx_smolvlm.errors import ConvertError
from mlx_smolvlm.loading import QUANT_BITS, QUANT_GROUP_SIZES

# The chosen --q-bits; any other number is a fixed width.
Q = "q"

# Module path prefix -> part. The SmolVLM layout (Model) and the text-only
# decoder layout (TextModel, e.g. SmolLM2 from a GGUF) share the part names.
PARTS = (
    ("model.vision_model.embeddings.position_embedding", "vision_positions"),
    ("model.vision_model.", "vision"),
    ("model.connector.", "connector"),
    ("model.text_model.layers.", "decoder"),
    ("model.text_model.embed_tokens", "embeddings"),
    ("model.layers.", "decoder"),
    ("model.embed_tokens", "embeddings"),
    ("lm_head", "lm_head"),
)

# Parts a recipe leaves out stay float. The SigLIP position table is added to
# activations, not multiplied: it stays float in every recipe (0.8M parameters).
RECIPES = {
    "all": dict(vision=Q, connector=Q, decoder=Q, embeddings=Q, lm_head=Q),
    "mixed": dict(vision=8, connector=8, decoder=Q, embeddings=8, lm_head=8),
    "text": dict(decoder=Q, embeddings=Q, lm_head=Q),
    "decoder": dict(decoder=Q),
}

DESCRIPTIONS = {
    "all": "every layer at --q-bits (vision tower, connector, decoder, embeddings, lm_head)",
    "mixed": "decoder layers at --q-bits; vision tower, connector, embeddings and lm_head at 8 bits",
    "text": "decoder, embeddings and lm_head at --q-bits; vision tower and connector stay float "
    "(what mlx-vlm does)",
    "decoder": "decoder layers at --q-bits; everything else stays float",
}

BITS, GROUP_SIZES = QUANT_BITS, QUANT_GROUP_SIZES


def check_args(bits: int, group_size: int, recipe: str):
    if bits not in BITS:
        raise ConvertError(f"--q-bits {bits} is not supported (choose from {', '.join(map(str, BITS))})")
    if group_size not in GROUP_SIZES:
        raise ConvertError(
            f"--q-group-size {group_size} is not supported "
            f"(choose from {', '.join(map(str, GROUP_SIZES))})"
        )
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")


def part_of(path: str) -> str | None:
    return next((part for prefix, part in PARTS if path.startswith(prefix)), None)


def quantize_model(model: nn.Module, bits: int, group_size: int, recipe: str = "all") -> dict:
    """Quantize `model` in place by `recipe`; return config.json's `quantization`.

    Every quantizable layer is recorded: `false` when it stays float (left out by
    the recipe, or an input width the group size does not divide), otherwise its
    own `{"group_size", "bits"}`, so a reader never has to guess.
    """
    check_args(bits, group_size, recipe)
    plan = RECIPES[recipe]
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        b = plan.get(part_of(path))
        if b is None or module.weight.shape[-1] % group_size:
            quantization[path] = False
            return False
        quantization[path] = {"group_size": group_size, "bits": bits if b == Q else b}
        return dict(quantization[path])

    nn.quantize(model, class_predicate=predicate)
    return quantization


def summarize(quantization: dict) -> dict:
    """Layer counts by choice: {4: 210, 8: 87, "float": 12}."""
    counts = {}
    for k, v in quantization.items():
        if k in ("group_size", "bits", "mode"):
            continue
        key = v["bits"] if isinstance(v, dict) else "float"
        counts[key] = counts.get(key, 0) + 1
    return counts
