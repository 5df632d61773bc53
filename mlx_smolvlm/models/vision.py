"""SigLIP vision tower with SmolVLM's variable-resolution position ids."""

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig


def patch_attention_mask(pixel_attention_mask: mx.array, patch_size: int) -> mx.array:
    """(N, H, W) pixel mask -> (N, H//p, W//p): a patch counts if any pixel in it is real."""
    N, H, W = pixel_attention_mask.shape
    Ph, Pw = H // patch_size, W // patch_size
    # 384-px tiles with 14-px patches: the stride-p conv sees 27 patches and ignores the
    # last 6 pixels; the reference's unfold drops them from the mask too.
    m = pixel_attention_mask[:, : Ph * patch_size, : Pw * patch_size]
    return m.reshape(N, Ph, patch_size, Pw, patch_size).any(axis=(2, 4))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_patches_per_side = cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, cfg.hidden_size)

    def position_ids(self, patch_mask: mx.array) -> mx.array:
        # Each image's real patch grid is mapped onto the trained n x n position grid
        # by bucketing its fractional coordinates, in float32 as the reference does.
        n = self.num_patches_per_side
        N, Ph, Pw = patch_mask.shape
        boundaries = mx.arange(1, n, dtype=mx.float32) / n
        nb_h = patch_mask[:, :, 0].sum(axis=1).astype(mx.float32)
        nb_w = patch_mask[:, 0, :].sum(axis=1).astype(mx.float32)

        def buckets(count, nb):
            frac = mx.arange(count, dtype=mx.float32)[None] * (1.0 / nb)[:, None]
            frac = mx.minimum(frac, 1.0 - 1e-6)
            return (frac[..., None] >= boundaries).sum(axis=-1)

        pos = buckets(Ph, nb_h)[:, :, None] * n + buckets(Pw, nb_w)[:, None, :]
        return mx.where(patch_mask, pos, 0).reshape(N, -1)

    def __call__(self, pixel_values: mx.array, patch_mask: mx.array) -> mx.array:
        # pixel_values: (N, H, W, C), channels last for MLX's conv.
        h = self.patch_embedding(pixel_values)
        N, _, _, D = h.shape
        h = h.reshape(N, -1, D)
        return h + self.position_embedding(self.position_ids(patch_mask))


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.scale = (D // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def __call__(self, x, mask=None):
        B, L, D = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


def gelu_tanh(x):
    # transformers' gelu_pytorch_tanh, 0.5x(1 + tanh(z)), as x * sigmoid(2z): one transcendental
    # and fewer passes; MLX's CPU tanh/exp are scalar (~8x torch's), so this is 1.7x faster there.
    return x * mx.sigmoid(x * (1.5957691216057308 + 0.07135481627260025 * mx.square(x)))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = gelu_tanh if cfg.hidden_act == "gelu_pytorch_tanh" else nn.gelu

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x, mask=None):
        h = x + self.self_attn(self.layer_norm1(x), mask)
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class VisionModel(nn.Module):
    """transformers' SmolVLMVisionTransformer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixel_values: mx.array, patch_mask: mx.array) -> mx.array:
        h = self.embeddings(pixel_values, patch_mask)
        # Padding patches are hidden as keys; every query still has real keys to see.
        N = patch_mask.shape[0]
        mask = patch_mask.reshape(N, 1, 1, -1)
        for layer in self.encoder.layers:
            h = layer(h, mask)
        return self.post_layernorm(h)
