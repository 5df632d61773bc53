"""Adapters in mlx-lm's and PEFT's layouts, --adapter-path, and fusing (tuner/adapters.py, fuse.py).

Tolerance against transformers + PEFT and against fused folders: 1e-4 absolute on float32 logits
of the tiny fixtures (unit-scale activations, logits of order 1-10; measured ~4e-6).
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm.convert.converter import convert
from mlx_smolvlm.convert.quality import agreement, all_logits, image_prompt
from mlx_smolvlm.fuse import fuse
from mlx_smolvlm.generate import load, main, stream_generate
from mlx_smolvlm.fuse import main as fuse_main
from mlx_smolvlm.loading import load_model
from mlx_smolvlm.tuner.adapters import (
    MLX_WEIGHTS, PEFT_WEIGHTS, AdapterError, detect_format, load_adapters, lora_layers, save_adapters,
)
from mlx_smolvlm.tuner.layers import linear_to_lora_layers

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-idefics3"  # untied head: mlx-vlm reads it
TOL = 1e-4
IDS = np.array([[1, 5, 9, 30, 2, 77] + [300] * 4 + [8, 4]])  # 4 image tokens: one small image
LORA = dict(rank=4, alpha=8, dropout=0.0, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
            train_vision=True, train_connector=True)


def pixels(config) -> np.ndarray:
    return np.array(image_prompt(config)["pixels"]).transpose(0, 3, 1, 2)[None]  # (B, N, C, H, W)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS), mx.array(pixels(model.config))))


def adapted(fine_tune_type="lora", seed=0, base=FIXTURE):
    """The fixture with a LoRA/DoRA adapter whose B (and magnitude) are random, so it matters."""
    model = load_model(base)
    mx.random.seed(seed)
    linear_to_lora_layers(model, 2, LORA, use_dora=fine_tune_type == "dora")
    for m in lora_layers(model).values():
        m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape)
        if fine_tune_type == "dora":
            m.m = m.m * (1 + 0.1 * mx.random.normal(m.m.shape))
    model.eval()
    config = dict(fine_tune_type=fine_tune_type, num_layers=2, lora_parameters=dict(LORA),
                  train_vision=True, train_connector=True, base_model=str(base))
    return model, config


def transformers_logits(folder, adapter=None) -> np.ndarray:
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    inputs = dict(input_ids=torch.tensor(IDS), pixel_values=torch.tensor(pixels(load_model(FIXTURE).config)))
    with torch.no_grad():
        return model.eval()(**inputs).logits.numpy()


def report(what, diff, tol=TOL):
    print(f"{what}: max |diff| {diff:.2e} (tol {tol:.0e})")
    assert diff < tol


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_layout_round_trip_is_exact(tmp_path, kind):
    model, config = adapted(kind)
    save_adapters(model, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", MLX_WEIGHTS]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == kind and saved["lora_parameters"]["scale"] == 2.0
    fresh = load_model(FIXTURE)
    assert load_adapters(fresh, tmp_path)["fine_tune_type"] == kind and detect_format(tmp_path) == "mlx"
    assert np.array_equal(logits(fresh), logits(model))
    assert np.abs(logits(model) - logits(load_model(FIXTURE))).max() > 0.1  # the adapter matters


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_reads_our_adapter_with_the_same_logits(tmp_path, kind):
    model, config = adapted(kind)
    save_adapters(model, tmp_path, config, fmt="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["use_dora"] == (kind == "dora") and len(cfg["target_modules"]) == 2 * 3 + 2 * 6 + 1  # text keys, every vision Linear, connector
    report(f"transformers + PEFT on our {kind} adapter", np.abs(transformers_logits(FIXTURE, tmp_path) - logits(model)).max())


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_our_loader_reads_a_peft_adapter_with_the_same_logits(tmp_path, kind):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(FIXTURE, dtype=torch.float32)
    # Suffixes, as TRL users write them (they hit the vision tower's q/v too), and a per-layer
    # rank and alpha as PEFT's patterns give them.
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "fc1"],
                      use_dora=kind == "dora", use_rslora=kind == "rslora",
                      **({} if kind == "rslora" else dict(rank_pattern={"down_proj": 2}, alpha_pattern={"fc1": 3})))
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path)
    assert detect_format(tmp_path) == "peft"
    ours = load_model(FIXTURE)
    load_adapters(ours, tmp_path)
    assert len(lora_layers(ours)) == 2 * 3 + 2 * 3  # text q/v/down, vision q/v/fc1
    with torch.no_grad():
        inputs = dict(input_ids=torch.tensor(IDS), pixel_values=torch.tensor(pixels(ours.config)))
        theirs = peft_model.eval()(**inputs).logits.numpy()
    report(f"ours on a PEFT {kind} adapter vs PEFT", np.abs(logits(ours) - theirs).max())


def tied_fixture(dest: Path) -> Path:
    """tiny-idefics3 with its head tied to the embeddings, as SmolLM2's decoders are."""
    shutil.copytree(FIXTURE, dest)
    config = json.loads((dest / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("kind,tied", [("lora", False), ("dora", False), ("lora", True)])
def test_fused_folder_loads_everywhere_with_the_same_logits(tmp_path, kind, tied):
    vlm_utils = pytest.importorskip("mlx_vlm.utils")
    base = tied_fixture(tmp_path / "tied") if tied else FIXTURE
    model, config = adapted(kind, base=base)
    save_adapters(model, tmp_path / "adapter", config)
    ref = logits(model)
    out = fuse(str(base), tmp_path / "adapter", tmp_path / "fused")
    if tied:  # mlx-vlm needs the head as its own weight (as the converter writes it)
        assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    report(f"fused {kind}, our loader", np.abs(logits(load_model(out)) - ref).max())
    report(f"fused {kind}, transformers", np.abs(transformers_logits(out) - ref).max())
    theirs = vlm_utils.load_model(out)(mx.array(IDS), mx.array(pixels(model.config))).logits
    report(f"fused {kind}, mlx-vlm", np.abs(np.array(theirs) - ref).max())
    # 8 bits through our converter, or directly: the same quantization of the same weights.
    q8 = convert(str(out), tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, evaluate=False)
    direct = fuse(str(base), tmp_path / "adapter", tmp_path / "direct", quantize=True, q_bits=8, q_group_size=32)
    assert np.array_equal(logits(load_model(q8)), logits(load_model(direct)))
    prompts = [dict(input_ids=mx.array(IDS[:, :6])), image_prompt(model.config)]
    q = agreement(all_logits(load_model(out), prompts), all_logits(load_model(q8), prompts))
    # KL, not top-1: the tiny random model has near-ties that 8-bit rounding may flip.
    print(f"fused {kind} at 8 bits: KL {q['kl']:.2e} nats (tol 1e-3), top-1 {q['top1']:.3f}")
    assert q["kl"] < 1e-3


def test_fuse_on_a_quantized_base(tmp_path):
    """QLoRA: the adapter on a 4-bit base. --dequantize writes base + update exactly in float;
    without it each adapted layer is re-quantized as it was."""
    base = convert(str(FIXTURE), tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, evaluate=False)
    model, config = adapted(base=base)
    save_adapters(model, tmp_path / "adapter", config)
    ref = logits(model)
    floats = fuse(str(base), tmp_path / "adapter", tmp_path / "float", dequantize=True)
    assert "quantization" not in json.loads((floats / "config.json").read_text())
    report("fused on 4-bit base, --dequantize", np.abs(logits(load_model(floats)) - ref).max())
    requant = load_model(fuse(str(base), tmp_path / "adapter", tmp_path / "requant"))
    assert type(requant.model.text_model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    print(f"fused on 4-bit base, re-quantized: max |diff| {np.abs(logits(requant) - ref).max():.2e}")
    assert fuse_main(["--model", str(base), "--adapter-path", str(tmp_path / "adapter"),
                      "--save-path", str(tmp_path / "x"), "-q"]) == 1  # needs --dequantize


def test_adapter_path_in_the_cli_and_the_api(tiny_idefics3, tmp_path, capsys):
    model, config = adapted(base=tiny_idefics3)
    save_adapters(model, tmp_path / "adapter", config, fmt="peft")
    args = ["--model", str(tiny_idefics3), "--prompt", "Hello there", "--max-tokens", "6"]
    assert main(args + ["--adapter-path", str(tmp_path / "adapter")]) == 0
    with_adapter = capsys.readouterr().out
    assert main(args) == 0
    plain = capsys.readouterr().out
    model, processor = load(tiny_idefics3, adapter_path=tmp_path / "adapter")
    messages = [processor.text_message("user", "Hello there")]
    api = "".join(r.text for r in stream_generate(model, processor, messages, max_tokens=6))
    assert with_adapter.strip() == api.strip() and with_adapter != plain


def test_atomic_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model, config = adapted()
    save_adapters(model, tmp_path, config)
    before = (tmp_path / MLX_WEIGHTS).read_bytes()

    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapters(adapted(seed=1)[0], tmp_path, config)
    assert (tmp_path / MLX_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", MLX_WEIGHTS]


def bad_folder(tmp_path, kind) -> Path:
    model, config = adapted()
    fmt = "peft" if kind.startswith("peft") else "mlx"
    folder = save_adapters(model, tmp_path / kind, config, fmt=fmt)
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    weights = folder / (PEFT_WEIGHTS if fmt == "peft" else MLX_WEIGHTS)
    if kind == "no-weights":
        weights.unlink()
    elif kind == "no-config":
        cfg_file.unlink()
    elif kind == "not-json":
        cfg_file.write_text("{")
    elif kind == "neither":
        cfg_file.write_text('{"r": 4}')
    elif kind == "corrupt":
        weights.write_bytes(b"not safetensors")
    elif kind == "peft-bias":
        cfg_file.write_text(json.dumps(dict(cfg, bias="all")))
    elif kind in ("foreign-key", "wrong-shape", "wrong-path"):
        w = mx.load(str(weights))
        k = next(k for k in w if "text_model.layers.0" in k)
        if kind == "foreign-key":
            w["model.text_model.norm.weight"] = mx.zeros(64)
        elif kind == "wrong-shape":
            w[k] = mx.zeros((3, 3))
        else:  # the whole layer's tensors
            layer = k.rsplit(".", 1)[0] + "."
            for name in [n for n in w if n.startswith(layer)]:
                w[name.replace("layers.0", "layers.7")] = w.pop(name)
        mx.save_safetensors(str(weights), w)
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such adapter folder"),
    ("no-config", "has no adapter_config.json"),
    ("not-json", "is not valid JSON"),
    ("neither", "neither mlx-lm's"),
    ("no-weights", "but no adapters.safetensors"),
    ("corrupt", "cannot read"),
    ("peft-bias", "PEFT option bias='all' is not supported"),
    ("foreign-key", "'model.text_model.norm.weight' is not a LoRA/DoRA weight"),
    ("wrong-shape", "has shape (3, 3), the model needs"),
    ("wrong-path", "the model has no Linear layer model.text_model.layers.7"),
])
def test_bad_adapters_give_one_line(tmp_path, tiny_idefics3, capsys, kind, message):
    folder = tmp_path / "nowhere" if kind == "missing" else bad_folder(tmp_path, kind)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_adapters(load_model(FIXTURE), folder)
    if kind in ("missing", "peft-bias"):
        args = ["--model", str(tiny_idefics3), "--prompt", "hi", "--adapter-path", str(folder)]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        from mlx_smolvlm import server

        assert server.main(["--model", str(tiny_idefics3), "--adapter-path", str(folder)]) == 1
        assert message in capsys.readouterr().err
