"""The 2.2B geometry (SmolVLM-Instruct, SmolVLM2-2.2B-Instruct): 384-px tiles, 14-px patches.

384 = 27 x 14 + 6: the reference's stride-14 conv sees a 27x27 patch grid, its unfold-based
patch mask drops the last 6 pixels, and the 3x3 pixel shuffle gives 81 tokens per tile.
Live against transformers (needs torch): the geometry at tiny widths over every mask case
(padding whose edge falls inside a patch, an all-padding image). The published 2.2B widths run
in the conformance matrix (tests/test_conformance.py).
"""

import mlx.core as mx
import numpy as np
import pytest
from make_checkpoint import PRESETS, build_model
from make_golden import make_inputs, reference_outputs
from make_tokenizer import write_processor_folder
from helpers import assert_same_argmax, max_rel_diff, our_stages
from video_synth import VIDEOS, make_video

from mlx_smolvlm.errors import InvalidRequestError
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
    move = TOL * max(1.0, float(np.abs(ref["logits"]).max()))  # what TOL lets a logit move
    assert_same_argmax(np.array(ours["logits"].astype(mx.float32)), ref["logits"], move,
                       at_least=ref["logits"].shape[-2] // 2, what="tiny-p14 logits")


def test_video_on_384_px_tiles(tmp_path):
    # SmolVLM2-2.2B's own defaults: frames of 384 (max_image_size), 81 tokens each.
    proc = load_processor(write_processor_folder(tmp_path / "proc", "smolvlm2", 384, 81))
    assert proc.video_options.frame_size == 384
    # The first resize (to the 1536-px longest edge) does not change the tokens; skip its cost.
    proc.video_options.longest_edge = 384
    video = make_video(tmp_path / "v.mp4", *VIDEOS["short_24fps"])
    messages = [{"role": "user", "content": [{"type": "video", "path": str(video)},
                                             {"type": "text", "text": "What happens?"}]}]
    n_tokens = lambda out: int((out["input_ids"] == proc.image_token_id).sum())  # noqa: E731
    out = proc(messages)
    assert out["pixel_values"].shape == (1, 3, 3, 384, 384) and n_tokens(out) == 3 * 81
    small = proc(messages, frame_size=336)  # 8 x 42: an 8x8 token grid
    assert small["pixel_values"].shape[-1] == 336 and n_tokens(small) == 3 * 64
    with pytest.raises(InvalidRequestError, match="frame_size must be 384 or a multiple of 42 below it, got 300"):
        proc(messages, frame_size=300)
