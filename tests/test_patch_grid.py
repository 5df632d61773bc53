"""The 2.2B geometry (SmolVLM-Instruct, SmolVLM2-2.2B-Instruct): 384-px tiles, 14-px patches.

384 = 27 x 14 + 6: the reference's stride-14 conv sees a 27x27 patch grid, its unfold-based
patch mask drops the last 6 pixels, and the 3x3 pixel shuffle gives 81 tokens per tile.
Live against transformers (these tests need torch): the geometry at tiny widths over every
mask case, then the published widths at one layer per tower (vocab included), where a float32
MLX matmul on a CPU is the cost: one unsplit image and 8 greedy tokens.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from make_checkpoint import PRESETS, build_model
from make_generate_golden import hf_processor
from make_golden import make_inputs, reference_outputs
from make_tokenizer import write_processor_folder, write_processor_for_model
from test_model import max_rel_diff, our_stages
from video_synth import VIDEOS, make_video

from mlx_smolvlm.generation import generate_step, load
from mlx_smolvlm.loading import load_model
from mlx_smolvlm.processing import load_processor

TOL = 1e-4  # float32, relative to the reference's largest magnitude (tests/test_model.py)


def test_stages_match_transformers_on_a_grid_that_leaves_pixels_unseen(tmp_path):
    pytest.importorskip("torch")
    # Tiles with a right half of padding (192 px: the mask edge falls inside patch 13) and an
    # all-padding image, as tests/test_model.py, at 384 px / 14 px.
    hf = build_model(PRESETS["tiny-p14"])
    hf.save_pretrained(tmp_path)
    inputs = make_inputs(PRESETS["tiny-p14"])
    ref = reference_outputs(hf, inputs)
    ours = our_stages(load_model(tmp_path), inputs)
    assert ours["connector"].shape[0] == 5 * 81
    for stage in ("vision_hidden", "connector", "embeds", "logits"):
        diff = max_rel_diff(ours[stage].astype(mx.float32), ref[stage])
        print(f"tiny-p14 {stage}: max rel diff {diff:.2e} (tol {TOL:.0e})")
        assert diff <= TOL, stage
    assert np.array_equal(np.array(ours["logits"].argmax(-1)), ref["logits"].argmax(-1))


def test_video_on_384_px_tiles(tmp_path):
    # SmolVLM2-2.2B's own defaults: frames of 384 (max_image_size), 81 tokens each.
    proc = load_processor(write_processor_folder(tmp_path / "proc", "smolvlm2", 384, 81))
    video = make_video(tmp_path / "v.mp4", *VIDEOS["short_24fps"])
    messages = [{"role": "user", "content": [{"type": "video", "path": str(video)},
                                             {"type": "text", "text": "What happens?"}]}]
    n_tokens = lambda out: int((out["input_ids"] == proc.image_token_id).sum())  # noqa: E731
    out = proc(messages)
    assert out["pixel_values"].shape == (1, 3, 3, 384, 384) and n_tokens(out) == 3 * 81
    small = proc(messages, frame_size=336)  # 8 x 42: an 8x8 token grid
    assert small["pixel_values"].shape[-1] == 336 and n_tokens(small) == 3 * 64
    with pytest.raises(ValueError, match="frame_size must be 384 or a multiple of 42 below it, got 300"):
        proc(messages, frame_size=300)


@pytest.fixture(scope="module")
def smolvlm2_2b(tmp_path_factory):
    """SmolVLM2-2.2B at its published widths (scripts/make_checkpoint.py), one layer per tower,
    with a processor folder of its geometry (384 tiles, 81 tokens, longest edge 1536)."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("smolvlm2-2.2b")
    hf = build_model(PRESETS["smolvlm2-2.2b"], layers=1)
    hf.save_pretrained(folder)
    write_processor_for_model(folder, json.loads((folder / "config.json").read_text()))
    return folder, hf


def test_published_widths_match_transformers(smolvlm2_2b, tmp_path):
    import torch
    from PIL import Image

    folder, hf = smolvlm2_2b
    image = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(image)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                             {"type": "text", "text": "What is in the image?"}]}]
    model, processor = load(folder)
    ours = processor(messages, do_image_splitting=False)
    ref = hf_processor(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"do_image_splitting": False},
    )
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"].numpy())
    assert ours["pixel_values"].shape[-2:] == (384, 384)

    steps = 8
    with torch.no_grad():
        feats = hf.model.get_image_features(ref["pixel_values"], ref["pixel_attention_mask"])
        seq = hf.generate(**ref, do_sample=False, max_new_tokens=steps, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)
    ref_feats = torch.cat(feats.pooler_output).numpy()
    ref_logprobs = torch.log_softmax(seq.logits[0][0], -1).numpy()
    ref_tokens = seq.sequences[0, ref["input_ids"].shape[1] :].tolist()

    ids = mx.array(ours["input_ids"])
    embeds = model.get_input_embeddings(ids, mx.array(ours["pixel_values"]),
                                        mx.array(ours["pixel_attention_mask"]))
    is_image = np.array(ids[0] == model.config.image_token_id)
    assert is_image.sum() == 81
    diff = max_rel_diff(embeds[0][mx.array(np.flatnonzero(is_image))], ref_feats)
    print(f"smolvlm2-2.2b (1 layer) image features: max rel diff {diff:.2e} (tol {TOL:.0e})")
    assert diff <= TOL
    out = list(generate_step(ids[0], model, input_embeddings=embeds, max_tokens=steps))
    diff = max_rel_diff(out[0][1], ref_logprobs)
    print(f"smolvlm2-2.2b (1 layer) last-position log-probs: max rel diff {diff:.2e} (tol {TOL:.0e})")
    assert diff <= TOL
    assert [t for t, _ in out] == ref_tokens
