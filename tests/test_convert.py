"""The converter: every recipe round-trips through load_model (and mlx-vlm), bad input leaves nothing."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_smolvlm.convert import ConvertError, RECIPES, convert, quantize_model
from mlx_smolvlm.convert.__main__ import main
from mlx_smolvlm.convert.quality import agreement, all_logits, image_prompt
from mlx_smolvlm.errors import CheckpointError
from mlx_smolvlm.loading import load_model, load_safetensors
from mlx_smolvlm.weight_layout import to_mlx_vlm

FIXTURES = Path(__file__).parent / "fixtures"
PRESETS = ("tiny-idefics3", "tiny-smolvlm")
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def source(tmp_path: Path, preset: str = "tiny-idefics3") -> Path:
    """A copy of a Hugging Face layout tiny checkpoint with tokenizer-side assets beside it."""
    dst = tmp_path / preset
    shutil.copytree(FIXTURES / preset, dst, ignore=shutil.ignore_patterns("golden.npz"))
    (dst / "chat_template.jinja").write_text("{{ messages }}")
    (dst / "preprocessor_config.json").write_text('{"processor_class": "SmolVLMProcessor"}')
    return dst


def prompts(config) -> list:
    return [dict(input_ids=mx.array([[1, 5, 9, 30, 2, 77, 4, 8]])), image_prompt(config)]


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_sanitize_is_idempotent():
    for preset in PRESETS:
        model = load_model(FIXTURES / preset, lazy=True)
        once = model.sanitize(load_safetensors(FIXTURES / preset))
        twice = model.sanitize(once)
        assert once.keys() == twice.keys()
        assert all(mx.array_equal(once[k], twice[k]) for k in once)


@pytest.mark.parametrize("preset", PRESETS)
def test_float_conversion_loads_with_identical_logits(tmp_path, preset):
    src = source(tmp_path, preset)
    out = convert(str(src), tmp_path / "out")
    ref, got = load_model(src), load_model(out)
    for p, q in zip(all_logits(ref, prompts(ref.config)), all_logits(got, prompts(got.config))):
        assert mx.array_equal(p, q)
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted(
        ["README.md", "chat_template.jinja", "config.json", "generation_config.json",
         "model.safetensors", "preprocessor_config.json"]
    )
    assert "quantization" not in json.loads((out / "config.json").read_text())


def test_dtype_cast(tmp_path):
    out = convert(str(source(tmp_path)), tmp_path / "out", dtype="bfloat16")
    dtypes = {v.dtype for _, v in tree_flatten(load_model(out).parameters())}
    assert dtypes == {mx.bfloat16}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)])
def test_every_recipe_round_trips(tmp_path, preset, recipe, bits, group_size):
    src = source(tmp_path, preset)
    out = convert(str(src), tmp_path / "out", quantize=True, q_bits=bits, q_group_size=group_size,
                  recipe=recipe, evaluate=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    loaded = load_model(out)

    # Each layer is what config.json says: quantized at its bits, or float.
    for path, module in tree_flatten(loaded.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(module, (nn.Linear, nn.Embedding) + QUANTIZED):
            continue
        entry = q[path]
        if entry is False:
            assert not isinstance(module, QUANTIZED), path
        else:
            assert (module.bits, module.group_size) == (entry["bits"], entry["group_size"]), path
            assert q[to_mlx_vlm(path)] == entry  # what mlx-vlm and mlx-swift-lm look up

    # Loading gives exactly the model the converter quantized in memory.
    fresh = load_model(src)
    quantize_model(fresh, bits, group_size, recipe)
    for p, r in zip(all_logits(fresh, prompts(fresh.config)), all_logits(loaded, prompts(loaded.config))):
        assert mx.array_equal(p, r)


def test_layers_whose_width_the_group_does_not_divide_stay_float(tmp_path):
    # tiny vision tower: hidden 32, mlp 64. At group 64 only fc2 (input 64) quantizes.
    out = convert(str(source(tmp_path)), tmp_path / "out", quantize=True, q_group_size=64, evaluate=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    layer = "model.vision_model.encoder.layers.0"
    assert q[f"{layer}.mlp.fc1"] is False and q[f"{layer}.self_attn.q_proj"] is False
    assert q[f"{layer}.mlp.fc2"] == {"group_size": 64, "bits": 4}
    assert q["model.vision_model.embeddings.position_embedding"] is False
    model = load_model(out)
    assert type(model.model.vision_model.encoder.layers[0].mlp.fc1) is nn.Linear
    assert isinstance(model.model.vision_model.encoder.layers[0].mlp.fc2, nn.QuantizedLinear)


def test_mixed_recipe_bits_per_part(tmp_path):
    out = convert(str(source(tmp_path)), tmp_path / "out", quantize=True, q_group_size=32,
                  recipe="mixed", evaluate=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.text_model.layers.1.mlp.down_proj"]["bits"] == 4
    for path in ("model.vision_model.encoder.layers.0.mlp.fc1", "model.connector.modality_projection.proj",
                 "model.text_model.embed_tokens", "lm_head"):
        assert q[path]["bits"] == 8, path
    assert q["language_model.layers.1.mlp.down_proj"]["bits"] == 4
    assert q["language_model.lm_head"]["bits"] == 8


def test_config_is_explicit_for_other_readers(tmp_path):
    out = convert(str(source(tmp_path, "tiny-smolvlm")), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    # transformers 5 writes rope_theta only under rope_parameters: mlx-vlm would default it.
    assert text["rope_theta"] == 100000.0
    # The tied head written out for mlx-vlm and mlx-swift-lm (convert/compat.py untie_head).
    assert text["tie_word_embeddings"] is cfg["tie_word_embeddings"] is False
    weights = mx.load(str(out / "model.safetensors"))
    assert mx.array_equal(weights["lm_head.weight"], weights["model.text_model.embed_tokens.weight"])
    for key in ("num_hidden_layers", "intermediate_size", "image_size", "patch_size", "num_attention_heads"):
        assert key in vision


def test_sharded_output_loads(tmp_path):
    out = convert(str(source(tmp_path)), tmp_path / "out", quantize=True, q_group_size=32,
                  evaluate=False, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(f.name for f in out.glob("*.safetensors"))
    assert not (out / "model.safetensors").exists()
    loaded = load_model(out)
    assert set(index["weight_map"]) == {k for k, _ in tree_flatten(loaded.parameters())}


def test_model_card_states_source_recipe_and_quality(tmp_path):
    out = convert(str(source(tmp_path)), tmp_path / "out", quantize=True, q_group_size=32, recipe="mixed")
    card = (out / "README.md").read_text()
    assert "`mixed`" in card and "4 bits, group size 32" in card and "next-token KL" in card
    assert "tiny-idefics3" in card and "top-1" in card


def test_quality_of_identical_models():
    model = load_model(FIXTURES / "tiny-idefics3")
    logits = all_logits(model, prompts(model.config))
    q = agreement(logits, logits)
    print(f"identical: KL {q['kl']:.2e}, top-1 {q['top1']}")
    assert q["kl"] < 1e-6 and q["top1"] == 1.0 and q["positions"] == 8 + 20


def test_quantized_model_stays_close(tmp_path):
    src = source(tmp_path)
    ref = load_model(src)
    out = convert(str(src), tmp_path / "out", quantize=True, q_bits=8, q_group_size=32)
    q = agreement(all_logits(ref, prompts(ref.config)), all_logits(load_model(out), prompts(ref.config)))
    print(f"8-bit group 32, all: KL {q['kl']:.2e} nats, top-1 {q['top1']:.3f}")
    assert q["kl"] < 1e-3 and q["top1"] > 0.95


# Bad input: a clear error and nothing at the output path.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quantize=True, q_bits=7), "--q-bits 7 is not supported"),
        (dict(quantize=True, q_group_size=48), "--q-group-size 48 is not supported"),
        (dict(quantize=True, recipe="vision"), "unknown recipe 'vision'"),
        (dict(q_bits=4), "need -q/--quantize"),
        (dict(dtype="float64"), "--dtype float64 is not supported"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ConvertError, match=message):
        convert(str(source(tmp_path)), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_not_a_smolvlm_checkpoint(tmp_path):
    src = source(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="llava")))
    with pytest.raises(CheckpointError, match="not a SmolVLM checkpoint"):
        convert(str(src), tmp_path / "out")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard(tmp_path):
    src = source(tmp_path)
    weights = mx.load(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    mx.save_safetensors(str(src / "model-00001-of-00002.safetensors"), {k: weights[k] for k in names[:5]})
    index = {"weight_map": {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(names)}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing weight shard.*model-00002-of-00002"):
        convert(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists.*--overwrite"):
        convert(str(src), out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(str(src), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, error):
    import mlx_smolvlm.convert.converter as converter

    def write_then_fail(folder, *args):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(converter, "copy_assets", write_then_fail)
    with pytest.raises(type(error)):
        convert(str(source(tmp_path)), tmp_path / "out", quantize=True, q_group_size=32)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    import mlx_smolvlm.convert.converter as converter

    src, out = source(tmp_path), tmp_path / "out"
    convert(str(src), out)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(converter, "write_json", lambda *a: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError):
        convert(str(src), out, quantize=True, q_group_size=32, overwrite=True, evaluate=False)
    assert (out / "model.safetensors").read_bytes() == before and leftovers(tmp_path) == []


def test_already_quantized_source(tmp_path):
    src = source(tmp_path)
    q4 = convert(str(src), tmp_path / "q4", quantize=True, q_group_size=32, evaluate=False)
    with pytest.raises(ConvertError, match="already quantized"):
        convert(str(q4), tmp_path / "again", quantize=True)
    # Re-saving a quantized folder (e.g. another dtype) keeps its quantization.
    again = convert(str(q4), tmp_path / "bf16", dtype="bfloat16")
    assert isinstance(load_model(again).lm_head, nn.QuantizedLinear)


def test_cli(tmp_path, capsys):
    src = source(tmp_path)
    main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "-q", "--q-group-size", "32",
          "--recipe", "mixed", "--no-eval"])
    assert isinstance(load_model(tmp_path / "out").lm_head, nn.QuantizedLinear)
    with pytest.raises(SystemExit) as e:
        main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: ") and "already exists" in err[-1]
    with pytest.raises(SystemExit) as e:
        main(["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o2")])
    assert e.value.code == 1 and "no such model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--hf-path", str(src), "-q", "--q-bits", "7"])
    assert e.value.code == 2 and "invalid choice: 7" in capsys.readouterr().err


def test_upload(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo, exist_ok):
            calls.append(("create", repo))

        def upload_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", Path(folder_path).name, repo_id))
            if repo_id == "me/fails":
                raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = convert(str(source(tmp_path)), tmp_path / "out", upload_repo="me/tiny-mlx")
    assert calls == [("create", "me/tiny-mlx"), ("upload", "out", "me/tiny-mlx")]
    assert "--model me/tiny-mlx" in (out / "README.md").read_text()
    with pytest.raises(ConvertError, match="converted to .*out2, but uploading to me/fails failed.*401"):
        convert(str(source(tmp_path, "tiny-smolvlm")), tmp_path / "out2", upload_repo="me/fails")


@pytest.mark.parametrize("preset, recipe", [("tiny-idefics3", None), ("tiny-idefics3", "mixed"),
                                            ("tiny-idefics3", "all"), ("tiny-smolvlm", None),
                                            ("tiny-smolvlm", "mixed")])
def test_mlx_vlm_loads_the_output_with_the_same_logits(tmp_path, preset, recipe):
    vlm_utils = pytest.importorskip("mlx_vlm.utils")
    # mlx-vlm's decoder always has an lm_head: tiny-smolvlm's tied head is written out for it.
    src = source(tmp_path, preset)
    quant = dict(quantize=True, q_group_size=32, recipe=recipe) if recipe else {}
    out = convert(str(src), tmp_path / "out", evaluate=False, **quant)
    ours, theirs = load_model(out), vlm_utils.load_model(out)
    if preset == "tiny-smolvlm" and recipe is None:  # the untied folder computes the tied source's logits
        ids = mx.array([[1, 5, 9, 30, 2, 77]])
        assert mx.array_equal(ours(ids), load_model(src)(ids))
    ids = mx.array([[1, 5, 9, 30, 2, 77] + [300] * 4 + [8, 4]])
    pixels = image_prompt(ours.config)["pixels"].transpose(0, 3, 1, 2)[None]  # (B, N, C, H, W)
    for args in [(ids, None), (ids, pixels)]:
        a = ours(*args)
        b = theirs(*args).logits
        diff = mx.abs(a - b).max().item()
        print(f"mlx-vlm vs ours, recipe {recipe}, image {args[1] is not None}: max |diff| {diff:.2e}")
        assert diff < 1e-4


def test_quality_prompts_use_the_checkpoint_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mlx_smolvlm.convert.quality import TEXTS, text_ids

    words = sorted({w for t in TEXTS for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = text_ids(tmp_path, vocab_size=512, length=10)
    assert ids == [tok.encode(t).ids[:10] for t in TEXTS] and 0 not in ids[0]
    # Without a tokenizer: fixed random ids below the vocab size.
    assert text_ids(None, 512) == text_ids(None, 512) and max(map(max, text_ids(None, 512))) < 512


def test_installed_inside_our_namespace(tmp_path):
    """`convert/` installs as mlx_smolvlm.convert: no top-level `convert` module in site-packages
    (it would collide with any other package or script of that name), and both entry points work
    from outside the repository."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    script = ("import importlib.util, mlx_smolvlm.convert as c; "
              "print(importlib.util.find_spec('convert') is None, c.__name__)")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout.split() == ["True", "mlx_smolvlm.convert"], r.stderr
    r = subprocess.run([sys.executable, "-m", "mlx_smolvlm.convert", "--help"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "python -m mlx_smolvlm.convert" in r.stdout
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["mlx-smolvlm-convert"] == "mlx_smolvlm.convert.__main__:main"
