"""Golden fixtures for tests/test_video.py from transformers' SmolVLM video processor.

Two parts, each recording its provenance (versions, input digests: scripts/provenance.py):

    # pixels, frame indices, prompt ids: the reference needs torchvision (>= 0.27 for CPU
    # Lanczos), which does not install beside the pinned CPU torch, so use a separate venv:
    python -m venv /work/refenv && /work/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refenv/bin/pip install -c constraints.txt transformers av num2words pillow numpy
    python scripts/make_tokenizer.py /tmp/tok --layout smolvlm2
    /work/refenv/bin/python scripts/make_video_golden.py pixels /tmp/tok

    # greedy generation of the tiny SmolVLM2 on a video (the pinned test environment)
    python scripts/make_video_golden.py generation

The videos are the committed tests/fixtures/video/media/*.mp4 (scripts/video_synth.py):
x264 output differs between machines, so the inputs are shipped, not re-encoded. Decoding uses
PyAV (`backend="pyav"`), as the reference's `read_video_pyav`.
"""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from provenance import stamp  # noqa: E402
from video_synth import shipped  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "video"
# The SmolVLM2-256M/500M preprocessor config (video part) and a small one for cheap pixel goldens.
REAL = {
    "size": {"longest_edge": 2048},
    "max_image_size": {"longest_edge": 512},
    "resample": 1,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}
SMALL = {**REAL, "size": {"longest_edge": 160}, "max_image_size": {"longest_edge": 48}}
# (total_frames, video_fps, fps, max_frames, skip_secs) for the sampling table
SAMPLING = [
    (t, vf, f, m, s)
    for t, vf in [(1, 30), (2, 24), (72, 24), (75, 25), (100, 29.97), (2100, 30), (3000, 23.976), (7201, 60)]
    for f, m in [(1, 64), (2, 8), (0.5, 64), (24, 1000), (1, 1), (4, 16), (0.1, 64)]
    for s in [1, 0, 2.5]
]


def reference_processors(tokenizer_folder):
    from transformers import AutoTokenizer, SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    image_cfg = json.loads((Path(tokenizer_folder) / "preprocessor_config.json").read_text())
    image_cfg.pop("image_processor_type", None)
    image_cfg.pop("processor_class", None)
    vp_real = SmolVLMVideoProcessor(**REAL)
    proc = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil(**image_cfg),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder),
        video_processor=vp_real,
        image_seq_len=64,
    )
    return proc, vp_real, SmolVLMVideoProcessor(**SMALL)


def ref_load(path, vp, **kw):
    from transformers.video_utils import load_video

    return load_video(
        str(path), backend="pyav", sample_indices_fn=lambda metadata, **k: vp.sample_frames(metadata, **kw)
    )


def ref_pixels(vp, frames, meta):
    out = vp(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="np")
    pv = out["pixel_values"][0]
    u8 = np.round(pv * 127.5 + 127.5).astype(np.uint8)
    assert np.array_equal((u8.astype(np.float32) - 127.5) / 127.5, pv), "reference output is not uint8-exact"
    return u8.transpose(0, 2, 3, 1)  # (N, S, S, 3): the normalized values are (u8 - 127.5) / 127.5


def main(tokenizer_folder):
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    proc, vp_real, vp_small = reference_processors(tokenizer_folder)
    arrays, meta_json = {}, {"sampling": [], "videos": {}, "prompts": {}}

    for t, vf, f, m, s in SAMPLING:
        md = VideoMetadata(total_num_frames=t, fps=vf, duration=t / vf)
        idx = vp_real.sample_frames(md, num_frames=m, fps=f, skip_secs=s)
        meta_json["sampling"].append([t, vf, f, m, s, [int(i) for i in idx]])

    videos = shipped()
    meta_json["provenance"] = stamp("scripts/make_video_golden.py pixels", videos)
    loaded = {}
    for name, path in videos.items():
        frames, md = ref_load(path, vp_real, num_frames=64, fps=1)
        loaded[name] = (frames, md)
        meta_json["videos"][name] = {
            "indices": [int(i) for i in md.frames_indices],
            "timestamps": md.timestamps,
            "duration": md.duration,
            "fps": md.fps,
            "total_frames": md.total_num_frames,
        }
        arrays[f"{name}/decoded"] = frames  # the resize goldens start from these
        arrays[f"{name}/small"] = ref_pixels(vp_small, frames, md)
    # one clip through the real two-step resize (2048 longest edge, then 512 square)
    arrays["short_24fps/real"] = ref_pixels(vp_real, *loaded["short_24fps"])[:1]
    # 64 frames: the test decodes and checks indices only
    arrays.pop("long_30fps/decoded"), arrays.pop("long_30fps/small")

    image = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))[..., None].repeat(3, -1))
    arrays["image"] = np.asarray(image)
    text_block = {"type": "text", "text": "What happens?"}
    short, long_ = {"type": "video", "path": "short_24fps"}, {"type": "video", "path": "long_30fps"}
    cases = {
        "one_video": ([{"role": "user", "content": [short, text_block]}], ["short_24fps"], []),
        "video_then_image": (
            [{"role": "user", "content": [short, {"type": "image"}, text_block]}],
            ["short_24fps"],
            [image],
        ),
        "later_turn": (
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A ramp."}]},
                {"role": "user", "content": [{"type": "text", "text": "And this?"}, long_]},
            ],
            ["long_30fps"],
            [image],
        ),
        # Each video alone: with two videos the reference pads both to the longer one's
        # frame count and writes that count in both intros (see test_two_videos).
        "two_videos": ([{"role": "user", "content": [short, long_, text_block]}], ["short_24fps", "long_30fps"], []),
    }
    for case, (messages, vids, images) in cases.items():
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        out = proc(
            text=text,
            images=[images] if images else None,
            videos=[loaded[v][0] for v in vids],
            video_metadata=[loaded[v][1] for v in vids],
            do_sample_frames=False,
            return_tensors="np",
        )
        meta_json["prompts"][case] = {"messages": messages, "videos": vids, "images": len(images),
                                      "input_ids": out["input_ids"][0].tolist()}
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "golden.npz", **arrays)
    (OUT / "golden.json").write_text(json.dumps(meta_json))
    print({k: v.shape for k, v in arrays.items()})
    print(f"wrote {OUT}: {sum(p.stat().st_size for p in OUT.iterdir())} bytes")


# --- greedy generation of the tiny SmolVLM2 on a video

TINY = ROOT / "tests" / "fixtures" / "tiny-smolvlm"
GENERATION = OUT / "generation.json"
GENERATION_CASES = {"default": {}, "frame_size_24": {"frame_size": 24}}
STEPS = 8


def tiny_inputs(video, folder, **controls):
    """Our processor's inputs for one question about `video` (ids and pixels equal the
    reference's: test_video checks that separately)."""
    from make_tokenizer import write_processor_for_model

    from mlx_smolvlm.processing import load_processor

    config = json.loads((TINY / "config.json").read_text())
    proc = load_processor(write_processor_for_model(Path(folder) / "tiny", config))
    messages = [{"role": "user", "content": [
        {"type": "video", "path": str(video)},
        {"type": "text", "text": "What is in this video?"},
    ]}]
    return proc(messages, **controls)


def reference_greedy(inputs):
    """transformers' greedy tokens and last-position logits, or None without torch."""
    try:
        import torch
        from make_golden import load_reference
    except ImportError:
        return None
    model = load_reference(TINY)
    model.generation_config.eos_token_id = None  # compare a fixed number of steps
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**t, max_new_tokens=STEPS, do_sample=False)
        logits = model(**t).logits[0, -1]
    return {"tokens": out[0, inputs["input_ids"].shape[1] :].tolist(), "logits": logits.tolist()}


def generation_inputs_record(inputs) -> dict:
    return {"video": shipped()["short_24fps"], "weights": TINY / "model.safetensors",
            **{k: inputs[k] for k in ("input_ids", "pixel_values")}}


def write_generation():
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for case, controls in GENERATION_CASES.items():
            inputs = tiny_inputs(shipped()["short_24fps"], d, **controls)
            out[case] = reference_greedy(inputs)
            out[case]["provenance"] = stamp("scripts/make_video_golden.py generation",
                                            generation_inputs_record(inputs))
    GENERATION.write_text(json.dumps(out))
    print({case: v["tokens"] for case, v in out.items()})


if __name__ == "__main__":
    if sys.argv[1:2] == ["pixels"]:
        main(sys.argv[2])
    elif sys.argv[1:2] == ["generation"]:
        write_generation()
    else:
        sys.exit("usage: make_video_golden.py pixels TOKENIZER_FOLDER | generation")
