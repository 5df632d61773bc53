"""Save and load adapters in mlx-lm's layout and in PEFT's; the layout is detected on load.

- mlx-lm: `adapters.safetensors` (our module paths + `.lora_a` (in, r), `.lora_b` (r, out),
  DoRA's `.m`) and `adapter_config.json` with `fine_tune_type`, `num_layers`,
  `lora_parameters: {rank, alpha, scale, dropout, keys}`.
- PEFT 0.21: `adapter_model.safetensors` (`base_model.model.` + module path +
  `.lora_A.weight` (r, in), `.lora_B.weight` (out, r), DoRA's `.lora_magnitude_vector` (out,))
  and `adapter_config.json` with `peft_type: LORA`, `r`, `lora_alpha`, `target_modules`.
Our module paths are transformers' SmolVLM module names, so the two differ by a prefix and a
transpose. Files are written to a temporary name and moved into place, so a reader (or a
Ctrl-C) never sees half an adapter.
"""

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CheckpointError
from .layers import DoRALinear, LoRALinear

CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Ours -> PEFT's tensor names; PEFT's are the transposes of ours except the magnitude.
PEFT_NAMES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}
# PEFT features with no counterpart here: refused on load rather than silently dropped.
PEFT_UNSUPPORTED = {
    "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
    "trainable_token_indices": None, "layer_replication": None, "target_parameters": None,
    "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None,
}


class AdapterError(CheckpointError):
    """An adapter folder that cannot be read, or that does not fit the model."""


def lora_layers(model: nn.Module) -> dict:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_weights(model: nn.Module, fine_tune_type: str = "lora") -> dict:
    """What an adapter file holds: the LoRA/DoRA tensors, or every trainable weight for `full`."""
    if fine_tune_type == "full":
        return dict(tree_flatten(model.trainable_parameters()))
    out = {}
    for path, m in lora_layers(model).items():
        out[f"{path}.lora_a"], out[f"{path}.lora_b"] = m.lora_a, m.lora_b
        if isinstance(m, DoRALinear):
            out[f"{path}.m"] = m.m
    if not out:
        raise AdapterError("the model has no LoRA or DoRA layers to save")
    return out


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write):
    """Call write(tmp) for a temporary file beside `path`, then move it into place."""
    # The temporary name keeps the suffix: mx.save_safetensors appends one to a name without it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the final file is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: dict):
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _write_safetensors(path: Path, weights: dict, fmt: str):
    _atomic(path, lambda tmp: mx.save_safetensors(tmp, weights, metadata={"format": fmt}))


def _rank_and_alpha(model: nn.Module) -> tuple[int, float, dict, dict]:
    """The common rank and alpha of the LoRA layers, and per-path exceptions (PEFT patterns)."""
    layers = lora_layers(model)
    ranks = {p: m.lora_a.shape[1] for p, m in layers.items()}
    alphas = {p: m.scale * ranks[p] for p, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes ending at the module path: escape ours.
    rank_pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    alpha_pattern = {re.escape(p): v for p, v in alphas.items() if v != alpha}
    return r, alpha, rank_pattern, alpha_pattern


def peft_config(model: nn.Module, config: dict) -> dict:
    """PEFT's adapter_config.json for the LoRA layers of `model`."""
    if config.get("fine_tune_type", "lora") == "full":
        raise AdapterError("a full fine-tune has no PEFT adapter form: fuse it instead")
    r, alpha, rank_pattern, alpha_pattern = _rank_and_alpha(model)
    params = config.get("lora_parameters", {})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": config.get("base_model"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": params.get("dropout", 0.0),
        # Full module paths: PEFT matches a list entry against the end of each module name, so
        # the paths select exactly the adapted layers (suffixes would also hit the vision tower).
        "target_modules": sorted(lora_layers(model)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": config.get("fine_tune_type") == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def to_peft(weights: dict) -> dict:
    out = {}
    for k, v in weights.items():
        path, name = k.rsplit(".", 1)
        out[f"{PEFT_PREFIX}{path}.{PEFT_NAMES[name]}"] = v if name == "m" else v.T
    return out


def save_adapters(model: nn.Module, path: str | Path, config: dict, fmt: str = "mlx",
                  weights_file: str | None = None) -> Path:
    """Write the adapter of `model` to the folder `path` in mlx-lm's ("mlx") or PEFT's ("peft")
    layout. `config` is the mlx-lm adapter_config.json (fine_tune_type, num_layers,
    lora_parameters, train_vision, train_connector, base_model). `weights_file` names the
    mlx-layout weights (numbered checkpoints)."""
    if fmt not in ("mlx", "peft"):
        raise AdapterError(f"unknown adapter format {fmt!r} (choose mlx or peft)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model, config.get("fine_tune_type", "lora"))
    if fmt == "peft":
        cfg = peft_config(model, config)
        _write_safetensors(folder / PEFT_WEIGHTS, to_peft(weights), "pt")
    else:
        cfg = dict(config)
        if "lora_parameters" in cfg and "rank" in cfg["lora_parameters"]:
            lp = cfg["lora_parameters"] = dict(cfg["lora_parameters"])
            if lp.get("alpha") is not None:
                lp["scale"] = lp["alpha"] / lp["rank"]
        _write_safetensors(folder / (weights_file or MLX_WEIGHTS), weights, "mlx")
    _write_json(folder / CONFIG, cfg)
    return folder


def detect_format(path: str | Path) -> str:
    """"mlx" or "peft", from the folder's files and adapter_config.json."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not (folder / CONFIG).is_file():
        raise AdapterError(f"{folder} has no {CONFIG}: not an adapter folder")
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{folder / CONFIG} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{folder / CONFIG} is not a JSON object")
    fmt = "peft" if "peft_type" in cfg else "mlx" if "fine_tune_type" in cfg or "lora_parameters" in cfg else None
    weights = {"mlx": MLX_WEIGHTS, "peft": PEFT_WEIGHTS}.get(fmt)
    if fmt is None:
        raise AdapterError(f"{folder / CONFIG} is neither mlx-lm's (fine_tune_type) nor PEFT's (peft_type)")
    if not (folder / weights).is_file():
        raise AdapterError(f"{folder} has a {fmt} {CONFIG} but no {weights}")
    return fmt


def _read(path: Path, dtype: mx.Dtype | None = None) -> dict:
    try:
        weights = mx.load(str(path))
    except Exception as e:  # mx.load raises bare RuntimeErrors on damaged files
        raise AdapterError(f"cannot read {path}: {e}") from None
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's get_pattern_key: the first key that, as a regex, matches the end of the path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _from_peft(folder: Path, cfg: dict, dtype=None) -> tuple[dict, dict, dict]:
    """PEFT tensors -> ({path: {lora_a, lora_b[, m]}}, {path: scale}, our adapter config)."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{folder}: PEFT type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, neutral in PEFT_UNSUPPORTED.items():
        if cfg.get(key, neutral) not in (neutral, [], {}):
            raise AdapterError(f"{folder}: PEFT option {key}={cfg[key]!r} is not supported")
    tensors = {}
    names = {v: k for k, v in PEFT_NAMES.items()}
    for key, v in _read(folder / PEFT_WEIGHTS, dtype).items():
        stem = key.removeprefix(PEFT_PREFIX)
        name = next((n for n in names if stem.endswith("." + n)), None)
        if name is None:
            raise AdapterError(f"{folder / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA/DoRA weight")
        tensors.setdefault(stem[: -len(name) - 1], {})[names[name]] = v if name == PEFT_NAMES["m"] else v.T
    scales = {}
    for path, t in tensors.items():
        r = t["lora_a"].shape[1] if "lora_a" in t else 0
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", 8))
        scales[path] = alpha / (r**0.5 if cfg.get("use_rslora") else r) if r else 0.0
    ours = {
        "fine_tune_type": "dora" if cfg.get("use_dora") else "lora",
        "lora_parameters": {"rank": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
                            "dropout": cfg.get("lora_dropout", 0.0)},
        "base_model": cfg.get("base_model_name_or_path"),
    }
    return tensors, scales, ours


def _from_mlx(folder: Path, cfg: dict, dtype=None) -> tuple[dict, dict]:
    tensors = {}
    for key, v in _read(folder / MLX_WEIGHTS, dtype).items():
        path, _, name = key.rpartition(".")
        if name not in PEFT_NAMES:
            raise AdapterError(f"{folder / MLX_WEIGHTS}: tensor {key!r} is not a LoRA/DoRA weight")
        tensors.setdefault(path, {})[name] = v
    lp = cfg.get("lora_parameters") or {}
    scales = {}
    for path, t in tensors.items():
        r = t["lora_a"].shape[1] if "lora_a" in t else 0
        # Our trainer writes alpha (PEFT's meaning); mlx-lm writes the scale itself.
        scales[path] = lp["alpha"] / r if lp.get("alpha") is not None and r else lp.get("scale", 20.0)
    return tensors, scales


def attach(model: nn.Module, tensors: dict, scales: dict, dropout: float = 0.0, where: str = "adapter"):
    """Wrap each named Linear in a LoRA (DoRA where `m` is given) layer holding `tensors`."""
    modules = dict(model.named_modules())
    updates = []
    for path, t in sorted(tensors.items()):
        base = modules.get(path)
        if isinstance(base, LoRALinear):
            raise AdapterError(f"{path} already has an adapter: load one adapter per model")
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise AdapterError(f"{where}: the model has no Linear layer {path}")
        if "lora_a" not in t or "lora_b" not in t:
            raise AdapterError(f"{where}: {path} lacks lora_a or lora_b")
        cls = DoRALinear if "m" in t else LoRALinear
        r = t["lora_a"].shape[1]
        layer = cls.from_base(base, r=r, scale=scales[path], dropout=dropout)
        want = {"lora_a": layer.lora_a.shape, "lora_b": layer.lora_b.shape}
        if "m" in t:
            want["m"] = layer.m.shape
        for name, shape in want.items():
            if t[name].shape != shape:
                raise AdapterError(f"{where}: {path}.{name} has shape {tuple(t[name].shape)}, "
                                   f"the model needs {tuple(shape)}")
            setattr(layer, name, t[name])
        if not model.training:
            layer.eval()  # the model's mode, so dropout stays off at inference
        updates.append((path, layer))
    model.update_modules(tree_unflatten(updates))


def load_adapters(model: nn.Module, path: str | Path, dtype: mx.Dtype | None = None) -> dict:
    """Attach the adapter in folder `path` (mlx-lm or PEFT layout) to `model` in place; return
    its config in mlx-lm's form. `dtype` casts the adapter's tensors (as the model's were)."""
    folder = Path(path).expanduser()
    fmt = detect_format(folder)
    cfg = json.loads((folder / CONFIG).read_text())
    if fmt == "peft":
        tensors, scales, cfg = _from_peft(folder, cfg, dtype)
    elif cfg.get("fine_tune_type") == "full":
        weights = _read(folder / MLX_WEIGHTS, dtype)
        expected = dict(tree_flatten(model.parameters()))
        bad = [k for k, v in weights.items() if k not in expected or expected[k].shape != v.shape]
        if bad:
            raise AdapterError(f"{folder / MLX_WEIGHTS}: {bad[0]} does not fit the model ({len(bad)} such)")
        model.load_weights(list(weights.items()), strict=False)
        return cfg
    else:
        tensors, scales = _from_mlx(folder, cfg, dtype)
    dropout = (cfg.get("lora_parameters") or {}).get("dropout", 0.0)
    attach(model, tensors, scales, dropout, where=str(folder))
    return cfg
