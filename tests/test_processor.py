"""Processor parity with transformers' SmolVLMProcessor / Idefics3Processor (PIL image path).

With transformers importable, every case runs both processors: input_ids and masks must be
identical and pixel_values equal (max abs diff 0, printed). Without it, our outputs are compared
with tests/fixtures/processor/golden.json (written by `python tests/test_processor.py`): input_ids
in full (run-length coded), pixel_values as a sha256 of the float32 bytes plus per-tile channel
means, so a mismatch shows where it is.
"""

import base64
import hashlib
import http.server
import json
import os
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import check_inputs
from PIL import Image

from mlx_smolvlm.errors import InvalidRequestError, TokenizerError
from mlx_smolvlm.image_processing import ImageError
from mlx_smolvlm.processing import load_processor

GOLDEN = Path(__file__).parent / "fixtures" / "processor" / "golden.json"

SETUPS = {
    # real SmolVLM-256M/500M processor numbers
    "smolvlm-256m": dict(layout="smolvlm", tile=512, image_seq_len=64),
    "smolvlm2-256m": dict(layout="smolvlm2", tile=512, image_seq_len=64),
    # SmolVLM-Instruct 2.2B (model_type idefics3): row/col markers are plain text
    "idefics3-2.2b": dict(layout="idefics3-2.2b", tile=384, image_seq_len=81, longest_edge=1536),
    # small tiles keep the image-format cases cheap; same code path
    "small-tiles": dict(layout="smolvlm", tile=36, image_seq_len=9),
}


def noise(width, height, seed=0, channels=3, dtype=np.uint8, high=256):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.RandomState(seed).randint(0, high, shape).astype(dtype)


def rgb(width, height, seed=0):
    return Image.fromarray(noise(width, height, seed))


def saved(d, name, image, **kwargs):
    path = Path(d) / name
    image.save(path, **kwargs)
    return str(path)


def rgba_png(d):
    return saved(d, "rgba.png", Image.fromarray(noise(50, 40, 1, channels=4)))


def palette_png(d):
    image = rgb(60, 45, 2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return saved(d, "palette.png", image, transparency=3)


def exif_jpeg(d):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: width and height swap
    return saved(d, "exif.jpg", rgb(64, 30, 3), exif=exif, quality=90)


FORMATS = {
    "grayscale": lambda d: saved(d, "gray.png", Image.fromarray(noise(50, 30, 4, channels=1))),
    "rgba-png": rgba_png,
    "rgba-pil": lambda d: Image.fromarray(noise(50, 40, 1, channels=4)),
    "palette-png": palette_png,
    "palette-pil": lambda d: Image.open(palette_png(d)),
    "png-16bit": lambda d: saved(
        d, "i16.png", Image.fromarray(noise(40, 30, 5, 1, np.uint16, 1000))
    ),
    "cmyk-jpeg": lambda d: saved(d, "cmyk.jpg", Image.fromarray(noise(40, 30, 6, 4), "CMYK")),
    "exif-jpeg": exif_jpeg,
}


def user(*images, text="Describe this image."):
    content = [{"type": "image", "path": i} if isinstance(i, str) else {"type": "image", "image": i}
               for i in images]
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def size_case(width, height, setup="smolvlm-256m"):
    return setup, lambda d: [user(rgb(width, height))], {}


CASES = {
    **{f"{w}x{h}": size_case(w, h) for w, h in [
        (1, 1), (17, 1000), (1000, 17), (386, 386), (512, 512), (513, 512), (1920, 1080),
        (2048, 2048), (4000, 3000)]},
    **{name: ("small-tiles", lambda d, f=f: [user(f(d))], {}) for name, f in FORMATS.items()},
    "two-images": ("small-tiles", lambda d: [user(rgb(80, 60, 7), rgb(30, 90, 8))], {}),
    "three-images-interleaved": ("small-tiles", lambda d: [{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image", "image": rgb(80, 60, 7)},
        {"type": "text", "text": " with "}, {"type": "image", "image": rgb(20, 20, 9)},
        {"type": "text", "text": " and "}, {"type": "image", "image": rgb(100, 36, 10)}]}], {}),
    "two-turns": ("small-tiles", lambda d: [
        user(rgb(80, 60, 7), text="What is this?"),
        {"role": "assistant", "content": [{"type": "text", "text": "Noise, 2 colors."}]},
        user(rgb(50, 120, 11), text="And this one?")], {}),
    "base64-and-url-keys": ("small-tiles", lambda d: [{"role": "user", "content": [
        {"type": "image", "base64": base64.b64encode(Path(palette_png(d)).read_bytes()).decode()},
        {"type": "image", "url": exif_jpeg(d)}, {"type": "text", "text": "Same?"}]}], {}),
    "no-split": ("smolvlm-256m", lambda d: [user(rgb(1920, 1080))],
                 {"do_image_splitting": False}),
    "text-only": ("smolvlm-256m", lambda d: [{"role": "user", "content": [
        {"type": "text", "text": "Count to 12345, then say hi!"}]}], {}),
    "idefics3-2.2b": ("idefics3-2.2b", lambda d: [user(rgb(1000, 700, 12))], {}),
    "idefics3-2.2b-no-split": ("idefics3-2.2b", lambda d: [user(rgb(300, 500, 13))],
                               {"do_image_splitting": False}),
    "smolvlm2": ("smolvlm2-256m", lambda d: [user(rgb(700, 500, 14))], {}),
}


def reference_processor(folder, layout):
    """transformers' processor on the same files, with its PIL image processor."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    prefix = "SmolVLM" if layout == "smolvlm2" else "Idefics3"
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(**config)
    if layout != "smolvlm2":
        ref = AutoProcessor.from_pretrained(folder)
        ref.image_processor = image_processor
        return ref

    class NoVideoSmolVLMProcessor(transformers.SmolVLMProcessor):
        # SmolVLM's video processor needs torchvision; images never touch it
        def check_argument_for_proper_class(self, name, argument):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, argument)

    class Video:
        num_frames = fps = None

    return NoVideoSmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(folder),
        video_processor=Video(),
        image_seq_len=json.loads((Path(folder) / "processor_config.json").read_text())[
            "image_seq_len"],
        chat_template=(Path(folder) / "chat_template.jinja").read_text(),
    )


def run_reference(ref, messages, controls):
    out = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="np",
                                  processor_kwargs=dict(controls))
    return {k: np.asarray(v) for k, v in out.items()}


def case_inputs(name, work) -> dict:
    """What a case's golden depends on: its processor folder's files and the media it writes."""
    from provenance import digest

    setup, build, _ = CASES[name]
    Path(work).mkdir(parents=True, exist_ok=True)
    def pixels(image):  # PIL images in the messages: their mode, size and pixels
        return f"{image.mode}{image.size}{digest(np.asarray(image))}"

    messages = json.dumps(build(work), sort_keys=True, default=pixels).replace(str(work), "WORK")
    files = sorted(p for p in Path(work).rglob("*") if p.is_file())
    return {name: digest("".join(digest(p) for p in files) + messages)}


def rle(ids):
    runs = []
    for i in ids:
        if runs and runs[-1][0] == i:
            runs[-1][1] += 1
        else:
            runs.append([int(i), 1])
    return runs


def summarize(out):
    s = {"input_ids": rle(out["input_ids"][0].tolist())}
    if "pixel_values" in out:
        pv = np.ascontiguousarray(out["pixel_values"], dtype="<f4")
        s["pixel_shape"] = list(pv.shape)
        s["pixel_sha256"] = hashlib.sha256(pv.tobytes()).hexdigest()
        s["tile_means"] = np.round(pv.mean(axis=(3, 4), dtype=np.float64), 6)[0].tolist()
        mask = out["pixel_attention_mask"].astype(bool)
        s["mask_sha256"] = hashlib.sha256(mask.tobytes()).hexdigest()
    return s


def has_transformers():
    if os.environ.get("MLX_SMOLVLM_GOLDEN"):  # force the no-torch path: compare with golden.json
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def processors(processor_folder):
    made = {}

    def get(setup):
        if setup not in made:
            folder = processor_folder(**SETUPS[setup])
            ref = None
            if has_transformers():
                ref = reference_processor(folder, SETUPS[setup]["layout"])
            made[setup] = (load_processor(folder), ref)
        return made[setup]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, processors, tmp_path):
    setup, build, controls = CASES[name]
    ours, ref = processors(setup)
    out = ours(build(tmp_path), **controls)
    assert out["input_ids"].dtype == np.int64 and out["attention_mask"].dtype == np.int64
    if ref is None:
        stored = json.loads(GOLDEN.read_text())
        check_inputs(f"processor/golden.json[{name}]", stored["provenance"], case_inputs(name, tmp_path))
        golden = stored[name]
        got = summarize(out)
        if "tile_means" in golden:
            diff = np.abs(np.array(got["tile_means"]) - np.array(golden["tile_means"])).max()
            print(f"{name}: golden tile-mean max diff {diff:.2e}")
        assert got == golden
        return
    expected = run_reference(ref, build(tmp_path), controls)
    assert set(out) == set(expected), (set(out), set(expected))
    np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], expected["attention_mask"])
    if "pixel_values" in expected:
        assert out["pixel_values"].dtype == np.float32
        assert out["pixel_values"].shape == expected["pixel_values"].shape
        diff = np.abs(out["pixel_values"] - expected["pixel_values"]).max()
        print(f"{name}: pixel_values {out['pixel_values'].shape} max abs diff {diff}")
        assert diff == 0
        np.testing.assert_array_equal(out["pixel_attention_mask"],
                                      expected["pixel_attention_mask"].astype(bool))


def test_transformers_loads_same_folder(processor_folder):
    """transformers' own processor class loads the generated folder and tokenizes alike."""
    transformers = pytest.importorskip("transformers")
    folder = processor_folder(**SETUPS["smolvlm-256m"])
    ref = transformers.AutoProcessor.from_pretrained(folder)
    ours = load_processor(folder)
    assert type(ref).__name__ == "Idefics3Processor"
    text = "Year 2024: <row_1_col_2>\n\n<global-img> x<image><end_of_utterance> Ünï 😀"
    assert ref.tokenizer(text)["input_ids"] == ours.tokenizer.encode(text)
    assert ref.image_token_id == ours.image_token_id == 49190


def test_token_ids_match_real_checkpoints(processor_folder):
    tok = load_processor(processor_folder(**SETUPS["smolvlm-256m"])).tokenizer
    ids = tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<global-img>", "<row_1_col_1>",
         "<row_6_col_6>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    assert ids == [0, 1, 2, 49152, 49153, 49188, 49189, 49190, 49279]
    assert tok.vocab_size == 49280 and tok.eos_token_ids == {49279}
    v1 = load_processor(processor_folder(**SETUPS["idefics3-2.2b"])).tokenizer
    assert v1.vocab_size == 49155 and v1.convert_tokens_to_ids("<image>") == 49153
    assert v1.convert_tokens_to_ids("<row_1_col_1>") is None  # plain text: several tokens
    assert len(v1.encode("<row_1_col_1>")) > 1


TEXTS = ["Hello, world! What's up?<|im_end|>\n  indented  code\tx", "Café naïve 你好 😀",
         "<|im_start|>user\nhi<|im_end|>\n", "  leading and trailing  \n\n"]


def test_gguf_tokenizer():
    """SmolLM2 from the GGUF: same ids and chat template as transformers' own GGUF loader.
    transformers' loader has no rule for llama.cpp's `smollm` pre-tokenizer (single digits, as
    in SmolLM2's tokenizer.json), so digits are checked separately."""
    from mlx_smolvlm.tokenizer import Tokenizer
    from make_tokenizer import default_gguf

    tok = Tokenizer.from_gguf(default_gguf())
    assert tok.eos_token_ids == {2} and tok.special_tokens["bos_token"] == "<|im_start|>"
    assert tok.convert_ids_to_tokens(tok.encode("year 2024")) == ["year", "Ġ", "2", "0", "2", "4"]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    path = default_gguf()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert ref.encode(text, add_special_tokens=False) == tok.encode(text)
    for gen in (False, True):
        assert ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
            tok.apply_chat_template(messages, add_generation_prompt=gen)


@pytest.mark.parametrize("name,tile,seq_len", [("tiny-idefics3", 32, 4), ("tiny-smolvlm", 36, 9)])
def test_tiny_checkpoint_folder(name, tile, seq_len, tmp_path):
    """A processor for the tiny random checkpoints (vocab 512, <image> = 300)."""
    from make_tokenizer import write_processor_for_model

    config = json.loads((Path(__file__).parent / "fixtures" / name / "config.json").read_text())
    proc = load_processor(write_processor_for_model(tmp_path, config))
    assert proc.image_token_id == 300 and proc.tokenizer.vocab_size == 512
    assert proc.image_seq_len == seq_len and proc.image_processor.tile_size == tile
    out = proc([user(rgb(80, 50))])
    ids = out["input_ids"][0]
    assert ids.max() < 512
    assert (ids == 300).sum() == out["pixel_values"].shape[1] * seq_len
    assert out["pixel_values"].shape[-1] == tile
    # the checkpoint consumes it: one image feature per <image> token
    import mlx.core as mx

    from mlx_smolvlm.loading import load_model

    model = load_model(Path(__file__).parent / "fixtures" / name)
    keys = ("input_ids", "pixel_values", "pixel_attention_mask")
    logits = model(*(mx.array(out[k]) for k in keys))
    assert logits.shape == (1, len(ids), 512)


def test_raw_prompt_and_text_only_model(processor_folder):
    from mlx_smolvlm.processing import text_processor
    from mlx_smolvlm.tokenizer import Tokenizer
    from make_tokenizer import default_gguf

    proc = load_processor(processor_folder(**SETUPS["small-tiles"]))
    a = proc("<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:", images=[rgb(40, 40)])
    b = proc([user(rgb(40, 40), text="Hi")])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    text = text_processor(Tokenizer.from_gguf(default_gguf()))
    prompt = text.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "pixel_values" not in text(prompt)
    with pytest.raises(InvalidRequestError, match="text only"):
        text("<image>", images=[rgb(4, 4)])


STRING_CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a tile?"},
    {"role": "assistant", "content": " A square crop."},
    {"role": "user", "content": [{"type": "text", "text": "And a patch?"}]},
]


def as_parts(messages):
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


@pytest.mark.parametrize("setup", ["smolvlm-256m", "smolvlm2-256m", "idefics3-2.2b"])
def test_string_content(setup, processor_folder):
    """Plain-string content renders its text with every SmolVLM template, in the processor and in
    a text-only (no image processor) load alike."""
    from mlx_smolvlm.processing import text_processor
    from mlx_smolvlm.tokenizer import load_tokenizer
    from mlx_smolvlm.video import CHAT_TEMPLATE

    folder = processor_folder(**SETUPS[setup])
    proc = load_processor(folder)
    rendered = proc.apply_chat_template(STRING_CONVERSATION)
    assert "System: Answer briefly.<end_of_utterance>\nUser: What is a tile?<end_of_utterance>\n" in rendered
    assert rendered == proc.apply_chat_template(as_parts(STRING_CONVERSATION))
    text_only = text_processor(load_tokenizer(folder))
    assert text_only.apply_chat_template(STRING_CONVERSATION) == rendered
    np.testing.assert_array_equal(proc(STRING_CONVERSATION)["input_ids"], text_only(STRING_CONVERSATION)["input_ids"])
    # The text is what transformers' current SmolVLM2 template (our CHAT_TEMPLATE, checked equal to
    # it in test_video) renders for string content, in every template family.
    assert rendered == proc.tokenizer.apply_chat_template(STRING_CONVERSATION, add_generation_prompt=True,
                                                          chat_template=CHAT_TEMPLATE)
    if not has_transformers():
        return
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    ref = AutoTokenizer.from_pretrained(folder)
    # With a video the reference switches to DEFAULT_CHAT_TEMPLATE, which has a string branch:
    # ours renders exactly the same text.
    video = {"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "Hm?"}]}
    with_video = STRING_CONVERSATION + [{"role": "assistant", "content": "Ok."}, video]
    expected = ref.apply_chat_template(with_video, chat_template=DEFAULT_CHAT_TEMPLATE,
                                       add_generation_prompt=True, tokenize=False)
    if setup != "idefics3-2.2b":  # idefics3 models take no video (the processor refuses it)
        assert proc.apply_chat_template(with_video) == expected
    # The hub's legacy templates have no string branch: the reference renders the string turns
    # as empty ("System: <end_of_utterance>"); we render their text, as the new template does.
    legacy = ref.apply_chat_template(STRING_CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert "System: <end_of_utterance>" in legacy and legacy != rendered
    assert ref.apply_chat_template(STRING_CONVERSATION, chat_template=DEFAULT_CHAT_TEMPLATE,
                                   add_generation_prompt=True, tokenize=False) == rendered


def test_preflight_and_controls(processor_folder):
    proc = load_processor(processor_folder(**SETUPS["smolvlm-256m"]))
    images = [rgb(386, 386), rgb(1920, 1080), rgb(2048, 2048)]
    report = proc.preflight(images)
    assert report.tiles == [17, 13, 17] and report.image_tokens == [1088, 832, 1088]
    assert report.total_tiles == 47 and report.total_image_tokens == 3008
    unsplit = proc.preflight(images, do_image_splitting=False)
    assert unsplit.tiles == [1, 1, 1] and unsplit.total_image_tokens == 192
    # the pre-flight numbers are the ones the processor produces
    for controls in ({}, {"do_image_splitting": False}, {"max_tiles": 4}, {"longest_edge": 512}):
        msgs = [user(rgb(1920, 1080))]
        out = proc(msgs, **controls)
        plan = proc.preflight(msgs, **controls)
        assert out["pixel_values"].shape[1] == plan.total_tiles
        assert (out["input_ids"] == proc.image_token_id).sum() == plan.total_image_tokens
        # the one <image> token of the rendered prompt becomes prompt_tokens tokens
        rendered = proc.tokenizer.encode(proc.apply_chat_template(msgs))
        assert len(out["input_ids"][0]) == len(rendered) - 1 + plan.prompt_tokens[0]
    assert proc.preflight(images, max_tiles=4).tiles == [5, 5, 5]
    assert proc.preflight(images, max_tiles=1).tiles == [1, 1, 1]
    assert proc.preflight([rgb(386, 386)], longest_edge=512).tiles == [1]
    assert proc.preflight([rgb(600, 300)], longest_edge=600).tiles == [3]  # 1x2 + global
    # EXIF orientation is read from the header: 64x30 stored, 30x64 upright
    exif_plan = proc.preflight([exif_jpeg(processor_folder(**SETUPS["small-tiles"]))])
    assert (exif_plan.images[0].width, exif_plan.images[0].height) == (30, 64)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_from_local_url(processor_folder, tmp_path):
    saved(tmp_path, "a.png", rgb(40, 30))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = load_processor(processor_folder(**SETUPS["small-tiles"]))
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        a = proc([user(url)])
        b = proc([user(str(tmp_path / "a.png"))])
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    finally:
        server.shutdown()


BAD = {
    "missing": (lambda d: str(Path(d) / "nope.png"), "no such file"),
    "truncated": (lambda d: truncated(d), "truncated or corrupt"),
    "not-an-image": (lambda d: write(d, "x.png", b"hello, not an image"), "not a supported"),
    "unsupported-format": (lambda d: write(d, "x.svg", b"<svg width='4' height='4'/>"),
                           "not a supported"),
    "zero-size": (lambda d: Image.new("RGB", (0, 5)), "zero-size"),
    "closed-port-url": (lambda d: f"http://127.0.0.1:{closed_port()}/a.png", "cannot download"),
    "wrong-type": (lambda d: 42, "expected a path"),
}


def write(d, name, data):
    path = Path(d) / name
    path.write_bytes(data)
    return str(path)


def truncated(d):
    data = Path(saved(d, "full.jpg", rgb(64, 64))).read_bytes()
    return write(d, "cut.jpg", data[: len(data) // 2])


@pytest.mark.parametrize("name", list(BAD))
def test_bad_image_gives_clear_error(name, processor_folder, tmp_path):
    proc = load_processor(processor_folder(**SETUPS["small-tiles"]))
    make, message = BAD[name]
    source = make(tmp_path)
    with pytest.raises(ImageError, match=message) as e:
        proc([{"role": "user", "content": [{"type": "image", "image": source},
                                            {"type": "text", "text": "hi"}]}])
    label = source.split("/")[-1] if isinstance(source, str) else None
    assert label is None or label in str(e.value)


def test_placeholder_count_mismatch(processor_folder):
    proc = load_processor(processor_folder(**SETUPS["small-tiles"]))
    with pytest.raises(InvalidRequestError, match="2 <image> placeholder.*1 image"):
        proc("<image><image>hi", images=[rgb(8, 8)])
    with pytest.raises(InvalidRequestError, match="0 <image> placeholder.*1 image"):
        proc("hi", images=[rgb(8, 8)])
    with pytest.raises(InvalidRequestError, match="1 <image> placeholder.*0 image"):
        proc([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])


def test_missing_processor_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_processor(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_processor(tmp_path)
