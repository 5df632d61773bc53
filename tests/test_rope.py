"""Rotary position settings of the text config: every Llama rope_type we accept rotates as
transformers' LlamaRotaryEmbedding (live, needs torch), whether the config names it
`rope_parameters` (transformers 5) or `rope_scaling` (transformers 4); the rest is refused."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm.errors import ConfigError
from mlx_smolvlm.models.config import TextConfig
from mlx_smolvlm.models.language import RoPE

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, rope_theta=100000.0, max_position_embeddings=4096)
ROPES = {
    "none": None,
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512},
}


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", ROPES)
def test_rotation_matches_transformers(kind, field):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    text = {**TEXT, field: ROPES[kind]}
    ref_cfg = LlamaConfig(**text)
    cfg = TextConfig.from_dict(text)
    assert cfg.rope_parameters == ref_cfg.rope_parameters
    # Positions far along the context, where the scaled low frequencies differ.
    offset, L = 3000, 8
    x = np.random.default_rng(0).standard_normal((1, 4, L, 16)).astype(np.float32)
    t = torch.from_numpy(x)
    cos, sin = LlamaRotaryEmbedding(ref_cfg)(t, torch.arange(offset, offset + L)[None])
    ref = apply_rotary_pos_emb(t, t, cos, sin)[0].numpy()
    diff = float(np.abs(np.array(RoPE(cfg)(mx.array(x), offset=offset)) - ref).max())
    print(f"rope {kind} via {field}: max abs diff {diff:.2e} at positions {offset}..{offset + L - 1}")
    # float32 angles near 3000 rad carry ~2e-4 of rounding on either side
    assert diff <= 1e-3


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "text_config.rope_scaling rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "text_config.rope_parameters rope_type 'longrope'"),
        ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling \(linear\) is missing factor"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "missing low_freq_factor, high_freq"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ],
)
def test_unsupported_rope_is_refused_by_name(edit, message):
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_dict({**TEXT, **edit})


def test_top_level_theta_fills_rope_parameters_without_one():
    cfg = TextConfig.from_dict({**TEXT, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert cfg.rope_theta == cfg.rope_parameters["rope_theta"] == 100000.0
    # The dict's own theta wins, as in transformers.
    cfg = TextConfig.from_dict({**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert cfg.rope_theta == 5e5
