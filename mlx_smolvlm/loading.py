"""Find a checkpoint (folder or Hub repo), read its config and weights, build the model."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import weight_layout
from .errors import CheckpointError, ConfigError, LayoutError
from .models.config import ModelConfig
from .models.smolvlm import Model

# What a SmolVLM checkpoint needs from the Hub; nothing else is downloaded.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def get_model_path(path_or_repo: str, revision: str | None = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix != ".gguf":
            raise CheckpointError(f"{path} is not a model folder")
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_repo}: no such model folder (and not a Hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {path_or_repo} from the Hugging Face Hub ({type(e).__name__}); "
            "without Hub access, pass a local folder holding config.json and *.safetensors instead (e.g. --model DIR)"
        ) from None


def load_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model folder")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def load_safetensors(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing weight shard(s): {', '.join(missing)}")
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mx.load raises bare RuntimeErrors on damaged files
            raise CheckpointError(f"cannot read weights from {f}: {e}") from None
    return weights


# What MLX's affine quantization packs (and so what a checkpoint may ask for).
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def check_quantization(quantization: dict):
    settings = [("quantization", quantization)] + [
        (f"quantization of layer {k}", {**quantization, **v})
        for k, v in quantization.items()
        if isinstance(v, dict)
    ]
    for where, q in settings:
        mode, bits, group = q.get("mode", "affine"), q.get("bits"), q.get("group_size")
        if mode != "affine" or bits not in QUANT_BITS or group not in QUANT_GROUP_SIZES:
            raise CheckpointError(
                f"unsupported {where}: mode {mode!r}, bits {bits}, group_size {group} "
                f"(supported: affine, bits {QUANT_BITS}, group sizes {QUANT_GROUP_SIZES})"
            )


def apply_quantization(model: nn.Module, quantization: dict, weights: dict):
    """Quantize the layers the checkpoint stores quantized, as its config describes."""
    check_quantization(quantization)

    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(p, m):
        if not hasattr(m, "to_quantized"):
            return False
        if p in quantization:
            q = quantization[p] and {**defaults, **quantization[p]}
        else:
            q = f"{p}.scales" in weights and defaults
        if q and m.weight.shape[-1] % q["group_size"]:
            raise CheckpointError(
                f"layer {p}: group_size {q['group_size']} ({q['bits']} bits) does not divide its "
                f"input width {m.weight.shape[-1]}"
            )
        return q

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def dequantize_model(model: nn.Module, dtype: mx.Dtype = mx.float32) -> nn.Module:
    """Replace every quantized layer of `model` by its float twin, in place."""
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits).astype(dtype)
        if isinstance(m, nn.QuantizedEmbedding):
            f = nn.Embedding(*w.shape)
        else:
            f = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                f.bias = m.bias.astype(dtype)
        f.weight = w
        layers.append((name, f))
    model.update_modules(tree_unflatten(layers))
    mx.eval(model.parameters())
    return model


def load_weights_strict(model: nn.Module, weights: dict):
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: {', '.join(missing[:8])}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}")
        raise CheckpointError("checkpoint does not fit the model config; " + "; ".join(lines))
    bad = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"checkpoint does not fit the model config: {k} has shape {weights[k].shape}, "
            f"config says {expected[k].shape} ({len(bad)} mismatched)"
        )
    model.load_weights(list(weights.items()))


def cast_float(v: mx.array, dtype: mx.Dtype) -> mx.array:
    # Quantized weights are integers and stay; scales and biases follow the dtype.
    return v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v


def cast_floats(model: nn.Module, dtype: mx.Dtype):
    model.load_weights([(k, cast_float(v, dtype)) for k, v in tree_flatten(model.parameters())])


def load_model(path_or_repo: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False) -> Model:
    path = get_model_path(str(path_or_repo))
    raw = load_config(path)
    try:
        config = ModelConfig.from_dict(dict(raw, quantization=weight_layout.quantization_of(raw)))
    except (ConfigError, LayoutError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    model = Model(config)
    weights = load_safetensors(path)
    try:
        weight_layout.detect(weights)
    except LayoutError as e:
        raise CheckpointError(f"{path}: {e}") from None
    weights = model.sanitize(weights)
    if dtype is not None:
        # Cast before loading, so stored and cast copies of the weights are never all alive.
        weights = {k: cast_float(v, dtype) for k, v in weights.items()}
    if config.quantization:
        apply_quantization(model, config.quantization, weights)
    load_weights_strict(model, weights)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model
