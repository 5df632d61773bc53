"""Folders written by mlx-vlm's own converter load here and decode as mlx-vlm decodes them.

Sources are make_checkpoint.py presets at real widths with 1 layer per tower;
scripts/make_mlx_vlm_folder.py runs `mlx_vlm.convert` on them in the test. The 2.2B geometry
(384-px tiles of 14-px patches, scale 3; a 1.2 GB float32 source even at 1 layer) is opt-in:
MLX_SMOLVLM_SLOW=1.
"""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_same_greedy
from PIL import Image

from mlx_smolvlm import vlm_compat
from mlx_smolvlm.errors import CheckpointError, InvalidRequestError
from mlx_smolvlm.generate import main as cli
from mlx_smolvlm.loading import dequantize_model, load_model, load_safetensors

pytest.importorskip("mlx_vlm")
pytest.importorskip("torch")
from make_mlx_vlm_folder import mlx_vlm_convert, write_source  # noqa: E402
from make_tokenizer import write_processor_for_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = "Convert this page to docling."
N_TOKENS = 8
SLOW = pytest.mark.skipif(not os.environ.get("MLX_SMOLVLM_SLOW"), reason="opt in with MLX_SMOLVLM_SLOW=1")
CELLS = [
    ("smolvlm-256m", None),
    ("smolvlm-256m", 4),
    ("granite-docling-258m", 4),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made = {}

    def get(preset):
        if preset not in made:
            made[preset] = write_source(preset, tmp_path_factory.mktemp(preset))
        return made[preset]

    return get


@pytest.fixture(scope="module")
def folders(sources, tmp_path_factory):
    made = {}

    def get(preset, bits):
        if (preset, bits) not in made:
            dest = tmp_path_factory.mktemp("mlx-vlm") / f"{preset}-{bits or 'float'}"
            made[preset, bits] = mlx_vlm_convert(sources(preset), dest, bits)
        return made[preset, bits]

    return get


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A 512x384 'page': smooth bands and noise (one tile once resized)."""
    y, x = np.mgrid[0:384, 0:512] / 64
    rng = np.random.default_rng(0)
    rgb = np.stack([np.sin(x + c) * np.cos(y - c) for c in range(3)], -1) * 100 + 128
    rgb += rng.uniform(-20, 20, rgb.shape)
    path = tmp_path_factory.mktemp("page") / "page.png"
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path)
    return path


# mlx-vlm and we run the same weights through MLX with other op orders (and its own casts): a
# log-prob moves by up to this between the two (checked below on every compared step), and
# greedy tokens are compared over the steps whose margin is wider than twice it.
MLX_VLM_MOVE = 1e-3


def mlx_vlm_tokens(folder: Path, image: Path, eos: set) -> tuple[list, list]:
    import mlx_vlm
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = mlx_vlm.load(str(folder))
    prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
    tokens, logprobs = [], []
    for r in mlx_vlm.stream_generate(model, processor, prompt, [str(image)], max_tokens=N_TOKENS,
                                     temperature=0.0):
        if r.token in eos or len(tokens) == N_TOKENS:  # it may yield one past max_tokens
            break
        tokens.append(r.token)
        logprobs.append(np.array(mx.array(r.logprobs).astype(mx.float32)).reshape(-1))
    return tokens, logprobs


@pytest.mark.parametrize("preset, bits", CELLS)
def test_cli_decodes_mlx_vlm_folders_as_mlx_vlm_does(folders, page, capsys, preset, bits):
    folder = folders(preset, bits)
    model, processor = vlm_compat.load(folder)
    eos = set(processor.tokenizer.eos_token_ids)
    theirs, their_logprobs = mlx_vlm_tokens(folder, page, eos)

    # The docling-style API: same prompt format, special tokens kept.
    prompt = vlm_compat.apply_chat_template(processor, vlm_compat.load_config(folder), PROMPT, num_images=1)
    rs = [r for r in vlm_compat.stream_generate(model, processor, prompt, [str(page)], max_tokens=N_TOKENS,
                                                temp=0.0) if r.token not in eos]
    ours, logprobs = [r.token for r in rs], [np.array(r.logprobs) for r in rs]
    print(f"{preset} {bits or 'float'}: mlx-vlm {theirs}, ours {ours}")
    common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))) + 1
    move = max(np.abs(a - b).max() for a, b in zip(logprobs[:common], their_logprobs[:common]))
    print(f"log-probs vs mlx-vlm over {common} steps: max |diff| {move:.2e} (stated {MLX_VLM_MOVE})")
    assert move <= MLX_VLM_MOVE
    n = assert_same_greedy(ours, logprobs, theirs, MLX_VLM_MOVE, at_least=4, what=f"{preset} {bits} vs mlx-vlm")

    # The CLI on the same folder prints the same tokens' text.
    capsys.readouterr()
    assert cli(["--model", str(folder), "--image", str(page), "--prompt", PROMPT,
                "--max-tokens", str(N_TOKENS), "--keep-special-tokens"]) == 0
    printed = capsys.readouterr().out
    if n == len(theirs):
        assert printed == processor.tokenizer.decode(theirs, skip_special_tokens=False) + "\n"
    else:
        assert printed.startswith(processor.tokenizer.decode(theirs[: n - 1], skip_special_tokens=False))


def test_quantized_matches_its_dequantized_twin(folders, page):
    """mlx-vlm 4-bit folder: our quantized logits vs the same weights dequantized to float32."""
    folder = folders("smolvlm-256m", 4)
    model, processor = vlm_compat.load(folder)
    inputs = processor(vlm_compat.apply_chat_template(processor, None, PROMPT, num_images=1), images=[str(page)])
    args = [mx.array(inputs[k]) for k in ("input_ids", "pixel_values", "pixel_attention_mask")]
    quantized = model(*args)
    reference = dequantize_model(model)(*args)
    diff = mx.abs(quantized - reference).max().item()
    scale = mx.abs(reference).max().item()
    print(f"4-bit vs dequantized float32: max |diff| {diff:.2e}, max |logit| {scale:.1f} (tol 1e-4 x max)")
    assert diff <= 1e-4 * scale


@pytest.mark.slow
@SLOW
def test_2_2b_geometry_mlx_vlm_folders_match_transformers(sources, folders, page, capsys):
    """384-px tiles of 14-px patches, scale 3. mlx-vlm's own forward is off here (max |diff|
    0.68 on float32 logits against transformers, 0.73 against our 4-bit), so its greedy tokens
    are no reference: the float folder must give transformers' logits, the 4-bit folder its
    dequantized twin's, and the CLI must run on both."""
    import torch
    from transformers import AutoModelForImageTextToText

    src = sources("smolvlm-2.2b")
    reference = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    for bits in (None, 4):
        folder = folders("smolvlm-2.2b", bits)
        model, processor = vlm_compat.load(folder)
        inputs = processor(vlm_compat.apply_chat_template(processor, None, PROMPT, num_images=1), images=[str(page)])
        ours = model(*[mx.array(inputs[k]) for k in ("input_ids", "pixel_values", "pixel_attention_mask")])
        if bits is None:
            with torch.no_grad():
                ref = reference(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
        else:
            ref = np.array(dequantize_model(model)(*[mx.array(inputs[k]) for k in (
                "input_ids", "pixel_values", "pixel_attention_mask")]))
        diff = np.abs(np.array(ours) - ref).max()
        print(f"2.2B {bits or 'float'} mlx-vlm folder: max |diff| {diff:.2e} against "
              f"{'transformers' if bits is None else 'dequantized'} (tol 1e-4)")
        assert diff < 1e-4
        assert cli(["--model", str(folder), "--image", str(page), "--prompt", PROMPT, "--max-tokens", "4"]) == 0


def test_doctags_survive_streaming_and_stop_strings(folders):
    """A scripted DocTags answer (forced through a logits processor) streams with its
    special tokens, and the stop string `</doctag>` ends it."""
    model, processor = vlm_compat.load(folders("granite-docling-258m", 4))
    tok = processor.tokenizer
    answer = "<doctag><text><loc_12><loc_40><loc_300><loc_64>Hello page</text></doctag><picture>"
    script = tok.encode(answer)
    assert tok.convert_ids_to_tokens(script[:3]) == ["<doctag>", "<text>", "<loc_12>"]

    def force(tokens, logits):
        n = tokens.size - n_prompt
        return mx.where(mx.arange(logits.shape[-1]) == script[min(n, len(script) - 1)], 0.0, -1e9)[None]

    prompt = vlm_compat.apply_chat_template(processor, None, PROMPT)  # text only: quicker
    n_prompt = processor(prompt)["input_ids"].shape[1]
    chunks = [(r.text, r.finish_reason) for r in vlm_compat.stream_generate(
        model, processor, prompt, max_tokens=len(script) + 4, logits_processors=[force],
        stop=["</doctag>"])]
    text = "".join(t for t, _ in chunks)
    assert text == "<doctag><text><loc_12><loc_40><loc_300><loc_64>Hello page</text>"
    assert chunks[-1][1] == "stop"
    # Without a stop string each tag is one response's whole text (older docling tests
    # `"</doctag>" in r.text`), and the text runs on past it.
    texts = [r.text for r in vlm_compat.stream_generate(
        model, processor, prompt, max_tokens=len(script), logits_processors=[force])]
    assert "</doctag>" in texts and "".join(texts) == answer
    # Skipping special tokens drops the named ones only (bos/eos/unk/pad, additional and extra
    # special tokens): DocTags, added tokens flagged special but not named, stay.
    skipped = "".join(r.text for r in vlm_compat.stream_generate(
        model, processor, prompt, max_tokens=len(script), logits_processors=[force],
        skip_special_tokens=True))
    assert skipped == answer


def test_max_tokens_8192_is_clipped_to_the_context_for_docling(folders):
    model, processor = vlm_compat.load(folders("granite-docling-258m", 4))
    assert model.config.text_config.max_position_embeddings == 8192
    prompt = vlm_compat.apply_chat_template(processor, None, PROMPT)
    model.config.text_config.max_position_embeddings = 40  # a short context, so the test is quick
    rs = list(vlm_compat.stream_generate(model, processor, prompt, max_tokens=8192,
                                         logits_processors=[lambda t, x: x.at[:, 5].add(1e4)]))
    assert rs[-1].finish_reason == "length" and rs[-1].prompt_tokens + len(rs) == 40
    from mlx_smolvlm.generate import stream_generate

    with pytest.raises(InvalidRequestError, match="beyond the model's context length of 40"):
        next(stream_generate(model, processor, prompt, max_tokens=8192))


# Small folders for layout and bad-input checks: the tiny fixture through mlx-vlm.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiny") / "src"
    shutil.copytree(FIXTURES / "tiny-idefics3", src, ignore=shutil.ignore_patterns("golden.npz"))
    write_processor_for_model(src, json.loads((src / "config.json").read_text()))
    out = src.parent
    return src, mlx_vlm_convert(src, out / "float"), mlx_vlm_convert(src, out / "q4", 4, 32)


def copy(folder: Path, dest: Path, **config) -> Path:
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def test_sanitize_maps_mlx_vlm_keys_and_is_idempotent(tiny):
    src, float_folder, q4 = tiny
    for folder in (float_folder, q4):
        model = load_model(src, lazy=True)
        raw = load_safetensors(folder)
        assert any(k.startswith("language_model.lm_head") for k in raw)
        once = model.sanitize(raw)
        twice = model.sanitize(once)
        assert once.keys() == twice.keys() and all(mx.array_equal(once[k], twice[k]) for k in once)
        assert all(k.startswith(("model.", "lm_head.")) for k in once)
    ours, theirs = load_model(src), load_model(float_folder)
    ids = mx.array([[1, 5, 9, 30, 2, 77, 4, 8]])
    assert mx.array_equal(ours(ids), theirs(ids))


def test_converter_requantizes_an_mlx_vlm_folder(tiny, tmp_path):
    import mlx.nn as nn
    import mlx_vlm.utils

    from mlx_smolvlm.convert import convert

    _, float_folder, q4 = tiny
    out = convert(str(float_folder), tmp_path / "ours-q8", quantize=True, q_bits=8, q_group_size=32,
                  evaluate=False)
    assert isinstance(load_model(out).lm_head, nn.QuantizedLinear)
    ids = mx.array([[1, 5, 9, 30, 2, 77, 4, 8]])
    diff = mx.abs(load_model(out)(ids) - mlx_vlm.utils.load_model(out)(ids, None).logits).max().item()
    assert diff < 1e-4
    # A quantized mlx-vlm folder re-saves (another dtype) and keeps its quantization.
    again = load_model(convert(str(q4), tmp_path / "bf16", dtype="bfloat16"))
    assert isinstance(again.model.text_model.embed_tokens, nn.QuantizedEmbedding)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(text_config="layers"), r"does not fit the model config; unexpected \d+: model\.text_model\.layers\.1\."),
        (dict(quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"}), "mode 'mxfp4'"),
        (dict(quantization={"group_size": 32, "bits": 4, "mode": "affine",
                            "language_model.layers.0.mlp.up_proj": {"group_size": 64, "bits": 4, "mode": "nvfp4"}}),
         "quantization of layer model.text_model.layers.0.mlp.up_proj: mode 'nvfp4'"),
        (dict(quantization={"group_size": 32, "bits": 4,
                            "language_model.layers.0.mlp.down_proj": {"group_size": 128, "bits": 4}}),
         "layer model.text_model.layers.0.mlp.down_proj: group_size 128 .4 bits. does not divide its input width 96"),
        (dict(quantization=None, quantization_config={"quant_method": "fp8"}), "method 'fp8' is not MLX"),
    ],
)
def test_bad_mlx_vlm_folders_fail_in_one_line(tiny, tmp_path, change, message):
    _, _, q4 = tiny
    if change.get("text_config") == "layers":
        text = json.loads((q4 / "config.json").read_text())["text_config"]
        change = dict(text_config={**text, "num_hidden_layers": 1})
    folder = copy(q4, tmp_path / "bad", **change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_mixed_layouts_are_refused(tiny, tmp_path):
    src, float_folder, _ = tiny
    folder = copy(float_folder, tmp_path / "mixed")
    w = mx.load(str(folder / "model.safetensors"))
    w["model.text_model.norm.weight"] = w.pop("language_model.norm.weight")
    mx.save_safetensors(str(folder / "model.safetensors"), w)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="mix the transformers layout .* and the mlx-vlm layout"):
        load_model(folder)


def test_legacy_quantization_entries(tiny, tmp_path):
    """Folders from older converters: `quantization_config` only, no `mode`, and per-layer
    entries under mlx-vlm paths (a float layer written as false)."""
    import mlx.nn as nn

    _, _, q4 = tiny
    old = copy(q4, tmp_path / "old", quantization=None,
               quantization_config={"group_size": 32, "bits": 4, "language_model.layers.1.mlp.up_proj": False})
    w = mx.load(str(old / "model.safetensors"))
    up = "language_model.layers.1.mlp.up_proj"
    w[f"{up}.weight"] = mx.dequantize(w.pop(f"{up}.weight"), w.pop(f"{up}.scales"), w.pop(f"{up}.biases"), 32, 4)
    mx.save_safetensors(str(old / "model.safetensors"), w)
    (old / "model.safetensors.index.json").unlink()
    model = load_model(old)
    assert type(model.model.text_model.layers[1].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.text_model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    ids = mx.array([[1, 5, 9, 30, 2, 77, 4, 8]])
    assert mx.allclose(model(ids), load_model(q4)(ids), atol=1e-4)
