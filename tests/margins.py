"""Greedy tokens compared only where the decision is not a coin toss.

Two numeric paths to the same logits (another OpenBLAS kernel, batched vs solo, a quantized KV
cache, ours vs transformers or mlx-vlm, a reused cache vs a fresh prefill) each put every
log-prob within `move` of the other. A greedy step whose top-1 minus top-2 log-prob margin is at
most 2 * `move` may then pick either token: on another CPU the test would flip. So tokens are
compared up to the first such step, and the test states how many steps that was and asks for a
minimum, so that it cannot pass by comparing nothing.
"""

import numpy as np


def margins(logprobs) -> np.ndarray:
    """Top-1 minus top-2 log-prob (or logit) at each step of (steps, vocab) scores."""
    x = np.stack([np.asarray(s, dtype=np.float64).reshape(-1) for s in logprobs])
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
