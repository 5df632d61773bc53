"""LoRA and DoRA layers in PEFT's definition, and attaching them to the model by module path.

Shapes follow mlx-lm (`lora_a` (in, r), `lora_b` (r, out)); PEFT stores the transposes
(`lora_A.weight` (r, in), `lora_B.weight` (out, r)), so an adapter copies across by transposing.
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import InvalidRequestError

# transformers' names, so a PEFT `target_modules` list means the same layers here.
TEXT_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VISION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")
CONNECTOR_PATH = "model.connector.modality_projection.proj"


def base_weight(linear) -> mx.array:
    """The (out, in) float weight of a Linear or QuantizedLinear."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size,
                             linear.bits, mode=getattr(linear, "mode", "affine"))
    return linear.weight


def dims(linear) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ lora_a @ lora_b, `scale` = alpha / r as PEFT's."""

    @classmethod
    def from_base(cls, linear, r: int = 8, scale: float = 1.0, dropout: float = 0.0):
        layer = cls(*dims(linear), r=r, scale=scale, dropout=dropout, bias="bias" in linear)
        layer.linear = linear
        layer.linear.freeze()
        layer.init_extra()
        return layer

    def __init__(self, input_dims: int, output_dims: int, r: int = 8, scale: float = 1.0,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = dropout
        self.scale = scale
        # PEFT's default: lora_A kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)),
        # and lora_B zeros, so the adapter starts as the identity.
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    def init_extra(self):
        pass

    def delta(self) -> mx.array:
        """scale * B A as an (out, in) weight update."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self, dequantize: bool = False):
        """A plain Linear (or, for a quantized base, a QuantizedLinear unless `dequantize`)
        with the update merged."""
        w = self.fused_weight()
        return make_linear(self.linear, w, dequantize)

    def fused_weight(self) -> mx.array:
        w = base_weight(self.linear)
        return (w + self.delta().astype(w.dtype)).astype(w.dtype)


class DoRALinear(LoRALinear):
    """PEFT's DoRA: out = linear(x) + (m/n - 1) * x W^T + (m/n) * scale * x A B, where
    n = ||W + scale * B A|| per output row, detached from the gradient (DoRA paper, 4.3)."""

    def init_extra(self):
        self.m = self.weight_norm()

    def weight_norm(self) -> mx.array:
        w = base_weight(self.linear).astype(mx.float32)
        delta = mx.stop_gradient(self.delta()).astype(mx.float32)
        return mx.sqrt(((w + delta) ** 2).sum(axis=1))

    def __call__(self, x):
        y = self.linear(x)
        k = (self.m / mx.stop_gradient(self.weight_norm())).astype(y.dtype)
        if self.training and self.dropout_p > 0:
            # With dropout PEFT recomputes the base product on the dropped-out input.
            x = self.dropout(x)
            base = x @ base_weight(self.linear).T.astype(x.dtype)
        else:
            base = y - self.linear.bias if "bias" in self.linear else y
        z = (x @ self.lora_a) @ self.lora_b
        return y + (k - 1) * base + k * (self.scale * z).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        w = base_weight(self.linear)
        merged = w.astype(mx.float32) + self.delta().astype(mx.float32)
        k = self.m / mx.sqrt((merged**2).sum(axis=1))
        return (k[:, None] * merged).astype(w.dtype)


def make_linear(like, weight: mx.array, dequantize: bool = False):
    """An nn.Linear holding `weight` (and `like`'s bias); re-quantized as `like` was unless
    `dequantize`."""
    out_dims, in_dims = weight.shape
    has_bias = "bias" in like
    linear = nn.Linear(in_dims, out_dims, bias=has_bias)
    linear.weight = weight
    if has_bias:
        linear.bias = like.bias
    if isinstance(like, nn.QuantizedLinear) and not dequantize:
        return nn.QuantizedLinear.from_linear(linear, like.group_size, like.bits,
                                              mode=getattr(like, "mode", "affine"))
    return linear


def lora_scale(config: dict) -> float:
    """PEFT's `alpha / rank` when the config gives `alpha`, else mlx-lm's `scale` as is."""
    if config.get("alpha") is not None:
        return config["alpha"] / config["rank"]
    return config.get("scale", 20.0)


def lora_targets(model, num_layers: int, config: dict) -> list[str]:
    """Module paths to adapt: `keys` in the last `num_layers` decoder layers (all if < 0),
    every vision layer with `train_vision`, the connector with `train_connector`."""
    text = model.model.text_model.layers
    n = len(text) if num_layers is None or num_layers < 0 else min(num_layers, len(text))
    keys = config.get("keys") or TEXT_KEYS
    paths = [f"model.text_model.layers.{i}.{k}" for i in range(len(text) - n, len(text)) for k in keys]
    if config.get("train_vision"):
        vkeys = config.get("vision_keys") or VISION_KEYS
        vis = model.model.vision_model.encoder.layers
        paths += [f"model.vision_model.encoder.layers.{i}.{k}" for i in range(len(vis)) for k in vkeys]
    if config.get("train_connector"):
        paths.append(CONNECTOR_PATH)
    return paths


def linear_to_lora_layers(model, num_layers: int, config: dict, use_dora: bool = False) -> list[str]:
    """Replace the targeted Linear / QuantizedLinear modules by LoRA (or DoRA) layers in place.

    `config`: `rank`, `alpha` (or mlx-lm's `scale`), `dropout`, `keys` (suffixes such as
    "self_attn.q_proj"), optional `train_vision` / `vision_keys` / `train_connector`.
    Returns the adapted module paths.
    """
    cls = DoRALinear if use_dora else LoRALinear
    modules = dict(model.named_modules())
    paths = lora_targets(model, num_layers, config)
    updates = []
    for path in paths:
        linear = modules.get(path)
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            raise InvalidRequestError(f"cannot adapt {path}: no Linear layer at that path")
        layer = cls.from_base(linear, r=config["rank"], scale=lora_scale(config),
                              dropout=config.get("dropout", 0.0))
        updates.append((path, layer))
    model.update_modules(tree_unflatten(updates))
    return paths




def fuse_lora_layers(model, dequantize: bool = False) -> list[str]:
    """Merge every LoRA/DoRA layer back into a plain (or re-quantized) Linear."""
    fused = [(p, m.fuse(dequantize)) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return [p for p, _ in fused]
