"""What several test files share: comparisons with a reference, and golden fixtures that
cannot go stale silently.

A test compares our output with the live reference (transformers, when installed) and with the
committed golden. When they disagree, `assert_agrees` says which of the three moved: ours, the
reference (a new transformers / torch / av than the golden was made with), or the golden's inputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from provenance import digest, versions

from mlx_smolvlm.models.vision import patch_attention_mask

ROOT = Path(__file__).resolve().parent.parent
CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def describe(record: dict | None) -> str:
    if not record:
        return "no provenance recorded"
    v = record.get("versions", {})
    made = ", ".join(f"{k} {v[k]}" for k in ("transformers", "torch", "torchvision", "av") if k in v)
    return f"made by {record.get('made_by', '?')} with {made}"


def now() -> str:
    v = versions()
    return ", ".join(f"{k} {v[k]}" for k in ("transformers", "torch", "torchvision", "av") if k in v)


def check_inputs(name: str, record: dict | None, inputs: dict):
    """The golden was made from exactly these inputs (digests), else say so and how to remake it."""
    assert record is not None, f"golden {name} has no provenance: regenerate it"
    stored = record["inputs"]
    moved = [k for k, v in inputs.items() if stored.get(k) != digest(v)]
    assert not moved, (f"golden {name} was made from other inputs than the test has ({', '.join(moved)} "
                       f"differ; {describe(record)}): regenerate with {record['made_by']}")


def assert_agrees(name, ours, *, live=None, golden=None, same, record=None, detail=""):
    """`same(a, b) -> bool`. Ours must match every reference present; otherwise name who moved."""
    assert live is not None or golden is not None, f"{name}: neither a live reference nor a golden"
    ok_live = live is None or same(ours, live)
    ok_golden = golden is None or same(ours, golden)
    if ok_live and ok_golden:
        return
    made, current = describe(record), now()
    if live is not None and golden is not None:
        if ok_live:
            why = (f"the golden is stale: ours and the live reference ({current}) agree, the golden "
                   f"({made}) differs: the reference or its inputs moved since it was made; "
                   f"regenerate it with {record.get('made_by') if record else 'its writer'}")
        elif ok_golden:
            why = (f"the live reference moved: ours matches the golden ({made}) but not the live "
                   f"reference ({current}); scripts/drift_check.py shows what changed upstream")
        elif same(live, golden):
            why = "ours moved: the live reference and the golden agree, ours differs from both"
        else:
            why = f"ours, the live reference ({current}) and the golden ({made}) all differ"
    elif live is not None:
        why = f"ours differs from the live reference ({current})"
    else:
        why = f"ours differs from the golden ({made}); no live reference here to tell which moved"
    raise AssertionError(f"{name}: {why}{detail}")

def max_rel_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float32), np.asarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def our_stages(model, inputs: dict) -> dict:
    ids = mx.array(inputs["input_ids"])
    pv, pam = mx.array(inputs["pixel_values"]), mx.array(inputs["pixel_attention_mask"])
    B, N, C, H, W = pv.shape
    # The reference drops all-zero padding images before the vision tower; so do we.
    real = np.flatnonzero(np.abs(inputs["pixel_values"]).reshape(B * N, -1).sum(-1) > 0)
    pixels = pv.reshape(B * N, C, H, W)[mx.array(real)].transpose(0, 2, 3, 1)
    pmask = patch_attention_mask(pam.reshape(B * N, H, W)[mx.array(real)], model.config.vision_config.patch_size)
    dtype = model.model.vision_model.embeddings.patch_embedding.weight.dtype
    vision = model.model.vision_model(pixels.astype(dtype), pmask)
    connector = model.model.connector(vision)
    embeds = model.get_input_embeddings(ids, pv, pam)
    return {
        "vision_hidden": vision,
        "connector": connector.reshape(-1, connector.shape[-1]),
        "embeds": embeds,
        "logits": model(ids, pv, pam),
    }


def cli(*args, stdin=None, timeout=120):
    cmd = [sys.executable, "-m", "mlx_smolvlm.generate", *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=CLI_ENV)


# Greedy tokens compared only where the decision is not a coin toss.
# Two numeric paths to the same logits (another OpenBLAS kernel, batched vs solo, a quantized KV
# cache, ours vs transformers or mlx-vlm, a reused cache vs a fresh prefill) each put every
# log-prob within `move` of the other. A greedy step whose top-1 minus top-2 log-prob margin is at
# most 2 * `move` may then pick either token: on another CPU the test would flip. So tokens are
# compared up to the first such step, and the test states how many steps that was and asks for a
# minimum, so that it cannot pass by comparing nothing.



def margins(logprobs) -> np.ndarray:
    """Top-1 minus top-2 log-prob (or logit) at each step of (steps, vocab) scores."""
    x = np.stack([np.asarray(s.astype(mx.float32) if isinstance(s, mx.array) else s, dtype=np.float64).reshape(-1)
                  for s in logprobs])
    top2 = np.partition(x, -2, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def decided_steps(logprobs, move: float) -> int:
    """How many leading steps have a margin above 2 * `move`: steps no path within `move` flips."""
    small = np.flatnonzero(margins(logprobs) <= 2 * move)
    return int(small[0]) if small.size else len(logprobs)


def assert_same_greedy(ours, logprobs, theirs, move: float, *, at_least: int = 1, what: str = "") -> int:
    """`ours` (greedy tokens, with the log-probs they were picked from) equals `theirs` over the
    steps `move` cannot flip, and there are at least `at_least` of them. Returns that count."""
    ours, theirs = list(ours), list(theirs)
    m = margins(logprobs)
    n = decided_steps(logprobs, move)
    print(f"{what}: tokens compared over {n} of {len(ours)} steps (margin > 2 x {move:g}; "
          f"smallest margin {m.min():.3g} at step {int(m.argmin())})")
    assert n >= at_least, (f"{what}: only {n} steps have a top-1 minus top-2 margin above 2 x {move:g} "
                           f"(margins {np.round(m[: n + 1], 4).tolist()}): a near-tie, not a test")
    assert ours[:n] == theirs[:n], f"{what}: greedy tokens differ within the decided steps: {ours} vs {theirs}"
    return n


def assert_same_argmax(ours, ref, move: float, *, at_least: int = 1, what: str = "") -> int:
    """Per-position argmax of one forward's logits (..., vocab) equal wherever the reference's
    top-1 minus top-2 margin is wider than twice `move`; at least `at_least` such positions."""
    ours = np.asarray(ours, dtype=np.float64).reshape(-1, np.shape(ours)[-1])
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, np.shape(ref)[-1])
    wide = margins(ref) > 2 * move
    print(f"{what}: argmax compared at {int(wide.sum())} of {len(ref)} positions (margin > 2 x {move:.2g})")
    assert wide.sum() >= at_least, f"{what}: only {int(wide.sum())} positions are not near-ties"
    differ = np.flatnonzero(wide & (ours.argmax(-1) != ref.argmax(-1)))
    assert differ.size == 0, f"{what}: argmax differs at decided positions {differ.tolist()}"
    return int(wide.sum())
