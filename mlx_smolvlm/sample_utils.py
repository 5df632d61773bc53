"""Samplers and logits processors, as callables (the mlx-lm contract).

A sampler maps log-probabilities (B, V) to token ids (B,). A logits processor maps
(tokens so far, logits (B, V)) to logits. Filters follow transformers' order:
temperature, then top-k, top-p, min-p.
"""

from functools import partial
from typing import Callable

import mlx.core as mx

from .errors import InvalidRequestError

NEG_INF = float("-inf")


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[..., -k][..., None]
    return mx.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches `p`."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
    # A token stays if the mass before it is still short of p (so the top token always stays).
    drop_sorted = (mx.cumsum(probs, axis=-1) - probs) >= p
    drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
    return mx.where(drop, NEG_INF, logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens less likely than `min_p` times the most likely one."""
    if min_p <= 0.0:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    floor = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p))
    return mx.where(logprobs < floor, NEG_INF, logits)


def filtered_logits(logprobs: mx.array, temp: float, top_k: int, top_p: float, min_p: float) -> mx.array:
    """The logits a sampling sampler draws from: tempered, then filtered."""
    logits = logprobs / temp
    return apply_min_p(apply_top_p(apply_top_k(logits, top_k), top_p), min_p)


def categorical(logprobs: mx.array, temp: float, top_k: int, top_p: float, min_p: float, key=None) -> mx.array:
    return mx.random.categorical(filtered_logits(logprobs, temp, top_k, top_p, min_p), axis=-1, key=key)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None
) -> Callable:
    """A sampler: greedy when `temp` is 0, else sampling from the filtered distribution.

    With a `seed` the sampler draws from its own random key (split once per token), so the
    same seed gives the same tokens wherever the sampler runs: the CLI, `stream_generate`,
    one row of the server's batch. Without one it draws from MLX's global generator."""
    if temp < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {temp}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= min_p < 1.0:
        raise InvalidRequestError(f"min_p must be in [0, 1), got {min_p}")
    if temp == 0:
        return greedy
    draw = partial(categorical, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    if seed is None:
        return draw
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, k = mx.random.split(key)
        return draw(logprobs, key=k)

    sample.draw, sample.seed = draw, seed  # what speculative decoding's acceptance rule needs
    return sample


def penalize_repetition(tokens: mx.array, logits: mx.array, penalty: float, context_size: int) -> mx.array:
    """transformers' RepetitionPenaltyLogitsProcessor over the last `context_size` tokens."""
    if tokens.size == 0:
        return logits
    ctx = tokens[-context_size:] if context_size else tokens
    scores = logits[:, ctx]
    scores = mx.where(scores < 0, scores * penalty, scores / penalty)
    logits[:, ctx] = scores
    return logits


def make_logits_processors(
    repetition_penalty: float | None = None, repetition_context_size: int | None = 20
) -> list[Callable]:
    """Logits processors; `repetition_context_size` None or 0 means the whole context."""
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    if repetition_penalty <= 0:
        raise InvalidRequestError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if repetition_context_size is not None and repetition_context_size < 0:
        raise InvalidRequestError(f"repetition_context_size must be >= 0, got {repetition_context_size}")
    return [partial(penalize_repetition, penalty=repetition_penalty, context_size=repetition_context_size)]


def sample_next(logits: mx.array, context: mx.array | None, sampler: Callable, processors: list[Callable] | None):
    """(1, V) logits of one sequence -> (token (1,), logprobs (1, V)): its logits processors
    (given `context`, the ids so far), then its sampler. Both generate_step and each row of
    the batch engine take their tokens here."""
    for p in processors or ():
        logits = p(context, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs
