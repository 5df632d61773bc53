"""Configuration dataclasses read from a checkpoint's config.json.

Field names are transformers'. Defaults are the reference classes' own defaults
(SmolVLMVisionConfig / Idefics3VisionConfig agree on them), because real hub
configs rely on them: SmolVLM-256M's vision_config omits `num_hidden_layers` and
`intermediate_size`. Nothing is inferred from another field, and the text
decoder's sizes have no default: a config without them is not a SmolVLM.
"""

from dataclasses import MISSING, dataclass, fields

from ..errors import ConfigError

MODEL_TYPES = ("idefics3", "smolvlm")
# transformers' Llama rope types we compute, and the parameters each reads. `dynamic` (NTK)
# changes the frequencies only past max_position_embeddings, which generation refuses.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _from_dict(cls, params: dict, where: str):
    names = {f.name for f in fields(cls)}
    missing = [
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in params
    ]
    if missing:
        raise ConfigError(f"{where} is missing required field(s): {', '.join(missing)}")
    return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, params: dict):
        cfg = _from_dict(cls, params, "vision_config")
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"vision_config.hidden_act {cfg.hidden_act!r} is not supported")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError("vision_config.hidden_size must divide by num_attention_heads")
        if cfg.patch_size == cfg.num_channels:
            # The conv weight's layout is told apart by these two sizes (Model.sanitize).
            raise ConfigError("vision_config.patch_size equal to num_channels is not supported")
        return cfg

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    # SmolVLMConfig builds its text config with rms_norm_eps=1e-5.
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None  # transformers 4's name; replaces rope_parameters if set
    partial_rotary_factor: float | None = None
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        # Both are the reference's documented defaults, not guesses.
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._resolve_rope()

    def _resolve_rope(self):
        # As transformers 5 (convert_rope_params_to_dict): a legacy `rope_scaling` replaces
        # `rope_parameters`, whose own rope_theta wins over the top-level one.
        name = "rope_scaling" if self.rope_scaling else "rope_parameters"
        rope = dict(self.rope_scaling or self.rope_parameters or {})
        rope_type = rope.setdefault("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"text_config.{name} rope_type {rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        partial = rope.get("partial_rotary_factor", self.partial_rotary_factor)
        if partial not in (None, 1, 1.0):
            raise ConfigError(f"text_config partial_rotary_factor {partial} is not supported (only 1.0)")
        rope.setdefault("rope_theta", 10000.0 if self.rope_theta is None else self.rope_theta)
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        missing = [k for k in ROPE_TYPES[rope_type] if k not in rope]
        if missing:
            raise ConfigError(f"text_config.{name} ({rope_type}) is missing {', '.join(missing)}")
        self.rope_theta, self.rope_parameters = rope["rope_theta"], rope

    @classmethod
    def from_dict(cls, params: dict):
        cfg = _from_dict(cls, params, "text_config")
        if cfg.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act {cfg.hidden_act!r} is not supported")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError("text_config.num_attention_heads must divide by num_key_value_heads")
        return cfg


@dataclass
class ModelConfig:
    model_type: str
    vision_config: VisionConfig
    text_config: TextConfig
    scale_factor: int = 2
    image_token_id: int = 128257
    # The composite model ties (or not) by its own top-level flag, as the reference does.
    tie_word_embeddings: bool = False
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, params: dict):
        model_type = params.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a SmolVLM checkpoint (expected one of {MODEL_TYPES})"
            )
        for key in ("vision_config", "text_config"):
            if not isinstance(params.get(key), dict):
                raise ConfigError(f"config is missing required field: {key}")
        params = dict(params)
        params["vision_config"] = VisionConfig.from_dict(params["vision_config"])
        params["text_config"] = TextConfig.from_dict(params["text_config"])
        cfg = _from_dict(cls, params, "config")
        side = cfg.vision_config.patches_per_side
        if side % cfg.scale_factor:
            raise ConfigError(
                f"scale_factor {cfg.scale_factor} does not divide the {side}x{side} patch grid"
            )
        return cfg

    @property
    def image_seq_len(self) -> int:
        return (self.vision_config.patches_per_side // self.scale_factor) ** 2
