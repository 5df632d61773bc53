"""Conformance matrix: each published SmolVLM-family model (scripts/conformance_presets.py:
real widths, heads, patch/tile sizes, scale factor, rope theta, vocabulary and special ids,
1 vision + 2 text layers), saved in the Hub's legacy layout and in transformers 5's
save_pretrained layout, against transformers live.

Per model and case (a non-square image that tiles, two images, text only, and a short video
for SmolVLM2): input_ids, pixel_values and pixel_attention_mask identical to transformers'
processor from each layout; last-position log-probabilities within TOL; 16 greedy tokens
identical to transformers' generate.

CI time: the model runs once per model, not once per layout, because the test first proves
that both layouts give identical inputs (every array) and identical loaded weights; a preset
equal in every value to another (SmolDocling, as far as its values could be confirmed) shares
that one's cells instead of rerunning them. The
two-image prompt starts with the one-image prompt's image, so it runs through the same
ChatCache, as a chat would: only the second image's tiles go through the vision tower,
and the result must still equal transformers' uncached run.

transformers' video processor needs torchvision, which the pinned environment lacks: the
video case feeds our processor's frames to both models; our frames are tied to the reference
by tests/test_video.py (golden pixels and prompts) and test_video_processor_settings below.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from conformance_presets import PRESETS, reference_processor, write_checkpoint  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from PIL import Image  # noqa: E402
from helpers import assert_same_greedy, max_rel_diff  # noqa: E402

from mlx_smolvlm.chat_cache import ChatCache  # noqa: E402
from mlx_smolvlm.generate import stream_generate  # noqa: E402
from mlx_smolvlm.loading import load_model  # noqa: E402
from mlx_smolvlm.processing import load_processor  # noqa: E402

STEPS = 16
TOL = 1e-4  # fp32: max |ours - ref| of last-position log-probs / max(1, max |ref|)
LAYOUTS = ("legacy", "v5")
KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
VIDEO_MEDIA = Path(__file__).parent / "fixtures" / "video" / "media"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    # 4:1 and 1:4 images: at longest edge 2048 (1536) each is 4 tiles + the global one, the
    # fewest a tiling image gets; the 2 s clip gives 2 frames at fps 1.
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    out = {}
    for name, (w, h) in {"wide": (64, 16), "tall": (16, 64)}.items():
        out[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out[name])
    out["video"] = VIDEO_MEDIA / "portrait_30fps.mp4"
    out["video_3s"] = VIDEO_MEDIA / "short_24fps.mp4"  # the clip of tests/fixtures/video's goldens
    return out


def messages(case, media):
    image = lambda k: {"type": "image", "path": str(media[k])}  # noqa: E731
    content = {
        "image": [image("wide"), {"type": "text", "text": "Describe this image."}],
        "two_images": [image("wide"), image("tall"), {"type": "text", "text": "Compare them."}],
        "text": [{"type": "text", "text": "Write a haiku about the sea."}],
        "video": [{"type": "video", "path": str(media["video"])},
                  {"type": "text", "text": "What happens?"}],
    }[case]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`get(name)`: (legacy folder, v5 folder, transformers model), built once; only the latest
    is kept (the 2.2B checkpoints are ~1.5 GB each in float32)."""
    held = {}

    def get(name):
        if name not in held:
            for old in held.values():
                shutil.rmtree(old[0].parent)
            held.clear()
            root = tmp_path_factory.mktemp("ckpt")
            model = write_checkpoint(name, root / "legacy", root / "v5")
            model.generation_config.eos_token_id = None  # compare a fixed number of steps
            held[name] = (root / "legacy", root / "v5", model)
        return held[name]

    yield get
    for old in held.values():
        shutil.rmtree(old[0].parent)


def assert_same_inputs(ours, ref, label):
    for k in KEYS:
        if k in ref or k in ours:
            a, b = np.asarray(ours[k]), np.asarray(ref[k])
            assert a.shape == b.shape and np.array_equal(a, b.astype(a.dtype)), f"{label}: {k} differs"


def reference_inputs(proc, msgs):
    out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def our_greedy(model, processor, msgs, cache):
    """Our greedy tokens, their log-probs at every step."""
    rs = list(stream_generate(model, processor, msgs, max_tokens=STEPS, prompt_cache=cache))
    return [r.token for r in rs], [np.array(r.logprobs) for r in rs]


def assert_same_tokens(tokens, logprobs, ref_tokens, ref_first, what):
    """Equal greedy tokens over the steps whose margin is wider than twice what TOL lets a
    log-prob move (TOL relative to the first step's largest magnitude, as max_rel_diff)."""
    move = TOL * max(1.0, float(np.abs(ref_first).max()))
    # we stop at the tokenizer's end-of-utterance, the reference here does not. Random weights
    # make near-ties: the 2.2B geometry's text case has a 0.0011 margin at step 1 (within 2 x
    # move), so only its first token is a decision both sides must share.
    assert_same_greedy(tokens, logprobs, ref_tokens[: len(tokens)], move, at_least=1, what=what)


def reference_greedy(model, inputs):
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**t, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    first = torch.log_softmax(out.logits[0][0].double(), -1).numpy()
    return out.sequences[0, t["input_ids"].shape[1]:].tolist(), first


def same_weights(a, b):
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)


def test_video_processor_settings_are_its_own(checkpoints, media, tmp_path):
    """transformers 5 layout whose video processor differs from the image processor (first
    resize 2048 vs 1536, fps 2 / 4 frames vs fps 1 / 64): frames follow the video processor,
    as transformers' SmolVLMVideoProcessor does (its settings are read live; its frames need
    torchvision, so frame 0 is compared with its golden frame from tests/fixtures/video)."""
    from mlx_smolvlm.video import frame_pixels, resize_frame, sample_frame_indices

    _, v5, ref_model = checkpoints("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    folder = tmp_path / "video_differs"
    shutil.copytree(v5, folder)
    config = json.loads((folder / "processor_config.json").read_text())
    image, video = config["image_processor"], config["video_processor"]
    image.update(size={"longest_edge": 1536},
                 video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 1536}})
    video.update(size={"longest_edge": 2048}, fps=2, num_frames=4,
                 video_sampling={"fps": 2, "max_frames": 4, "video_size": {"longest_edge": 2048}})
    (folder / "processor_config.json").write_text(json.dumps(config))

    ref_video = reference_processor(folder, "smolvlm").video_processor
    processor = load_processor(folder)
    o = processor.video_options
    assert (o.fps, o.max_frames, o.longest_edge, o.frame_size) == (
        ref_video.fps, ref_video.num_frames, ref_video.size["longest_edge"],
        ref_video.max_image_size["longest_edge"]) == (2, 4, 2048, 512)

    msgs = [{"role": "user", "content": [{"type": "video", "path": str(media["video_3s"])},
                                         {"type": "text", "text": "What happens?"}]}]
    inputs = processor(msgs)
    assert inputs["pixel_values"].shape[1] == len(sample_frame_indices(72, 24, 3.0, 2, 4)) == 4
    # frame 0 is transformers' own (golden) frame at 2048 -> 512; the image processor's 1536
    # would give other pixels
    arrays = np.load(Path(__file__).parent / "fixtures" / "video" / "golden.npz")
    decoded, golden = arrays["short_24fps/decoded"][0], arrays["short_24fps/real"][0]
    assert np.array_equal(inputs["pixel_values"][0, 0], frame_pixels(golden[None])[0])
    assert not np.array_equal(resize_frame(decoded, 1536, 512), golden)

    model = load_model(folder)
    tokens, logprobs = our_greedy(model, processor, msgs, None)
    ref_tokens, ref_logprobs = reference_greedy(ref_model, inputs)
    diff = max_rel_diff(logprobs[0], ref_logprobs)
    print(f"video settings differ: 4 frames, logprob max rel diff {diff:.1e}, tokens {tokens}")
    assert diff <= TOL
    assert_same_tokens(tokens, logprobs, ref_tokens, ref_logprobs, "video settings vs transformers")


def distinct_presets():
    """{name: names with the very same preset}: a checkpoint equal in every published value
    to another (SmolDocling as modelled, see UNCONFIRMED) would rerun the same cells."""
    groups = {}
    for name, preset in PRESETS.items():
        first = next((n for n in groups if PRESETS[n] == preset), name)
        groups.setdefault(first, []).append(name)
    return groups


def test_presets_that_share_cells():
    assert distinct_presets()["HuggingFaceTB/SmolVLM-256M-Instruct"] == [
        "HuggingFaceTB/SmolVLM-256M-Instruct", "ds4sd/SmolDocling-256M-preview"]


# SmolVLM2-256M first (PRESETS order): the video-settings test above built it already.
@pytest.mark.parametrize("name", list(distinct_presets()))
def test_conformance(name, checkpoints, media, capsys):
    tic = time.perf_counter()
    legacy, v5, ref_model = checkpoints(name)
    folders = dict(zip(LAYOUTS, (legacy, v5)))
    model_type = ref_model.config.model_type
    ours = {k: load_processor(f) for k, f in folders.items()}
    refs = {k: reference_processor(f, model_type) for k, f in folders.items()}
    cases = ["image", "two_images", "text"] + ["video"] * (model_type == "smolvlm")

    inputs = {}
    for case in cases:
        msgs = messages(case, media)
        inputs[case] = ours["legacy"](msgs)
        assert_same_inputs(ours["v5"](msgs), inputs[case], f"{case}: v5 vs legacy layout")
        if case != "video":  # transformers' video processor needs torchvision (see the docstring)
            for layout in LAYOUTS:
                ref = reference_inputs(refs[layout], msgs)
                assert_same_inputs(inputs[case], ref, f"{case}/{layout} vs transformers")

    model = load_model(legacy)
    assert same_weights(model, load_model(v5)), "the two layouts load different weights"

    eos = ours["legacy"].tokenizer.eos_token_ids
    rows, cache = [], None
    for case in cases:
        msgs = messages(case, media)
        if case != "two_images":  # two_images continues the image case's cache (its prefix)
            cache = ChatCache(model)
        tokens, logprobs = our_greedy(model, ours["legacy"], msgs, cache)
        ref_tokens, ref_logprobs = reference_greedy(ref_model, inputs[case])
        diff = max_rel_diff(logprobs[0], ref_logprobs)
        n = inputs[case].get("pixel_values", np.zeros((1, 0))).shape[1]
        same = "layouts equal" if case == "video" else "== transformers"
        rows.append(f"{' = '.join(distinct_presets()[name])} | legacy, v5 | {case} | {n} tiles | "
                    f"inputs {same} | logprob max rel diff {diff:.1e} | {len(tokens)} tokens")
        assert diff <= TOL, rows[-1]
        assert_same_tokens(tokens, logprobs, ref_tokens, ref_logprobs, rows[-1])
        assert len(tokens) == STEPS or tokens[-1] in eos
    with capsys.disabled():
        print("\n" + "\n".join(rows) + f"\n{name}: {time.perf_counter() - tic:.0f} s")
