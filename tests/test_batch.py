"""Continuous batching on the tiny checkpoint: the left-padded batch cache decodes each row
exactly as alone, sequences joining a running batch and leaving it early keep their solo
greedy tokens, the cross-request caches hit, and a cancelled sequence frees its rows."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_same_greedy, decided_steps

from mlx_smolvlm.batch import BatchEngine, SamplingParams, batch_generate
from mlx_smolvlm.errors import InvalidRequestError
from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.models.cache import BatchKVCache, make_prompt_cache
from mlx_smolvlm.sample_utils import make_logits_processors, make_sampler

MAX_TOKENS = 16
# A batched row and the same sequence alone differ in float32 summation order only (logits within
# 1e-5, test_batch_cache_rows_decode_as_alone): tokens are compared over the steps whose solo
# margin is wider than twice this (the tiny checkpoint's margins: 0.01 and up).
BATCH_MOVE = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_idefics3, sample_images):
    model, processor = load(tiny_idefics3)
    return model, processor, sample_images


def user(text, images=()):
    parts = [{"type": "image", "path": p} for p in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def prompts(images):
    system = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
    return [
        user("Describe this.", [images["wide.png"]]),
        user("Hello, how are you today?"),
        [system] + user("Compare them.", [images["square.png"], images["wide.png"]]),
        [system] + user("Tell me a story."),
        user("What is in it?", [images["wide.png"]]),  # the same image again: cache hits
    ]


def solo_run(model, processor, prompt, max_tokens=MAX_TOKENS):
    """The sequence decoded alone: its tokens and their log-probs."""
    rs = list(stream_generate(model, processor, prompt, max_tokens=max_tokens))
    return [r.token for r in rs], [r.logprobs for r in rs]


def test_batch_cache_rows_decode_as_alone(tiny):
    model = tiny[0]
    rng = [mx.random.randint(0, 512, (n,), key=mx.random.key(n)) for n in (5, 11, 3)]
    solo, rows = [], []
    for ids in rng:  # each prefilled alone, then one decode step alone
        cache = make_prompt_cache(model)
        model(input_ids=ids[None, :-1], cache=cache)
        rows.append([c.state for c in cache])
        solo.append(model(input_ids=ids[None, -1:], cache=cache)[0, -1])
    batch = [BatchKVCache.from_rows([r[i] for r in rows[:2]]) for i in range(len(model.layers))]
    for i, c in enumerate(batch):
        c.extend(BatchKVCache.from_rows([rows[2][i]]))  # a shorter row joins: padded on the left
    last = mx.array([[int(ids[-1])] for ids in rng])
    out = model(input_ids=last, cache=batch)[:, -1]
    for i in range(3):
        assert mx.allclose(out[i], solo[i], atol=1e-5).item()
    for c in batch:
        c.filter([1])  # the longest row stays; the padding column none needs goes
    assert batch[0].left == [0] and batch[0].idx == 11


def test_joining_and_leaving_keep_solo_tokens(tiny):
    model, processor, images = tiny
    ps = prompts(images)
    solo = [solo_run(model, processor, p, MAX_TOKENS - 4 * (i % 2)) for i, p in enumerate(ps)]
    engine = BatchEngine(model, processor, max_batch=3)
    out = [[] for _ in ps]

    def add(i):
        params = SamplingParams(MAX_TOKENS - 4 * (i % 2))  # odd ones finish early and leave
        engine.add(processor(ps[i]), params, lambda e: out[i].append(e.token))

    add(0)
    add(1)
    while len(engine.active) < 2 or len(out[0]) < 4:  # 0 and 1 are decoding when the others arrive
        engine.step()
    for i in range(2, len(ps)):
        add(i)
    sizes = []
    while engine.busy:
        engine.step()
        sizes.append(len(engine.active))
    assert max(sizes) == 3 and engine.cache is None
    for i, (tokens, logprobs) in enumerate(solo):
        assert len(out[i]) == len(tokens)
        assert_same_greedy(out[i], logprobs, tokens, BATCH_MOVE, at_least=8, what=f"batched row {i} vs solo")
    stats = engine.stats()
    assert stats["image_features"]["hits"] + stats["prefixes"]["hits"] > 0


def test_batch_generate_matches_generate(tiny):
    model, processor, images = tiny
    ps = prompts(images)[:3]
    texts = batch_generate(model, processor, ps, max_tokens=MAX_TOKENS, max_batch=2)
    for text, p in zip(texts, ps):
        tokens, logprobs = solo_run(model, processor, p)
        n = decided_steps(logprobs, BATCH_MOVE)
        assert n >= 8
        solo = processor.tokenizer.decode(tokens, skip_special_tokens=True)
        # equal over the decided steps (a token's text may end inside the next one's bytes)
        assert text == solo if n == len(tokens) else text.startswith(
            processor.tokenizer.decode(tokens[: n - 1], skip_special_tokens=True))


def test_cancel_frees_rows_within_one_step(tiny):
    model, processor, images = tiny
    engine = BatchEngine(model, processor)
    seqs = [engine.add(processor(p), SamplingParams(200), lambda e: None) for p in prompts(images)[:2]]
    while len(engine.active) < 2:
        engine.step()
    engine.cancel(seqs[0])
    engine.step()
    assert engine.active == [seqs[1]] and engine.cache[0].keys.shape[0] == 1
    engine.cancel(seqs[1])
    engine.step()
    assert not engine.busy and engine.cache is None


def test_seeded_sampling_repeats(tiny):
    model, processor, images = tiny
    engine = BatchEngine(model, processor)
    out = [[], []]
    p = SamplingParams(MAX_TOKENS, temperature=1.0, top_p=0.9, seed=7)
    for i in range(2):
        engine.add(processor(user("Hi")), p, lambda e, i=i: out[i].append(e.token))
    while engine.busy:
        engine.step()
    assert out[0] == out[1]


def test_a_long_prompt_joins_between_decode_steps(tiny):
    """While a long prompt is prefilled (one chunk per step), the running stream gets a token
    every step, and a short prompt that arrives behind it starts before it."""
    model, processor, images = tiny
    engine = BatchEngine(model, processor, prefill_step_size=8)
    out = {"run": [], "long": [], "short": []}

    def add(name, prompt, n=64):
        engine.add(processor(prompt), SamplingParams(n), lambda e: out[name].append(e.token))

    add("run", user("Hello, how are you today?"), 200)
    while not out["run"]:
        engine.step()
    add("long", user("Tell me everything. " * 12, [images["wide.png"]]))
    add("short", user("Hi"), 8)
    steps = 0
    while not out["long"]:
        n = len(out["run"])
        engine.step()
        steps += 1
        assert len(out["run"]) == n + 1  # no step without a token for the running stream
    assert steps > 10 and out["short"]  # many chunks; the short prompt went first
    while engine.busy:
        engine.step()
    tokens, logprobs = solo_run(model, processor, user("Tell me everything. " * 12, [images["wide.png"]]), 64)
    assert_same_greedy(out["long"], logprobs, tokens, BATCH_MOVE, at_least=8, what="long prompt joined in chunks")


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=5, seed=3), dict(temperature=0.8, min_p=0.1, seed=11),
                                dict(temperature=0.0, repetition_penalty=1.5, repetition_context_size=8),
                                dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3, seed=5)])
def test_batch_rows_sample_as_generate(tiny, kw):
    """One sampler factory and one logits-processor path: a row of the batch samples what
    stream_generate samples with the same settings (seed included)."""
    model, processor, images = tiny
    prompt = user("Describe this.", [images["wide.png"]])
    p = SamplingParams(MAX_TOKENS, **kw)
    sampler = make_sampler(p.temperature, p.top_p, p.top_k, p.min_p, p.seed)
    processors = make_logits_processors(p.repetition_penalty, p.repetition_context_size)
    rs = list(stream_generate(model, processor, prompt, max_tokens=MAX_TOKENS, sampler=sampler,
                              logits_processors=processors))
    engine, out = BatchEngine(model, processor), []
    engine.add(processor(prompt), p, lambda e: out.append(e.token))
    engine.add(processor(user("Hello, how are you today?")), SamplingParams(MAX_TOKENS, temperature=1.0),
               lambda e: None)  # another row beside it, sampled its own way
    while engine.busy:
        engine.step()
    if p.temperature == 0:  # greedy: compared where a float32 path cannot flip the choice
        assert_same_greedy(out, [r.logprobs for r in rs], [r.token for r in rs], BATCH_MOVE, at_least=8,
                           what=f"batch row vs generate, {kw}")
    else:  # the same key draws the same Gumbel noise: a flip needs two perturbed logits within rounding
        assert out == [r.token for r in rs]


def test_batch_path_checks_image_tokens_against_features(tiny):
    """The batch engine splices image features through the same count check as generate."""
    model, processor, images = tiny
    inputs = processor(user("Describe this.", [images["wide.png"]]))
    ids = inputs["input_ids"][0].tolist()
    ids.remove(model.config.image_token_id)  # one feature row would have no token
    inputs["input_ids"] = np.array([ids])
    engine, events = BatchEngine(model, processor), []
    engine.add(inputs, SamplingParams(4), events.append)
    while engine.busy:
        engine.step()
    assert [e.finish_reason for e in events] == ["error"] and "image tokens but the" in events[0].error


def test_max_tokens_beyond_the_context_is_cut_to_it(tiny):
    """The engine ends such an answer where the context does (finish_reason "length"), with the
    tokens solo generation gives; a prompt that fills the context is refused."""
    model, processor, images = tiny
    prompt = user("Hello, how are you today?")
    inputs = processor(prompt)
    n = inputs["input_ids"].shape[1]
    context = model.config.text_config.max_position_embeddings
    try:
        model.config.text_config.max_position_embeddings = n + 5
        events = []
        engine = BatchEngine(model, processor)
        engine.add(inputs, SamplingParams(max_tokens=10**6), events.append)
        while engine.busy:
            engine.step()
        assert [e.token for e in events] == solo_run(model, processor, prompt, 5)[0]
        assert events[-1].finish_reason == "length"
        model.config.text_config.max_position_embeddings = n
        with pytest.raises(InvalidRequestError, match="no room left in the model's context length"):
            engine.add(inputs, SamplingParams(), events.append)
    finally:
        model.config.text_config.max_position_embeddings = context
