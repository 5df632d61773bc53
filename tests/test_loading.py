"""Config parsing, checkpoint loading and the model's input checks: clear errors, no guessing."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm.errors import CheckpointError, ConfigError, InvalidRequestError
from mlx_smolvlm.loading import get_model_path, load_model
from mlx_smolvlm.models.cache import make_prompt_cache
from mlx_smolvlm.models.config import ModelConfig
from mlx_smolvlm.models.connector import pixel_shuffle

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-idefics3"


def tiny_config() -> dict:
    return json.loads((TINY / "config.json").read_text())


def copy_tiny(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY, dst)
    return dst


def test_real_vision_config_relies_on_reference_defaults():
    # SmolVLM2-500M's published vision_config omits num_hidden_layers and intermediate_size.
    cfg = tiny_config()
    cfg["vision_config"] = {"hidden_size": 768, "image_size": 512, "num_attention_heads": 12, "patch_size": 16}
    v = ModelConfig.from_dict(cfg).vision_config
    assert (v.num_hidden_layers, v.intermediate_size, v.layer_norm_eps) == (12, 3072, 1e-6)


def test_rope_theta_read_from_rope_parameters_or_top_level():
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg).text_config.rope_theta == 100000.0
    cfg["text_config"].pop("rope_parameters")
    cfg["text_config"]["rope_theta"] = 273768
    assert ModelConfig.from_dict(cfg).text_config.rope_theta == 273768


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_config"].pop("num_hidden_layers"), "num_hidden_layers"),
        (lambda c: c.pop("text_config"), "text_config"),
        (lambda c: c.update(model_type="llava"), "not a SmolVLM checkpoint"),
        (lambda c: c.update(scale_factor=3), "scale_factor 3"),
        (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn"}), "yarn"),
    ],
)
def test_bad_config_names_the_problem(edit, message):
    cfg = tiny_config()
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(cfg)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such model folder"):
        get_model_path(str(tmp_path / "missing"))


def test_hub_unreachable_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local folder"):
        get_model_path("HuggingFaceTB/not-a-cached-model")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = copy_tiny(tmp_path)
    w = mx.load(str(path / "model.safetensors"))
    w.pop("model.text_model.norm.weight")
    w["model.extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(path / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match=r"missing 1: model.text_model.norm.weight.*unexpected 1: model.extra"):
        load_model(path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    path = copy_tiny(tmp_path)
    cfg = tiny_config()
    cfg["text_config"]["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.*shape"):
        load_model(path)


def test_sharded_checkpoint_with_missing_shard(tmp_path):
    path = copy_tiny(tmp_path)
    w = mx.load(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    keys = sorted(w)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for f, ks in shards.items():
        mx.save_safetensors(str(path / f), {k: w[k] for k in ks})
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    load_model(path)  # both shards present: loads
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weight shard"):
        load_model(path)


def test_corrupt_weights_file(tmp_path):
    path = copy_tiny(tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(path)


def test_sanitize_is_idempotent_and_loads_converted_layout(tmp_path):
    model = load_model(TINY)
    raw = mx.load(str(TINY / "model.safetensors"))
    once = model.sanitize(raw)
    twice = model.sanitize(once)
    assert once.keys() == twice.keys()
    assert all(mx.array_equal(once[k], twice[k]) for k in once)
    key = "model.vision_model.embeddings.patch_embedding.weight"
    assert raw[key].shape == (32, 3, 4, 4) and once[key].shape == (32, 4, 4, 3)
    # A folder saved in MLX layout loads to the same model.
    path = copy_tiny(tmp_path)
    mx.save_safetensors(str(path / "model.safetensors"), once)
    again = load_model(path)
    assert mx.array_equal(again.model.vision_model.embeddings.patch_embedding.weight, once[key])


def test_dtype_override_and_stored_dtype():
    assert load_model(TINY).model.text_model.norm.weight.dtype == mx.float32
    m = load_model(TINY, dtype=mx.bfloat16)
    assert m.model.vision_model.embeddings.patch_embedding.weight.dtype == mx.bfloat16


def test_image_token_count_must_match_feature_rows():
    model = load_model(TINY)
    T = model.config.image_seq_len
    ids = mx.array([[1, 2] + [300] * (2 * T - 1) + [3]])  # two images, one token short
    pv = mx.ones((1, 2, 3, 32, 32))
    with pytest.raises(InvalidRequestError, match=rf"{2 * T - 1} image tokens but the 2 image\(s\) give {2 * T}"):
        model.get_input_embeddings(ids, pv)


def test_text_only_input_needs_no_pixels():
    model = load_model(TINY)
    ids = mx.array([[1, 2, 3, 4]])
    logits = model(ids)
    assert logits.shape == (1, 4, 512)
    # the same as the decoder alone on the token embeddings, and as a cached decode of them
    embeds = model.model.text_model.embed_tokens(ids)
    assert mx.array_equal(logits, model(input_embeddings=embeds)).item()
    cache = make_prompt_cache(model)
    steps = [model(ids[:, i : i + 1], cache=cache) for i in range(4)]
    assert mx.allclose(mx.concatenate(steps, axis=1), logits, atol=1e-5).item()


def reference_pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """transformers' SmolVLMConnector.pixel_shuffle, step by step, in numpy."""
    bsz, seq, d = x.shape
    h = w = int(seq**0.5)
    x = x.reshape(bsz, h, w, d).reshape(bsz, h, w // r, d * r).transpose(0, 2, 1, 3)
    x = x.reshape(bsz, w // r, h // r, d * r * r).transpose(0, 2, 1, 3)
    return x.reshape(bsz, seq // (r * r), d * r * r)


@pytest.mark.parametrize("r, side, d", [(2, 8, 5), (3, 9, 4), (4, 8, 3), (4, 32, 2)])
def test_pixel_shuffle_is_the_reference_permutation(r, side, d):
    x = np.arange(2 * side * side * d, dtype=np.float32).reshape(2, side * side, d)
    assert np.array_equal(np.array(pixel_shuffle(mx.array(x), r)), reference_pixel_shuffle(x, r))


@pytest.mark.parametrize(
    "quantization, message",
    [
        ({"group_size": 64, "bits": 7}, "bits 7"),
        ({"group_size": 48, "bits": 4}, "group_size 48"),
        ({"group_size": 32, "bits": 4, "mode": "mxfp4"}, "mxfp4"),
        ({"group_size": 64, "bits": 4, "model.text_model.layers.0.mlp.up_proj": {"group_size": 64, "bits": 1}},
         r"quantization of layer model.text_model.layers.0.mlp.up_proj"),
    ],
)
def test_unsupported_quantization_is_refused(tmp_path, quantization, message):
    path = copy_tiny(tmp_path)
    cfg = tiny_config()
    cfg["quantization"] = quantization
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"unsupported.*{message}"):
        load_model(path)


def test_dequantize_model_gives_the_quantized_models_float_twin():
    import mlx.nn as nn

    from mlx_smolvlm.loading import dequantize_model

    model = load_model(TINY)
    decoder = lambda p, m: hasattr(m, "to_quantized") and ("text_model" in p or p == "lm_head")  # noqa: E731
    nn.quantize(model, group_size=32, bits=8, class_predicate=decoder)
    ids = mx.array([[1, 2, 3, 4, 5]])
    quantized = model(ids)
    dequantize_model(model)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    diff = mx.abs(model(ids) - quantized).max().item()
    print(f"dequantized vs quantized logits: max diff {diff:.2e} (tol 1e-4)")
    assert diff <= 1e-4
