"""What other readers of a converted folder need from config.json (mlx-vlm, mlx-swift-lm).

Both read our weight names (they rename `model.text_model.*` to `language_model.*`
and drop `model.` when loading) but look up per-layer quantization under their own
module paths, default config fields we leave implicit (mlx-vlm: rope_theta 1e6;
mlx-swift-lm requires rope_theta, which transformers 5 writes only under
rope_parameters), and decide the tied head from `text_config.tie_word_embeddings`.
"""

import copy
from dataclasses import fields

from mlx_smolvlm.models.config import ModelConfig
from mlx_smolvlm.weight_layout import to_mlx_vlm


def explicit_config(raw: dict, config: ModelConfig) -> dict:
    """The source config with every vision/text field we resolved written out."""
    out = copy.deepcopy(raw)
    for key in ("vision_config", "text_config"):
        sub = getattr(config, key)
        # Resolved from the source, so equal where it was explicit; fills the rest.
        resolved = {f.name: getattr(sub, f.name) for f in fields(sub)}
        out[key].update({k: v for k, v in resolved.items() if v is not None})
    # The composite model's flag is the one the reference (and we) obey.
    out["text_config"]["tie_word_embeddings"] = config.tie_word_embeddings
    return out


def untie_head(weights: dict, config: dict, quantization: dict | None):
    """Write a tied head out as its own `lm_head`, equal to the embedding (quantized alike), and
    mark the folder untied, in place. mlx-vlm's decoder always has an lm_head (0.7.10 refuses a
    folder without: "Missing 1 parameters: language_model.lm_head.weight"); mlx-swift-lm builds
    one only when `tie_word_embeddings` is false and would refuse the key otherwise. Every
    reader (and ours) then computes the tied model's logits, for one more vocab x hidden table."""
    embed = "model.text_model.embed_tokens"
    for k in [k for k in weights if k.startswith(embed + ".")]:
        weights["lm_head" + k[len(embed) :]] = weights[k]
    if quantization is not None:
        quantization["lm_head"] = quantization.get(embed, False)
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False


def with_reader_paths(quantization: dict) -> dict:
    """Add each quantized layer's entry under the readers' module path as well."""
    out = dict(quantization)
    for path, params in quantization.items():
        if isinstance(params, dict):
            out.setdefault(to_mlx_vlm(path), params)
    return out
