"""Fine-tuning data and loop on small checkpoints: the assistant-token mask of each model
family's own chat template, inference-identical inputs (images and video), truncation that
never cuts an image, padding, bad rows, and `python -m mlx_smolvlm.lora` end to end
(YAML config, checkpoints, resume, test split, QLoRA on our and mlx-vlm's quantized folders,
Ctrl-C)."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conformance_presets import config_json, write_legacy_processor
from mlx.utils import tree_flatten
from PIL import Image

from mlx_smolvlm.loading import load_model
from mlx_smolvlm.processing import load_processor
from mlx_smolvlm.tuner.datasets import DatasetError, collate, load_split, row_messages
from mlx_smolvlm.tuner.samples import encode, fit_length
from mlx_smolvlm.tuner.layers import linear_to_lora_layers
from mlx_smolvlm.tuner.trainer import grad_checkpoint, loss_fn

VIDEO = Path(__file__).parent / "fixtures" / "video" / "media" / "short_24fps.mp4"
FAMILIES = {  # preset: what the template closes an assistant turn with
    "HuggingFaceTB/SmolVLM-256M-Instruct": "<end_of_utterance>",
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": "<end_of_utterance>",
    "ibm-granite/granite-docling-258M": "<|end_of_text|>",
}


def lora_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_smolvlm.lora", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("tuner_images")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (40, 30), "b.png": (24, 48)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
    (d / "corrupt.png").write_bytes(b"\x89PNG not really")
    return d


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """`family(name)`: a processor folder of that model family (its template and tokens)."""
    made = {}

    def get(name):
        if name not in made:
            d = tmp_path_factory.mktemp("family")
            write_legacy_processor(name, d)
            (d / "config.json").write_text(json.dumps(config_json(name)))
            made[name] = load_processor(d)
        return made[name]

    return get


def turns(*pairs, images=0):
    msgs = []
    for i, (q, a) in enumerate(pairs):
        parts = [{"type": "image"}] * (images if i == 0 else 0) + [{"type": "text", "text": q}]
        msgs += [{"role": "user", "content": parts}, {"role": "assistant", "content": a}]
    return msgs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mask_is_every_assistant_turn_of_the_models_template(name, family, images):
    processor, end = family(name), FAMILIES[name]
    row = {"images": ["a.png"], "messages": [{"role": "system", "content": "Be brief."},
                                             *turns(("What is it?", "Noise."), ("Sure?", "Yes, sure."), images=1)]}
    sample = encode(processor, row_messages(row, "row", images), do_image_splitting=False)
    ids, mask = sample.input_ids, sample.mask
    runs = np.split(ids[mask], np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    texts = [processor.tokenizer.decode(r.tolist()) for r in runs]
    print(name, texts)
    assert [t.strip() for t in texts] == [f"Noise.{end}", f"Yes, sure.{end}"]
    assert not mask[ids == processor.image_token_id].any()

    # the prompt part is token for token what inference builds for the same conversation
    msgs = row_messages(row, "row", images)
    first = processor(msgs[:2], do_image_splitting=False)
    n = first["input_ids"].shape[1]
    assert np.array_equal(ids[:n], first["input_ids"][0]) and not mask[:n].any()
    assert np.array_equal(sample.pixel_values, first["pixel_values"][0])


def test_video_sample_uses_the_inference_frames_and_prompt(family):
    processor = family("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    msgs = [{"role": "user", "content": [{"type": "video", "path": str(VIDEO)},
                                         {"type": "text", "text": "What happens?"}]},
            {"role": "assistant", "content": "A short clip."}]
    sample = encode(processor, row_messages({"messages": msgs}, "row", VIDEO.parent))
    prompt = processor(msgs[:1])
    n = prompt["input_ids"].shape[1]
    assert np.array_equal(sample.input_ids[:n], prompt["input_ids"][0])
    assert np.array_equal(sample.pixel_values, prompt["pixel_values"][0])
    assert processor.tokenizer.decode(sample.input_ids[sample.mask].tolist()) == " A short clip.<end_of_utterance>"


ROW_FORMATS = {
    "mlx-vlm": {"images": ["a.png"], "messages": [{"role": "user", "content": "Q?"},
                                                  {"role": "assistant", "content": "A."}]},
    "ours": {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                       {"type": "text", "text": "Q?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]},
    "cauldron": {"images": ["a.png"], "texts": [{"user": "Q?", "assistant": "A."}]},
}


def test_row_formats_give_the_same_sample(tiny_idefics3, images):
    processor = load_processor(tiny_idefics3)
    samples = [encode(processor, row_messages(r, k, images)) for k, r in ROW_FORMATS.items()]
    for s in samples[1:]:
        assert np.array_equal(s.input_ids, samples[0].input_ids) and np.array_equal(s.mask, samples[0].mask)
        assert np.array_equal(s.pixel_values, samples[0].pixel_values)


BAD = {
    "missing image": ({"images": ["nowhere.png"], "texts": [{"user": "Q", "assistant": "A"}]}, "nowhere.png"),
    "corrupt image": ({"images": ["corrupt.png"], "texts": [{"user": "Q", "assistant": "A"}]}, "corrupt.png"),
    "unknown role": ({"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]},
                     "unknown role 'robot'"),
    "no assistant": ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
    "more images than placeholders": (
        {"images": ["a.png", "b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"}]}, "2 image(s) but 1 image placeholder(s)"),
    "not JSON": ("{oops", "not valid JSON"),
    "messages not a list": ({"messages": 5}, "must be a list"),
    "part type not a string": ({"messages": [{"role": "user", "content": [{"type": ["image"]}]},
                                             {"role": "assistant", "content": "A"}]}, "unknown content part type"),
    "image bytes as text": ({"images": [{"bytes": "abc"}], "texts": [{"user": "Q", "assistant": "A"}]},
                            "expected a path, URL or PIL image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_row_is_one_line_naming_file_and_line(case, tiny_idefics3, images, tmp_path):
    row, expected = BAD[case]
    good = json.dumps(ROW_FORMATS["cauldron"])
    for f in ("a.png", "b.png", "corrupt.png"):
        shutil.copy(images / f, tmp_path / f)
    (tmp_path / "train.jsonl").write_text(f"{good}\n{row if isinstance(row, str) else json.dumps(row)}\n")
    with pytest.raises(DatasetError) as e:
        load_split(tmp_path, "train", load_processor(tiny_idefics3), 300)
    msg = str(e.value)
    print(msg)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}:2: ") and expected in msg and "\n" not in msg


def test_row_that_is_not_utf8_is_one_line(tiny_idefics3, tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b"\n\xff{}\n")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(tmp_path / 'train.jsonl'))}:2: not valid JSON"):
        load_split(tmp_path, "train", load_processor(tiny_idefics3), 300)


def test_bad_row_through_the_cli_has_no_traceback(tiny_idefics3, images, tmp_path):
    shutil.copy(images / "a.png", tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(json.dumps(BAD["unknown role"][0]) + "\n")
    r = lora_cli("--model", tiny_idefics3, "--train", "--data", tmp_path, "--iters", 1)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'train.jsonl'}:1: unknown role")


def test_truncation_never_cuts_an_image(tiny_idefics3, images):
    processor = load_processor(tiny_idefics3)
    long_answer = "word " * 40
    after = encode(processor, row_messages({"images": ["a.png"], "texts": [
        {"user": "Q?", "assistant": long_answer}]}, "r", images))
    before = encode(processor, row_messages({"images": ["a.png"], "messages": [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
        {"role": "user", "content": [{"type": "text", "text": long_answer}, {"type": "image"}]},
        {"role": "assistant", "content": "B."}]}, "r", images))
    last_image = np.flatnonzero(after.input_ids == processor.image_token_id)[-1]
    n = np.flatnonzero(after.mask)[0] + 3  # three answer tokens left
    cut = fit_length(after, n, processor.image_token_id)
    assert len(cut) == n < len(after) and np.array_equal(cut.input_ids, after.input_ids[:n])
    assert cut.mask[1:].sum() == 3 and cut.pixel_values is after.pixel_values
    # the image would lose its closing marker, or no assistant token would be left: dropped
    assert fit_length(after, last_image + 1, processor.image_token_id) is None
    assert fit_length(after, np.flatnonzero(after.mask)[0], processor.image_token_id) is None
    # a cut inside a later image drops the row even though an earlier answer would fit
    image = np.flatnonzero(before.input_ids == processor.image_token_id)
    assert before.mask[: image[0]].any()
    assert fit_length(before, image[-1], processor.image_token_id) is None
    assert fit_length(after, None, processor.image_token_id) is after


def test_padded_batch_loss_is_the_token_weighted_mean(tiny_idefics3, images):
    """Rows of 0, 1 and 2 images and different lengths: padding changes nothing."""
    processor, model = load_processor(tiny_idefics3), load_model(tiny_idefics3)
    rows = [{"texts": [{"user": "Just text, quite a long question here?", "assistant": "Answer."}]},
            ROW_FORMATS["cauldron"],
            {"images": ["a.png", "b.png"], "texts": [{"user": "Two?", "assistant": "Both noisy."},
                                                     {"user": "More?", "assistant": "No."}]}]
    samples = [encode(processor, row_messages(r, "r", images)) for r in rows]
    batch = collate(samples)
    assert [p.shape for p, _ in batch.media] == [s.pixel_values.shape for s in samples[1:]]
    loss, n = loss_fn(model, batch)
    parts = [loss_fn(model, collate([s])) for s in samples]
    want = sum(l.item() * k.item() for l, k in parts) / sum(k.item() for _, k in parts)
    print(f"batch loss {loss.item():.6f}, token-weighted mean of rows {want:.6f}")
    assert n.item() == sum(k.item() for _, k in parts) and abs(loss.item() - want) < 1e-5 * want


def test_grad_checkpoint_gives_the_same_gradients(tiny_idefics3, images):
    processor, model = load_processor(tiny_idefics3), load_model(tiny_idefics3)
    batch = collate([encode(processor, row_messages(ROW_FORMATS["cauldron"], "r", images))])
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "alpha": 8, "train_vision": True, "train_connector": True})
    for p, v in tree_flatten(model.trainable_parameters()):  # B != 0 so every gradient is non-zero
        if p.endswith("lora_b"):
            model.load_weights([(p, mx.random.normal(v.shape) * 0.1)], strict=False)
    _, plain = nn.value_and_grad(model, loss_fn)(model, batch)
    grad_checkpoint(model.layers)
    _, checkpointed = nn.value_and_grad(model, loss_fn)(model, batch)
    a, b = dict(tree_flatten(plain)), dict(tree_flatten(checkpointed))
    assert a.keys() == b.keys() and all(mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-7).item() for k in a)
    assert type(model.layers[0]).__name__.startswith("Checkpointed")


@pytest.fixture(scope="module")
def data(images, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    shutil.copy(images / "a.png", d / "a.png")
    shutil.copy(images / "b.png", d / "b.png")
    rows = [ROW_FORMATS["cauldron"], ROW_FORMATS["mlx-vlm"],
            {"images": ["b.png"], "texts": [{"user": "Other?", "assistant": "Yes, the other."}]}]
    for split in ("train", "valid", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_cli_yaml_checkpoints_resume_and_test(tiny_idefics3, data, tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"model: {tiny_idefics3}\ndata: {data}\nbatch_size: 2\nlearning_rate: 0.01\nsteps_per_report: 2\n"
        "steps_per_eval: 4\nsave_every: 2\nfine_tune_type: dora\nlora_parameters:\n  rank: 4\n  alpha: 8\n")
    out = tmp_path / "ad"
    r = lora_cli("-c", tmp_path / "c.yaml", "--train", "--iters", 4, "--adapter-path", out, "--lora-rank", 2,
                 "--train-vision")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["train_vision"] is True
    assert cfg["lora_parameters"]["rank"] == 2 and cfg["lora_parameters"]["scale"] == 4.0  # CLI over YAML
    weights = mx.load(str(out / "adapters.safetensors"))
    assert any(k.startswith("model.vision_model.") and k.endswith(".m") for k in weights)
    assert r.stdout.count("saved adapter weights") == 2 and "Iter 4: val loss" in r.stdout
    assert (out / "0000002_adapters.safetensors").is_file()  # numbered checkpoint, as mlx-lm's
    assert not (out / "0000004_adapters.safetensors").exists()
    losses = [float(ln.split("train loss ")[1].split(",")[0]) for ln in r.stdout.splitlines() if "train loss" in ln]
    assert losses[-1] < losses[0]

    r = lora_cli("-c", tmp_path / "c.yaml", "--train", "--iters", 1, "--adapter-path", tmp_path / "ad2",
                 "--lora-rank", 2, "--train-vision", "--resume-adapter-file", out / "adapters.safetensors",
                 "--test", "--steps-per-eval", 100)
    assert r.returncode == 0, r.stderr
    val = [float(ln.split("val loss ")[1].split(",")[0]) for ln in r.stdout.splitlines() if "val loss" in ln]
    first = [ln for ln in r.stdout.splitlines() if "val loss" in ln][0]
    assert first.startswith("Iter 0:") and val[0] < 6.0 and "Test loss" in r.stdout  # starts trained

    # --test alone rebuilds the adapter from its own config (rank 2, DoRA, vision), not the flags
    r = lora_cli("--model", tiny_idefics3, "--data", data, "--test", "--adapter-path", out, "--lora-rank", 8)
    assert r.returncode == 0, r.stderr
    test_loss = float(r.stdout.split("Test loss ")[1].split(",")[0])
    # the same adapter the resumed run started from, on the same rows (valid = test here)
    assert abs(test_loss - val[0]) <= 1e-3 and "Trainable" not in r.stdout


@pytest.fixture(scope="module")
def quantized(tiny_idefics3, tmp_path_factory):
    """The tiny checkpoint at 4 bits through our converter and through mlx-vlm's."""
    from make_mlx_vlm_folder import mlx_vlm_convert, write_source

    from mlx_smolvlm.convert.converter import convert

    root = tmp_path_factory.mktemp("quantized")
    ours = convert(str(tiny_idefics3), root / "ours", quantize=True, q_bits=4, q_group_size=32, evaluate=False)
    theirs = mlx_vlm_convert(write_source("tiny-idefics3", root / "src"), root / "mlx_vlm", 4, 32)
    return {"ours": Path(ours), "mlx-vlm": theirs}


@pytest.mark.parametrize("layout", ["ours", "mlx-vlm"])
def test_qlora_trains_on_a_quantized_folder(layout, quantized, data, tmp_path):
    folder = quantized[layout]
    r = lora_cli("--model", folder, "--train", "--data", data, "--iters", 6, "--batch-size", 3,
                 "--learning-rate", 0.02, "--steps-per-report", 3, "--adapter-path", tmp_path / "ad",
                 "--lora-rank", 4, "--num-layers", -1)
    assert r.returncode == 0, r.stderr
    losses = [float(ln.split("train loss ")[1].split(",")[0]) for ln in r.stdout.splitlines() if "train loss" in ln]
    print(layout, r.stdout)
    assert losses[-1] < losses[0]
    model = load_model(folder)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 20.0})
    model.load_weights(str(tmp_path / "ad" / "adapters.safetensors"), strict=False)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)


def test_ctrl_c_keeps_the_last_saved_adapter(tiny_idefics3, data, tmp_path):
    out = tmp_path / "ad"
    cmd = [sys.executable, "-m", "mlx_smolvlm.lora", "--model", str(tiny_idefics3), "--train", "--data",
           str(data), "--iters", "100000", "--save-every", "1", "--steps-per-report", "1", "--adapter-path", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        saved = 0
        for line in proc.stdout:  # bounded: the run saves every step
            saved += "saved adapter weights" in line
            if saved == 3:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    weights = mx.load(str(out / "adapters.safetensors"))  # whole, loadable
    assert weights and not list(out.glob(".*tmp*"))


TUNING = Path(__file__).parent / "fixtures" / "tuning"  # written by `datasets` itself (scripts/)


@pytest.mark.parametrize("data", ["cauldron_disk", "parquet"])
def test_datasets_folder_and_parquet(data, tiny_idefics3):
    """The Cauldron's columns in a save_to_disk DatasetDict and in parquet (images as PNG
    bytes) give the samples the same rows give from PIL images."""
    from make_tuning_fixtures import HF_ROWS

    processor = load_processor(tiny_idefics3)
    ds = load_split(TUNING / data, "train", processor, 300)
    val = load_split(TUNING / data, "valid", processor, 300)
    assert len(ds) == len(HF_ROWS) and (val is None) == (data == "parquet")
    for sample, (rgb, pairs) in zip(ds.samples, HF_ROWS):
        row = {"images": [Image.new("RGB", (12, 8), rgb)],
               "texts": [{"user": u, "assistant": a} for u, a in pairs]}
        want = encode(processor, row_messages(row, "r", TUNING))
        assert np.array_equal(sample.input_ids, want.input_ids) and np.array_equal(sample.mask, want.mask)
        assert np.array_equal(sample.pixel_values, want.pixel_values)


def test_a_single_dataset_folder_is_the_train_split(tiny_idefics3):
    """`--data` naming one `Dataset.save_to_disk` folder (a DatasetDict's split, as `datasets`
    wrote it) gives that folder's rows as the train split, and no other split."""
    processor = load_processor(tiny_idefics3)
    one = load_split(TUNING / "cauldron_disk" / "train", "train", processor, 300)
    whole = load_split(TUNING / "cauldron_disk", "train", processor, 300)
    assert load_split(TUNING / "cauldron_disk" / "train", "valid", processor, 300) is None
    assert len(one) == len(whole) > 0
    for a, b in zip(one.samples, whole.samples):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.pixel_values, b.pixel_values)


@pytest.mark.parametrize("meta,expected", [
    ({"dataset_dict.json": "{}"}, "no 'splits' list"),
    ({"state.json": "[1]"}, "no '_data_files' list"),
    ({"state.json": '{"_data_files": [{"filename": "../train.arrow"}]}'}, "not a file name in the folder"),
])
def test_bad_datasets_folder_is_one_line(meta, expected, tmp_path):
    pytest.importorskip("pyarrow")
    for name, text in meta.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=expected):
        list(load_split(tmp_path, "train", None, 300) or [])


def test_full_fine_tune_and_lr_schedule(tiny_idefics3, data, tmp_path):
    (tmp_path / "c.yaml").write_text("lr_schedule:\n  name: cosine_decay\n  warmup: 2\n  arguments: [0.01, 4]\n")
    out = tmp_path / "full"
    r = lora_cli("--model", tiny_idefics3, "--train", "--data", data, "--iters", 4, "--fine-tune-type", "full",
                 "--num-layers", 1, "--learning-rate", 0.01, "--steps-per-report", 1, "--adapter-path", out,
                 "-c", tmp_path / "c.yaml")
    assert r.returncode == 0, r.stderr
    lrs = [float(ln.split("lr ")[1].split(",")[0]) for ln in r.stdout.splitlines() if "train loss" in ln]
    print(r.stdout)
    # the rate each step used: linear warmup from 0 over 2 steps, then cosine from 0.01 over 4
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.01 * (1 + np.cos(np.pi / 4)) / 2], rel=1e-3)  # printed to 4 digits
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(k.startswith("model.text_model.layers.1.") for k in weights)  # the last layer only
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "full"


def test_grad_accumulation_averages_the_micro_batches(tiny_idefics3, images):
    """One step of 2 accumulated batches of 1 = SGD on the mean of the two rows' gradients."""
    import mlx.optimizers as optim

    from mlx_smolvlm.tuner.trainer import TrainingArgs, train

    processor, model = load_processor(tiny_idefics3), load_model(tiny_idefics3)
    samples = [encode(processor, row_messages(r, "r", images)) for r in ROW_FORMATS.values()][1:]
    samples[1] = encode(processor, row_messages({"texts": [{"user": "Text?", "assistant": "Only text."}]},
                                                "r", images))
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "alpha": 8})
    before = dict(tree_flatten(model.trainable_parameters()))
    grads = [dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, collate([s]))[1])) for s in samples]
    args = TrainingArgs(batch_size=1, iters=1, grad_accumulation_steps=2, steps_per_eval=100)
    train(model, optim.SGD(0.1), samples, args=args, report=lambda line: None)
    after = dict(tree_flatten(model.trainable_parameters()))
    for k in before:
        want = before[k] - 0.1 * (grads[0][k] + grads[1][k]) / 2
        assert mx.allclose(after[k], want, rtol=1e-5, atol=1e-7).item(), k


def test_pixels_past_the_cache_budget_are_read_again(tiny_idefics3, data):
    from mlx_smolvlm.tuner.datasets import ChatDataset, split_rows

    processor = load_processor(tiny_idefics3)
    held = load_split(data, "train", processor, 300)
    lean = ChatDataset(split_rows(data, "train"), processor, 300, cache_bytes=0)
    assert all(s.pixel_values is None for s in lean.samples)
    for i in range(len(held)):
        a, b = held[i], lean[i]
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.pixel_values, b.pixel_values)


def test_frozen_vision_features_are_computed_once_per_sample(tiny_idefics3, data):
    """LoRA on the decoder only: the vision tower runs once per sample over the whole run,
    and the loss from cached features equals the loss from pixels."""
    import mlx.optimizers as optim

    from mlx_smolvlm.tuner.trainer import TrainingArgs, frozen_vision, train

    processor, model = load_processor(tiny_idefics3), load_model(tiny_idefics3)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "alpha": 8})
    assert frozen_vision(model)
    ds = load_split(data, "train", processor, 300)
    from_pixels = loss_fn(model, collate([ds[i] for i in range(len(ds))]))[0].item()
    calls = []
    encode_images = model.encode_images
    model.encode_images = lambda *a: calls.append(1) or encode_images(*a)
    train(model, optim.SGD(0.0), ds, args=TrainingArgs(batch_size=2, iters=6, steps_per_eval=100),
          report=lambda line: None)
    assert len(calls) == len(ds) and all(s.features is not None and s.pixel_values is None for s in ds.samples)
    from_features = loss_fn(model, collate([ds[i] for i in range(len(ds))]))[0].item()
    assert abs(from_features - from_pixels) < 1e-6 * from_pixels

    model = load_model(tiny_idefics3)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "alpha": 8, "train_connector": True})
    assert not frozen_vision(model)


def test_video_and_image_rows_share_a_batch(tmp_path_factory, images):
    """A SmolVLM2 batch of a video row (24-px frames, 4 tokens each) and an image row (36-px
    tiles, 9 tokens each): each row's images are encoded at its own size, so the batch loss is
    the token-weighted mean of the rows' losses (padding frames to the tiles' size would give
    the video 9 feature rows per frame for its 4 tokens)."""
    from make_generate_golden import tiny_folder

    folder = tiny_folder("tiny-smolvlm", tmp_path_factory.mktemp("tiny-smolvlm"))
    processor, model = load_processor(folder), load_model(folder)
    video = {"messages": [{"role": "user", "content": [{"type": "video", "path": VIDEO.name},
                                                       {"type": "text", "text": "What?"}]},
                          {"role": "assistant", "content": "A clip."}]}
    rows = [encode(processor, row_messages(video, "v", VIDEO.parent), frame_size=24),
            encode(processor, row_messages(ROW_FORMATS["cauldron"], "i", images))]
    assert rows[0].pixel_values.shape[-1] == 24 and rows[1].pixel_values.shape[-1] == 36
    loss, n = loss_fn(model, collate(rows))
    parts = [loss_fn(model, collate([r])) for r in rows]
    want = sum(p.item() * k.item() for p, k in parts) / sum(k.item() for _, k in parts)
    assert abs(loss.item() - want) < 1e-5 * want
