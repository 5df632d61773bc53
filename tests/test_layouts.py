"""Processor folder layouts: the Hub's legacy one and transformers 5's save_pretrained one
(written by transformers itself) load to the same processor; an unknown layout is one line.
No model runs here; tests/test_conformance.py runs the models."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mlx_smolvlm.processing import load_processor
from mlx_smolvlm.processor_config import ProcessorConfigError, read_processor_settings

VIDEO = {"fps": 2, "max_frames": 8, "video_size": {"longest_edge": 512}}


@pytest.fixture(scope="module")
def layouts(processor_folder, tmp_path_factory):
    pytest.importorskip("transformers")
    from conformance_presets import reference_processor

    legacy = processor_folder(layout="smolvlm2", video_sampling=VIDEO,
                              template_file="chat_template.json")
    v5 = tmp_path_factory.mktemp("v5")
    reference_processor(legacy, "smolvlm").save_pretrained(v5)
    return legacy, v5


def test_transformers5_layout_is_what_we_expect(layouts):
    _, v5 = layouts
    names = sorted(p.name for p in v5.iterdir())
    assert names == ["chat_template.jinja", "processor_config.json", "tokenizer.json",
                     "tokenizer_config.json"]
    config = json.loads((v5 / "processor_config.json").read_text())
    assert {"image_processor", "video_processor", "image_seq_len"} <= set(config)
    assert isinstance(json.loads((v5 / "tokenizer_config.json").read_text())["extra_special_tokens"], list)
    assert read_processor_settings(v5).layout == "transformers5"


def test_both_layouts_load_the_same_processor(layouts):
    a, b = (load_processor(f) for f in layouts)
    assert read_processor_settings(layouts[0]).layout == "legacy"
    assert vars(a.image_processor) == vars(b.image_processor)
    assert vars(a.video_options) == vars(b.video_options)
    assert (a.video_options.fps, a.video_options.max_frames) == (2, 8)
    assert a.image_seq_len == b.image_seq_len == 64
    assert a.image_tokens == b.image_tokens and a.tokenizer.eos_token_ids == b.tokenizer.eos_token_ids
    assert a.tokenizer.chat_template == b.tokenizer.chat_template
    image = Image.new("RGB", (30, 20), (200, 10, 90))
    for content in ([{"type": "text", "text": "Hi there."}],
                    [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]):
        messages = [{"role": "user", "content": content}]
        x, y = a(messages), b(messages)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_video_processor_nested_settings_win(layouts, tmp_path):
    folder = tmp_path / "v5"
    shutil.copytree(layouts[1], folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["video_processor"]["video_sampling"] = {"fps": 3, "max_frames": 5,
                                                   "video_size": {"longest_edge": 256}}
    config["video_processor"]["size"] = {"longest_edge": 1024}
    (folder / "processor_config.json").write_text(json.dumps(config))
    o = load_processor(folder).video_options
    # as SmolVLMVideoProcessor.__init__: video_sampling's fps and max_frames, `size` over video_size
    assert (o.fps, o.max_frames, o.longest_edge) == (3, 5, 1024)


@pytest.mark.parametrize("files", [
    {"processor_config.json": {"processor_class": "SmolVLMProcessor"}},
    {"config.json": {"model_type": "smolvlm", "vision_config": {}}},
])
def test_unknown_layout_is_one_line(layouts, tmp_path, files):
    shutil.copy(layouts[0] / "tokenizer.json", tmp_path)
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(ProcessorConfigError) as e:
        load_processor(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "found" in message and "expected preprocessor_config.json" in message


def test_tokenizer_only_folder_is_text_only(layouts, tmp_path):
    shutil.copy(layouts[0] / "tokenizer.json", tmp_path)
    assert load_processor(tmp_path).image_processor is None
