"""SmolVLM2 video: decoding, frame sampling, frame pixels and the video prompt against
transformers' SmolVLMVideoProcessor / SmolVLMProcessor (goldens from scripts/make_video_golden.py).

Pixels are exact: the reference resizes uint8 frames with torch's native Lanczos (antialias)
kernel, which video.resize_frame reproduces (int16 fixed-point weights); Pillow's Lanczos
would differ by up to 4/255 on a few percent of values.
"""

import json
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import max_rel_diff
from helpers import assert_agrees, check_inputs
from make_video_golden import GENERATION, STEPS, generation_inputs_record, reference_greedy, tiny_inputs
from video_synth import BITS, VIDEOS, frame_image, make_video, shipped

from mlx_smolvlm.errors import InvalidRequestError
from mlx_smolvlm.video import (
    CHAT_TEMPLATE,
    VIDEO_INTRO,
    VideoError,
    VideoFrames,
    VideoOptions,
    frame_pixels,
    load_video,
    resize_frame,
    sample_frame_indices,
    video_prompt,
)

FIXTURES = Path(__file__).parent / "fixtures" / "video"
GOLDEN = json.loads((FIXTURES / "golden.json").read_text())
ARRAYS = np.load(FIXTURES / "golden.npz")
REAL = VideoOptions.from_config(
    {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
     "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}}
)


@pytest.fixture(scope="module")
def videos():
    # committed inputs (x264's bytes differ between machines): the goldens were made from them
    return shipped()


def test_goldens_made_from_these_videos(videos):
    check_inputs("video/golden.json", GOLDEN.get("provenance"), videos)


def frame_index(frame: np.ndarray) -> int:
    """Read back the index video_synth drew as black/white blocks."""
    h, w = frame.shape[:2]
    bw = max(w // BITS, 1)
    blocks = [frame[: h // 4, b * bw : (b + 1) * bw].mean() > 127 for b in range(BITS)]
    return sum(1 << b for b, on in enumerate(blocks) if on)


def _reference_pyav(path, indices):
    try:
        from transformers.video_utils import read_video_pyav
    except ImportError:
        return None
    frames, _ = read_video_pyav(str(path), lambda metadata, **k: np.array(indices))
    return frames


def test_sampling_table():
    for total, vfps, fps, max_frames, skip, expected in GOLDEN["sampling"]:
        got = sample_frame_indices(total, vfps, total / vfps, fps, max_frames, skip)
        assert got.tolist() == expected, (total, vfps, fps, max_frames, skip)


def test_options_from_config():
    # As SmolVLMVideoProcessor: `size` overrides `video_sampling.video_size`.
    assert (REAL.fps, REAL.max_frames, REAL.longest_edge, REAL.frame_size) == (1, 64, 2048, 512)
    only_sampling = VideoOptions.from_config(
        {"video_sampling": {"fps": 2, "max_frames": 8, "video_size": {"longest_edge": 384}},
         "max_image_size": {"longest_edge": 384}}, max_frames=4
    )
    assert (only_sampling.fps, only_sampling.max_frames, only_sampling.longest_edge) == (2, 4, 384)


@pytest.mark.parametrize("name", list(VIDEOS))
def test_decode_matches_reference(videos, name):
    ref = GOLDEN["videos"][name]
    v = load_video(videos[name], fps=1, max_frames=64)
    assert v.indices.tolist() == ref["indices"]
    assert v.timestamps == pytest.approx(ref["timestamps"])
    assert (v.duration, v.fps, v.total_frames) == (ref["duration"], ref["fps"], ref["total_frames"])
    rotation = VIDEOS[name][-1]
    stored = [np.rot90(f, -rotation // 90) for f in v.frames]  # undo our upright turn
    # The frames are the sampled ones (read back from their drawn index) ...
    assert [frame_index(f) for f in stored] == ref["indices"]
    # ... and the reference's pixels: live through transformers' PyAV reader when it is
    # installed, and the golden's (made from these same committed bytes).
    live = _reference_pyav(videos[name], ref["indices"])
    if live is not None:
        assert np.array_equal(np.stack(stored), live)
    if f"{name}/decoded" in ARRAYS:
        assert np.array_equal(np.stack(stored), ARRAYS[f"{name}/decoded"])
    print(f"{name}: indices match; pixels equal the live reference: {live is not None}, "
          f"the golden: {f'{name}/decoded' in ARRAYS}")


def test_rotation_is_applied(videos):
    v = load_video(videos["rotated_90"], fps=1, max_frames=2)
    assert v.frames.shape[1:] == (96, 64, 3)  # stored 96x64 landscape, shown portrait
    w, h = VIDEOS["rotated_90"][2:4]
    expected = np.rot90(frame_image(int(v.indices[0]), w, h), 1)
    assert np.abs(v.frames[0].astype(int) - expected).mean() < 4


def _compare(ours, ref, label):
    d = np.abs(ours.astype(int) - ref.astype(int))
    print(f"{label}: u8 max diff {d.max()}")
    assert d.max() == 0


@pytest.mark.parametrize("name", [n for n in VIDEOS if n != "long_30fps"])
def test_resize_matches_reference(name):
    decoded = ARRAYS[f"{name}/decoded"]
    ours = np.stack([resize_frame(f, longest_edge=160, frame_size=48) for f in decoded])
    _compare(ours, ARRAYS[f"{name}/small"], f"{name} 160 -> 48")


def test_real_config_resize_matches_reference():
    # 96x64 -> 2048x1366 (even) -> 512x512, as the 256M/500M configs do
    ours = resize_frame(ARRAYS["short_24fps/decoded"][0], REAL.longest_edge, REAL.frame_size)[None]
    _compare(ours, ARRAYS["short_24fps/real"], "short_24fps 2048 -> 512")


def test_frame_pixels_exact():
    u8 = ARRAYS["short_24fps/small"]
    pv = frame_pixels(u8)
    assert pv.dtype == np.float32 and pv.shape == (3, 3, 48, 48)
    # The reference normalizes uint8 x as (x - 127.5) / 127.5 in float32 (fused rescale).
    expected = (u8.astype(np.float32).transpose(0, 3, 1, 2) - np.float32(127.5)) / np.float32(127.5)
    assert np.array_equal(pv, expected)


def test_video_prompt_layout():
    v = VideoFrames("x.mp4", np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 35, 71]), 24.0, 72, 3.0)
    block = "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    assert video_prompt(v, block) == (
        "You are provided the following series of three frames from a 0:00:03 [H:MM:SS] video.\n"
        f"\nFrame from 00:00:{block}\nFrame from 00:01:{block}\nFrame from 00:02:{block}\n\n"
    )
    frame = np.zeros((1, 4, 4, 3), np.uint8)
    long = VideoFrames("y.mp4", frame, np.array([3700 * 30]), 30.0, 4000 * 30, 4000.0)
    assert "one frames from a 1:06:40 [H:MM:SS]" in video_prompt(long, "")
    assert "Frame from 61:40:" in video_prompt(long, "")
    try:  # the strings are transformers' own
        from transformers.models.smolvlm import processing_smolvlm as ref
    except ImportError:
        return
    assert VIDEO_INTRO == ref.DEFAULT_VIDEO_INTRO and CHAT_TEMPLATE == ref.DEFAULT_CHAT_TEMPLATE


# --- bad input: every failure names the file and the problem


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="nope.mp4: no such video file"):
        load_video(tmp_path / "nope.mp4")


def test_empty_file(tmp_path):
    with pytest.raises(VideoError, match="empty.mp4: the file is empty"):
        load_video(_write(tmp_path / "empty.mp4", b""))


def test_corrupt_file(tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(VideoError, match="junk.mp4: not a readable video"):
        load_video(_write(tmp_path / "junk.mp4", junk))


def test_truncated_file(tmp_path, videos):
    data = videos["short_24fps"].read_bytes()
    for keep in (len(data) // 2, 200):
        path = _write(tmp_path / f"cut{keep}.mp4", data[:keep])
        with pytest.raises(VideoError, match=f"cut{keep}.mp4: "):
            load_video(path)


def test_truncated_stream_keeps_what_decodes(tmp_path):
    # A Matroska file cut short still opens; the frames that survive are used.
    path = make_video(tmp_path / "clip.mkv", 3, 24, 64, 48)
    cut = _write(tmp_path / "cut.mkv", path.read_bytes()[: path.stat().st_size * 2 // 3])
    v = load_video(cut, fps=1)
    assert len(v.frames) >= 1
    assert [frame_index(f) for f in v.frames] == v.indices.tolist()


def test_audio_only(tmp_path):
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        silence = np.zeros((1, 1024), np.float32)
        frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(VideoError, match="tone.m4a: has no video stream"):
        load_video(path)


def test_zero_length_video(tmp_path):
    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    with pytest.raises(VideoError, match="zero.mp4: "):
        load_video(path)


def test_headers_pyav_chokes_on(tmp_path):
    """Bytes an attacker controls in the header: metadata in no valid UTF-8 is read (PyAV's
    strict decoding raised UnicodeDecodeError), a codec FFmpeg cannot decode is a VideoError
    (PyAV gives no codec context), and the server's check refuses it without naming the file."""
    from mlx_smolvlm.media_admission import MediaBudget, MediaRefused, check_video

    mkv = make_video(tmp_path / "clip.mkv", 1, 4, 32, 32).read_bytes()
    assert b"Lavf" in mkv  # the muxer's name, in the metadata
    latin = _write(tmp_path / "latin.mkv", mkv.replace(b"Lavf", b"La\xfff"))
    assert len(load_video(latin).frames) == 1
    assert check_video(str(latin), MediaBudget())["frames"] == 4
    mp4 = make_video(tmp_path / "clip.mp4", 1, 4, 32, 32).read_bytes()
    unknown = _write(tmp_path / "unknown.mp4", mp4.replace(b"avc1", b"zzzz"))
    with pytest.raises(VideoError, match="unknown.mp4: the video stream's codec is not supported"):
        load_video(unknown)
    with pytest.raises(MediaRefused, match="^the video stream's codec is not supported$"):
        check_video(str(unknown), MediaBudget())


# --- the processor: video prompt, mixed content, controls


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from make_tokenizer import write_processor_folder

    from mlx_smolvlm.processing import load_processor

    folder = write_processor_folder(tmp_path_factory.mktemp("proc"), "smolvlm2", 512, 64)
    return load_processor(folder)


@pytest.fixture(scope="module")
def fast_processor(processor):
    # input_ids do not depend on the first resize's size; 128 instead of 2048 keeps the
    # 64-frame cases fast (the resize itself is checked above against the reference)
    from copy import copy

    fast = copy(processor)
    fast.video_options = VideoOptions(longest_edge=128)
    return fast


def _messages(case, videos, tmp_path):
    from PIL import Image

    image = tmp_path / "ramp.png"
    Image.fromarray(ARRAYS["image"]).save(image)
    messages = json.loads(json.dumps(GOLDEN["prompts"][case]["messages"]))
    for m in messages:
        for block in m["content"]:
            if block["type"] == "video":
                block["path"] = str(videos[block["path"]])
            elif block["type"] == "image":
                block["path"] = str(image)
    return messages


@pytest.mark.parametrize("case", ["one_video", "video_then_image", "later_turn", "two_videos"])
def test_prompt_matches_reference(fast_processor, videos, tmp_path, case):
    processor = fast_processor
    golden = GOLDEN["prompts"][case]
    expected = golden["input_ids"]
    if case == "two_videos":
        # The reference states the batch's padded frame count (64) in the 3-frame video's
        # intro; we state each video's own count. Everything else is identical.
        text = processor.tokenizer.decode(expected).replace(
            "sixty-four frames from a 0:00:03", "three frames from a 0:00:03", 1
        )
        expected = processor.tokenizer.encode(text)
    out = processor(_messages(case, videos, tmp_path))
    assert out["input_ids"][0].tolist() == expected
    n_frames = sum(len(GOLDEN["videos"][v]["indices"]) for v in golden["videos"])
    n_tiles = 13 * golden["images"]  # the 50x30 ramp: 3x4 tiles + global at longest edge 2048
    assert out["pixel_values"].shape == (1, n_frames + n_tiles, 3, 512, 512)
    assert out["pixel_attention_mask"].all()
    n_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_tokens == 64 * (n_frames + n_tiles)


def test_frames_in_prompt_order(processor, fast_processor, videos, tmp_path):
    # video, then image: the first 3 planes are the video's frames, exact reference pixels
    out = processor(_messages("video_then_image", videos, tmp_path))
    frame0 = (ARRAYS["short_24fps/real"][0].astype(np.float32).transpose(2, 0, 1) - 127.5) / 127.5
    assert np.array_equal(out["pixel_values"][0, 0], frame0)
    # image, then video in a later turn: the tiles first, then the frames
    later = fast_processor(_messages("later_turn", videos, tmp_path), max_frames=4)
    video = {"type": "video", "path": str(videos["long_30fps"])}
    alone = fast_processor([{"role": "user", "content": [video]}], max_frames=4)
    assert later["pixel_values"].shape[1] == 13 + 4
    assert np.array_equal(later["pixel_values"][0, 13:], alone["pixel_values"][0])


def test_video_controls(fast_processor, videos):
    processor = fast_processor
    messages = [{"role": "user", "content": [{"type": "video", "path": str(videos["long_30fps"])},
                                             {"type": "text", "text": "Summarize."}]}]
    out = processor(messages, fps=0.5, max_frames=8, frame_size=256)
    assert out["pixel_values"].shape == (1, 8, 3, 256, 256)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 8 * 16
    text = processor.tokenizer.decode(out["input_ids"][0].tolist())
    assert "series of eight frames from a 0:01:10" in text
    with pytest.raises(InvalidRequestError, match="frame_size must be 512 or a multiple of 64 below it"):
        processor(messages, frame_size=100)


def test_video_count_mismatch(processor, videos):
    with pytest.raises(InvalidRequestError, match="1 <video> placeholder"):
        processor("<video> and <video>".replace(" and <video>", ""), videos=[])
    with pytest.raises(VideoError, match="gone.mp4: no such video file"):
        processor([{"role": "user", "content": [{"type": "video", "path": "gone.mp4"}]}])


# --- end to end: greedy tokens of a tiny random SmolVLM2 on a video prompt equal transformers'

# golden: `python scripts/make_video_golden.py generation` (needs torch)
TINY = Path(__file__).parent / "fixtures" / "tiny-smolvlm"


def _our_greedy(inputs):
    import mlx.core as mx

    from mlx_smolvlm.models.cache import make_prompt_cache
    from mlx_smolvlm.loading import load_model

    model = load_model(TINY)
    cache = make_prompt_cache(model)
    keys = ("input_ids", "pixel_values", "pixel_attention_mask")
    logits = model(*(mx.array(inputs[k]) for k in keys), cache=cache)
    last, tokens = np.array(logits[0, -1]), []
    for _ in range(STEPS):
        y = logits[:, -1].argmax(-1)
        tokens.append(y.item())
        logits = model(y[:, None], cache=cache)
    return {"tokens": tokens, "logits": last}


@pytest.mark.parametrize("case,controls", [("default", {}), ("frame_size_24", {"frame_size": 24})])
def test_greedy_video_generation_matches_transformers(videos, tmp_path, case, controls):
    inputs = tiny_inputs(videos["short_24fps"], tmp_path, **controls)
    ours = _our_greedy(inputs)
    live = reference_greedy(inputs)
    golden = json.loads(GENERATION.read_text())[case]
    record = golden.pop("provenance")
    check_inputs(f"video/generation.json[{case}]", record, generation_inputs_record(inputs))

    def same(a, b):  # fp32 tolerance on the last-position logits; tokens exact
        return max_rel_diff(a["logits"], b["logits"]) <= 1e-4 and a["tokens"] == b["tokens"]

    for source, other in (("transformers", live), ("golden", golden)):
        if other is not None:
            print(f"{case} vs {source}: last-position logits max rel diff "
                  f"{max_rel_diff(ours['logits'], other['logits']):.2e} (tol 1e-4); tokens {ours['tokens']}")
    assert_agrees(f"video/generation.json[{case}]", ours, live=live, golden=golden, same=same, record=record)


def test_preflight_counts_frames_and_tokens(fast_processor, videos, tmp_path):
    messages = _messages("later_turn", videos, tmp_path)
    report = fast_processor.preflight(messages, max_frames=16)
    out = fast_processor(messages, max_frames=16)
    (video, n_image, n_prompt), = report.videos
    assert len(video.indices) == 16 and video.frames is None
    n_tokens = int((out["input_ids"] == fast_processor.image_token_id).sum())
    assert n_image + report.total_image_tokens == n_tokens
    text = str(report)
    print(text)
    assert "long_30fps.mp4: 70.0 s at 30 fps -> 16 frames, 1024 image tokens" in text
    assert "total: 13 tiles + 16 frames, 1856 image tokens" in text


# --- the command line


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from make_generate_golden import tiny_folder

    return tiny_folder("tiny-smolvlm", tmp_path_factory.mktemp("tiny"))


def test_cli_video_dry_run_and_generation(tiny_vlm, videos, tmp_path):
    from helpers import cli

    r = cli("--model", tiny_vlm, "--video", videos["short_24fps"], "--video", videos["long_30fps"],
            "--max-frames", 8, "--dry-run")
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    assert "short_24fps.mp4: 3.0 s at 24 fps -> 3 frames, 27 image tokens" in r.stdout
    assert "long_30fps.mp4: 70.0 s at 30 fps -> 8 frames, 72 image tokens" in r.stdout
    assert "total: 0 tiles + 11 frames, 99 image tokens" in r.stdout
    r = cli("--model", tiny_vlm, "--video", videos["short_24fps"], "--fps", 2, "--frame-size", 24,
            "--max-tokens", 3, "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Generation: 3 tokens" in r.stdout
    # a chat turn after a video of small frames reuses the cache (4 tokens per frame here)
    r = cli("--model", tiny_vlm, "--chat", "--verbose", "--max-tokens", 2, "--video", videos["short_24fps"],
            "--frame-size", 24, stdin="Hello\nMore\n")
    assert r.returncode == 0, r.stderr
    assert "cached)" in r.stdout


def test_cli_bad_video_gives_one_line(tiny_vlm, tmp_path):
    from helpers import cli

    r = cli("--model", tiny_vlm, "--video", tmp_path / "none.mp4")
    assert r.returncode == 2 and "--video" in r.stderr and "none.mp4: no such file" in r.stderr
    junk = _write(tmp_path / "junk.mp4", b"\x00" * 1000)
    r = cli("--model", tiny_vlm, "--video", junk, "--max-tokens", 2)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "junk.mp4: not a readable video" in r.stderr
    r = cli("--model", tiny_vlm, "--video", junk, "--frame-size", 100, "--dry-run")
    assert r.returncode == 1 and "frame_size must be 36 or a multiple of 12 below it" in r.stderr


def test_video_to_a_model_never_trained_on_video_is_refused(tmp_path, videos):
    # SmolVLM v1 (and the docling models): model_type idefics3, whose reference processor has
    # no video input. Refused before any decoding, naming the model type.
    from make_generate_golden import tiny_folder
    from helpers import cli

    from mlx_smolvlm.processing import MediaError, load_processor

    folder = tiny_folder("tiny-idefics3", tmp_path / "v1")
    processor = load_processor(folder)
    messages = [{"role": "user", "content": [{"type": "video", "path": str(videos["short_24fps"])},
                                             {"type": "text", "text": "What happens?"}]}]
    for call in (processor, processor.preflight, processor.apply_chat_template):
        with pytest.raises(MediaError, match="model_type 'idefics3' takes no video"):
            call(messages)
    r = cli("--model", folder, "--video", videos["short_24fps"], "--max-tokens", 2)
    print(r.stderr)
    assert r.returncode == 1 and "model_type 'idefics3' takes no video" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
