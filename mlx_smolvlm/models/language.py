"""The Llama (SmolLM2) decoder, with transformers' module names."""

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import InvalidRequestError
from .base import attention
from .config import TextConfig


def llama3_inv_freq(p: dict, dims: int) -> mx.array:
    """transformers' `llama3` rope_type: long wavelengths slowed by `factor`, short ones kept,
    a smooth ramp between (float32, in the reference's order of operations)."""
    inv = 1.0 / (p["rope_theta"] ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = mx.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return mx.where(medium, smoothed, scaled)


class RoPE(nn.Module):
    """Rotary embedding of transformers' Llama: the rotate_half layout (MLX's non-traditional),
    frequencies from `rope_parameters` as TextConfig resolved them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        p, self.dims = cfg.rope_parameters, cfg.head_dim
        # linear: positions divided by `factor`; llama3: MLX takes periods (1 / inv_freq).
        self.scale = 1.0 / p["factor"] if p["rope_type"] == "linear" else 1.0
        self.base = None if p["rope_type"] == "llama3" else p["rope_theta"]
        self._freqs = 1.0 / llama3_inv_freq(p, self.dims) if self.base is None else None

    def __call__(self, x, offset=0):
        return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=self.scale,
                            offset=offset, freqs=self._freqs)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)
        self.rope = RoPE(cfg)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = attention(q, k, v, cache, self.scale, mask)  # k, v may be quantized (cache.py)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D, H, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, H, bias=bias)
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(L: int, cache):
    # The cache knows what a chunk may see: a rotating one masks beyond its window, a batch
    # cache (BatchKVCache) each row's left padding. Without one, one new token attends to
    # everything before it and a longer chunk needs causality.
    if cache is not None:
        return cache.make_mask(L)
    return "causal" if L > 1 else None


class LanguageModel(nn.Module):
    """transformers' LlamaModel: embeddings, layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, inputs=None, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = attention_mask(h.shape[1], cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


def lm_logits(text_model: LanguageModel, lm_head, h: mx.array) -> mx.array:
    """Project hidden states to the vocabulary, through the tied embedding if no head."""
    if lm_head is None:
        return text_model.embed_tokens.as_linear(h)
    return lm_head(h)


class TextModel(nn.Module):
    """transformers' LlamaForCausalLM: a decoder on its own (e.g. SmolLM2 from a GGUF)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = LanguageModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def get_input_embeddings(self, input_ids, pixel_values=None, pixel_attention_mask=None):
        if pixel_values is not None:
            raise InvalidRequestError("this is a text-only model: it cannot take images")
        return self.model.embed_tokens(input_ids)

    def __call__(self, input_ids=None, cache=None, input_embeddings=None):
        h = self.model(input_ids, cache, input_embeddings)
        return lm_logits(self.model, self.get("lm_head"), h)

    def sanitize(self, weights: dict) -> dict:
        return {
            k: v
            for k, v in weights.items()
            if "rotary_emb.inv_freq" not in k
            and not (k == "lm_head.weight" and self.config.tie_word_embeddings)
        }
