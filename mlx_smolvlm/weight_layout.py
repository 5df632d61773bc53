"""The two weight layouts a SmolVLM folder comes in, told apart by key names only.

- transformers (`save_pretrained`, and our converter): `model.vision_model.*`,
  `model.connector.*`, `model.text_model.*`, `lm_head.*`. This is our module tree.
- mlx-vlm (`mlx_vlm.convert`: mlx-community, `*-mlx` repos, docling's models, since at
  least mlx-vlm 0.3.3): `vision_model.*`, `connector.*`, `language_model.*` with the head at
  `language_model.lm_head.*`; tensors already in MLX layout. Its config.json describes the
  quantization under `quantization` (and a copy under `quantization_config`), per-layer
  entries keyed by mlx-vlm module paths.

The mapping between the two is a fixed prefix table, so it is exact and invertible.
"""

from .errors import LayoutError

# (mlx-vlm prefix, our prefix); the head comes before the rest of `language_model.`.
PREFIXES = (
    ("language_model.lm_head", "lm_head"),
    ("language_model.", "model.text_model."),
    ("vision_model.", "model.vision_model."),
    ("connector.", "model.connector."),
)
OURS = ("model.", "lm_head")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix if prefix.endswith(".") else prefix + ".")


def from_mlx_vlm(key: str) -> str:
    """A weight key or module path in mlx-vlm's layout -> ours (ours pass unchanged)."""
    for theirs, ours in PREFIXES:
        if _under(key, theirs):
            return ours + key[len(theirs) :]
    return key


def to_mlx_vlm(key: str) -> str:
    """A weight key or module path in our layout -> mlx-vlm's (and mlx-swift-lm's)."""
    for theirs, ours in PREFIXES:
        if _under(key, ours):
            return theirs + key[len(ours) :]
    return key


def detect(keys) -> str:
    """"transformers" or "mlx-vlm", from the weight names; a mix or neither is an error."""
    kinds = {}
    for k in keys:
        if any(_under(k, p) for p in OURS):
            kinds.setdefault("transformers", k)
        elif any(_under(k, theirs) for theirs, _ in PREFIXES):
            kinds.setdefault("mlx-vlm", k)
        else:
            kinds.setdefault("unknown", k)
    if "unknown" in kinds:
        raise LayoutError(f"weight {kinds['unknown']!r} belongs to neither the transformers "
                          "nor the mlx-vlm SmolVLM layout")
    if len(kinds) > 1:
        raise LayoutError(f"weights mix the transformers layout ({kinds['transformers']!r}) and "
                          f"the mlx-vlm layout ({kinds['mlx-vlm']!r})")
    return next(iter(kinds), "transformers")


def quantization_of(raw: dict) -> dict | None:
    """config.json's MLX quantization with per-layer entries under our module paths.

    mlx-vlm writes `quantization` and a copy as `quantization_config`; older folders may
    have only the latter. A per-layer entry given under both layouts must agree.
    """
    q = raw.get("quantization")
    if q is None:
        q = raw.get("quantization_config")
        if q is None:
            return None
        if "quant_method" in q or not {"group_size", "bits"} <= set(q):
            method = q.get("quant_method", "unknown")
            raise LayoutError(f"quantization_config: method {method!r} is not MLX quantization "
                              "(convert from the float checkpoint instead)")
    # Per-layer entries are a dict of settings or false; the rest are the defaults.
    out = {k: v for k, v in q.items() if not isinstance(v, (dict, bool))}
    for path, params in q.items():
        if not isinstance(params, (dict, bool)):
            continue
        ours = from_mlx_vlm(path)
        if out.setdefault(ours, params) != params:
            raise LayoutError(f"quantization[{path!r}] = {params} contradicts "
                              f"quantization[{ours!r}] = {out[ours]}")
    return out
