"""SmolVLM / Idefics3: vision tower -> connector -> image features merged into the decoder."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import InvalidRequestError
from ..weight_layout import from_mlx_vlm
from .config import ModelConfig
from .connector import Connector
from .language import LanguageModel, lm_logits
from .vision import VisionModel, patch_attention_mask


class SmolVLMModel(nn.Module):
    """transformers' SmolVLMModel / Idefics3Model (the `model.` prefix of the checkpoint)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_model = VisionModel(cfg.vision_config)
        self.connector = Connector(cfg)
        self.text_model = LanguageModel(cfg.text_config)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = SmolVLMModel(config)
        if not config.tie_word_embeddings:
            t = config.text_config
            self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.text_model.layers

    # Images per vision-tower pass, so a 17-tile image or 64 video frames never hold all their
    # activations at once (256M bf16, 64 frames: 1.07 GB peak at 4; each extra frame per batch
    # costs ~87 MB of activations on CPU).
    vision_batch_size = 4

    def get_image_features(self, pixel_values: mx.array, patch_mask: mx.array) -> mx.array:
        """(N, H, W, C) real images -> (N, image_seq_len, text hidden), in bounded batches."""
        dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        n, step = pixel_values.shape[0], self.vision_batch_size
        parts = []
        for i in range(0, n, step):
            h = self.model.vision_model(pixel_values[i : i + step].astype(dtype), patch_mask[i : i + step])
            parts.append(self.model.connector(h))
            if n > step:
                mx.eval(parts[-1])  # free this batch's activations before the next
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def tokens_per_image(self, height: int, width: int) -> int:
        """Feature rows (image tokens) one image of this size gives: `image_seq_len` for a
        tile, fewer for a smaller video frame."""
        n = self.config.vision_config.patch_size * self.config.scale_factor
        return (height // n) * (width // n)

    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        pixel_attention_mask: mx.array | None = None,
    ) -> mx.array:
        """Token embeddings with image features written over the `<image>` positions.

        `pixel_values` is (B, N, C, H, W) and `pixel_attention_mask` (B, N, H, W), the
        processor's (and transformers') layout. Called once per prompt, never per token.
        """
        embeds = self.model.text_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        B, N, C, H, W = pixel_values.shape
        pixels = pixel_values.reshape(B * N, C, H, W)
        pam = None if pixel_attention_mask is None else pixel_attention_mask.reshape(B * N, H, W)

        # The one host read per prompt, on inputs that already exist and before the
        # vision tower runs: which images are batch padding (all zeros, dropped as the
        # reference drops them) and whether the prompt has a token for every feature row.
        is_image = input_ids == self.config.image_token_id
        real, n_tokens = np.array((pixels != 0).any(axis=(1, 2, 3))), is_image.sum().item()
        real_idx = np.flatnonzero(real)
        self.check_image_tokens(n_tokens, len(real_idx), self.tokens_per_image(H, W))
        if len(real_idx) == 0:
            return embeds

        if len(real_idx) < B * N:
            # Only batch padding is dropped: the gather copies every pixel it keeps.
            idx = mx.array(real_idx)
            pixels, pam = pixels[idx], None if pam is None else pam[idx]
        return self.merge_image_features(input_ids, self.encode_images(pixels, pam), embeds)

    @staticmethod
    def check_image_tokens(n_tokens: int, n_images: int, per_image: int):
        """Before any image is encoded: the prompt has one `<image>` token per feature row
        (every path that splices features checks here: generate's and the batch engine's)."""
        n_rows = n_images * per_image
        if n_tokens != n_rows:
            raise InvalidRequestError(
                f"input_ids hold {n_tokens} image tokens but the {n_images} image(s) give "
                f"{n_rows} feature rows ({per_image} per image): the prompt and "
                "the pixel values do not belong together"
            )

    def encode_images(self, pixels: mx.array, pixel_attention_mask: mx.array | None = None) -> mx.array:
        """(N, C, H, W) real images and their (N, H, W) masks (None: all pixels real) ->
        (N, tokens, text hidden)."""
        if pixel_attention_mask is None:
            pixel_attention_mask = mx.ones((pixels.shape[0], *pixels.shape[2:]), dtype=mx.bool_)
        pam = pixel_attention_mask.astype(mx.bool_)
        patch_mask = patch_attention_mask(pam, self.config.vision_config.patch_size)
        return self.get_image_features(pixels.transpose(0, 2, 3, 1), patch_mask)

    def merge_image_features(self, input_ids, feats, embeds=None) -> mx.array:
        """Token embeddings with `feats` (N, tokens, D) written over the `<image>` positions,
        the k-th image token (row-major over the batch) taking the k-th feature row."""
        if embeds is None:
            embeds = self.model.text_model.embed_tokens(input_ids)
        B = embeds.shape[0]
        is_image = input_ids == self.config.image_token_id
        feats = feats.reshape(-1, feats.shape[-1]).astype(embeds.dtype)
        flat = is_image.reshape(-1)
        rows = mx.maximum(mx.cumsum(flat.astype(mx.int32)) - 1, 0)
        merged = mx.where(flat[:, None], feats[rows], embeds.reshape(B * embeds.shape[1], -1))
        return merged.reshape(embeds.shape)

    def __call__(
        self,
        input_ids: mx.array | None = None,
        pixel_values: mx.array | None = None,
        pixel_attention_mask: mx.array | None = None,
        cache=None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        if input_embeddings is None and pixel_values is not None:
            input_embeddings = self.get_input_embeddings(input_ids, pixel_values, pixel_attention_mask)
        h = self.model.text_model(input_ids, cache, input_embeddings)
        return lm_logits(self.model.text_model, self.get("lm_head"), h)

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face, mlx-vlm or already converted weights -> this module's. Idempotent."""
        v_cfg = self.config.vision_config
        torch_conv = (v_cfg.num_channels, v_cfg.patch_size, v_cfg.patch_size)
        out = {}
        for k, v in weights.items():
            k = from_mlx_vlm(k)  # a fixed prefix table (weight_layout.py); our keys pass unchanged
            if "rotary_emb.inv_freq" in k:
                continue
            if k.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue  # mlx-vlm always writes a head (possibly quantized), tied or not
            if k.endswith("patch_embedding.weight") and tuple(v.shape[1:]) == torch_conv:
                # PyTorch conv weights are (out, in, kH, kW); MLX wants (out, kH, kW, in).
                # The config fixes both shapes, so the test is exact, not a guess.
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out
