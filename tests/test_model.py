"""Per-stage parity with transformers' SmolVLM / Idefics3 on tiny random checkpoints.

The reference outputs come live from transformers when torch is importable (CI), else from
the committed golden fixtures (scripts/make_golden.py). Live runs also check that the fixtures
are current. Tolerances, relative to the reference's largest magnitude in each stage:
float32 1e-4 (aim: unit-scale activations, max abs diff <= 1e-4), bfloat16 3e-2 (two
independent bf16 pipelines, each rounding every layer's output to 8 bits of mantissa).
"""

import importlib.util
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_agrees, assert_same_argmax, check_inputs, max_rel_diff, our_stages
from provenance import read_stamp

from mlx_smolvlm.loading import load_model
from mlx_smolvlm.models.cache import make_prompt_cache

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ("tiny-idefics3", "tiny-smolvlm")
TOL = {"float32": 1e-4, "bfloat16": 3e-2}
HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers")


def reference(name: str, dtype: str):
    """(inputs, live outputs or None without torch, golden outputs, golden provenance)."""
    golden = np.load(FIXTURES / name / "golden.npz")
    inputs = {k[len("input.") :]: golden[k] for k in golden.files if k.startswith("input.")}
    stored = {k[len(dtype) + 1 :]: golden[k] for k in golden.files if k.startswith(dtype + ".")}
    record = read_stamp(golden)
    check_inputs(f"{name}/golden.npz", record, {"weights": FIXTURES / name / "model.safetensors", **inputs})
    if not HAS_TORCH:
        return inputs, None, stored, record
    from make_golden import load_reference, reference_outputs

    return inputs, reference_outputs(load_reference(FIXTURES / name, dtype), inputs), stored, record


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TINY)
def test_stages_match_transformers(name, dtype):
    inputs, live, stored, record = reference(name, dtype)
    model = load_model(FIXTURES / name, dtype=getattr(mx, dtype))
    ours = our_stages(model, inputs)
    for stage in ("vision_hidden", "connector", "embeds", "logits"):
        got = np.array(ours[stage].astype(mx.float32))
        ref = stored[stage] if live is None else live[stage]
        print(f"{name} {dtype} {stage}: max diff {max_rel_diff(got, ref):.2e} (tol {TOL[dtype]:.0e}, "
              f"{'golden' if live is None else 'live'})")
        # a stale golden would make a run without torch meaningless: both are checked
        assert_agrees(f"{name}/golden.npz {dtype}/{stage}", got, live=None if live is None else live[stage],
                      golden=stored[stage], same=lambda a, b: max_rel_diff(a, b) <= TOL[dtype], record=record)


@pytest.mark.parametrize("name", TINY)
def test_greedy_tokens_match_reference(name):
    inputs, live, stored, _ = reference(name, "float32")
    model = load_model(FIXTURES / name)
    logits = model(mx.array(inputs["input_ids"]), mx.array(inputs["pixel_values"]),
                   mx.array(inputs["pixel_attention_mask"]))
    ref = (stored if live is None else live)["logits"]
    # Logits within TOL of the reference's largest: argmax compared where that cannot flip it.
    move = TOL["float32"] * max(1.0, float(np.abs(ref).max()))
    assert_same_argmax(np.array(logits), ref, move, at_least=ref.shape[-2] // 2, what=name)


@pytest.mark.parametrize("name", TINY)
def test_cached_decode_equals_full_forward(name):
    inputs = reference(name, "float32")[0]
    model = load_model(FIXTURES / name)
    ids = mx.array(inputs["input_ids"])
    pv, pam = mx.array(inputs["pixel_values"]), mx.array(inputs["pixel_attention_mask"])
    full = model(ids, pv, pam)
    embeds = model.get_input_embeddings(ids, pv, pam)
    cache = make_prompt_cache(model)
    # A prefill chunk covering the images, a second chunk, then one token at a time.
    split = [0, 12, 15] + list(range(16, ids.shape[1] + 1))
    steps = [model(cache=cache, input_embeddings=embeds[:, a:b]) for a, b in zip(split, split[1:])]
    diff = max_rel_diff(mx.concatenate(steps, axis=1), full)
    print(f"{name} cached decode vs full forward: max diff {diff:.2e} (tol 1e-4)")
    assert diff <= 1e-4
    assert cache[0].offset == ids.shape[1]


def test_vision_batches_do_not_change_features():
    model = load_model(FIXTURES / "tiny-idefics3")
    T = model.config.image_seq_len
    pv = mx.random.uniform(-1, 1, (1, 11, 3, 32, 32), key=mx.random.key(0))
    ids = mx.array([[1] + [300] * (11 * T) + [2]])
    whole = model.get_input_embeddings(ids, pv)
    model.vision_batch_size = 3  # 11 images -> batches of 3, 3, 3, 2
    # Equal up to float32 rounding: a BLAS (OpenBLAS, mlx_smolvlm/blas.py) may block a matmul
    # differently for another number of rows.
    assert mx.allclose(model.get_input_embeddings(ids, pv), whole, rtol=1e-5, atol=1e-5)
