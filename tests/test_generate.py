"""The generate loop end to end on tiny checkpoints: greedy parity with transformers'
`generate(do_sample=False)` (one tiled image, two images, two chat turns, text only),
chunked prefill, cache reuse, stop conditions, streaming text and the samplers.

References come live from transformers when torch is importable, else from
tests/fixtures/generate_golden.json (scripts/make_generate_golden.py); live runs also check
that the fixture is current.
"""

import copy
from dataclasses import dataclass
import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_agrees, assert_same_greedy, decided_steps
from make_generate_golden import GOLDEN, SCENARIOS, TINY, TINY_MAX_TOKENS, assistant, reply_text
from make_generate_golden import scenario_turns, tiny_folder, user, write_images

from mlx_smolvlm.chat_cache import ChatCache
from mlx_smolvlm.detokenizer import StreamingDetokenizer
from mlx_smolvlm.errors import InvalidRequestError
from mlx_smolvlm.generate import generate, load, stream_generate
from mlx_smolvlm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors
from mlx_smolvlm.sample_utils import make_sampler
from mlx_smolvlm.text_stream import TextStream

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers")
# Our float32 log-probs and transformers' (or another chunking's) differ by summation order
# (test_model.py: logits within 1e-4 of the largest): greedy tokens are compared over the steps
# whose margin is wider than twice this. tiny-idefics3's margins are 0.01 and up.
TOKENS_MOVE = 1e-3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@dataclass
class Tiny:
    folder: object
    model: object
    processor: object
    live: dict | None  # transformers' generations, when torch is installed
    golden: dict
    record: dict  # what the golden was made from

    @property
    def ref(self):
        return self.golden if self.live is None else self.live


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, images):
    golden = json.loads(GOLDEN.read_text())
    out = {}
    for name in TINY:
        folder = tiny_folder(name, tmp_path_factory.mktemp(name))
        model, processor = load(folder)
        live = None
        if HAS_TORCH:
            from make_generate_golden import hf_tiny_generations

            live = hf_tiny_generations(folder, images, sorted(processor.tokenizer.eos_token_ids))
        out[name] = Tiny(folder, model, processor, live, golden["tiny"][name], golden["provenance"])
    return out


def run_turns(model, processor, turns, **kwargs):
    """Our side of a scenario: one ChatCache across the turns, as the CLI's --chat."""
    cache, messages, results = ChatCache(model), [], []
    for turn in turns:
        messages += turn
        responses = list(stream_generate(model, processor, messages, max_tokens=TINY_MAX_TOKENS,
                                         prompt_cache=cache, **kwargs))
        tokens = [r.token for r in responses]
        results.append((processor(messages)["input_ids"][0].tolist(), tokens, responses))
        messages.append(assistant(reply_text(processor.tokenizer, tokens)))
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", TINY)
def test_greedy_matches_transformers(tiny, images, name, scenario):
    t = tiny[name]
    results = run_turns(t.model, t.processor, scenario_turns(scenario, images))
    ours = [{"input_ids": ids, "tokens": tokens} for ids, tokens, _ in results]
    for i, ((ids, tokens, responses), expected) in enumerate(zip(results, t.ref[scenario])):
        print(f"{name} {scenario} turn {i}: {len(ids)} prompt tokens "
              f"({responses[-1].cached_tokens} cached), {len(tokens)} generated, equal: "
              f"{tokens == expected['tokens']} ({'golden' if t.live is None else 'live'})")
    decided = [decided_steps([r.logprobs for r in responses], TOKENS_MOVE) for _, _, responses in results]
    assert min(decided) >= 12, decided

    def same(a, b):
        return len(a) == len(b) and all(x["input_ids"] == y["input_ids"] and x["tokens"][:n] == y["tokens"][:n]
                                        for x, y, n in zip(a, b, decided))

    # ids and greedy tokens (over the decided steps) equal transformers' (live) and the golden,
    # or the message says which moved
    assert_agrees(f"generate_golden.json {name}/{scenario}", ours, same=same,
                  live=None if t.live is None else t.live[scenario], golden=t.golden[scenario], record=t.record)
    if scenario == "two_turns":
        # The second turn prefills only what follows the cached first turn.
        first_prompt = len(results[0][0])
        assert results[1][2][-1].cached_tokens >= first_prompt


def test_raw_prompt_with_images_equals_messages(tiny, images):
    t = tiny["tiny-idefics3"]
    model, processor, ref = t.model, t.processor, t.ref
    messages = scenario_turns("tiled", images)[0]
    prompt = processor.apply_chat_template(messages)
    rs = list(stream_generate(model, processor, prompt, [images["wide.png"]], max_tokens=TINY_MAX_TOKENS))
    assert_same_greedy([r.token for r in rs], [r.logprobs for r in rs], ref["tiled"][0]["tokens"], TOKENS_MOVE,
                       at_least=12, what="raw prompt vs reference")


def test_chunked_prefill_gives_the_same_tokens(tiny, images):
    t = tiny["tiny-idefics3"]
    model, processor, ref = t.model, t.processor, t.ref
    turns = scenario_turns("two_images", images)
    (_, tokens, rs), = run_turns(model, processor, turns, prefill_step_size=7)
    assert_same_greedy(tokens, [r.logprobs for r in rs], ref["two_images"][0]["tokens"], TOKENS_MOVE,
                       at_least=12, what="chunks of 7 vs reference")


def test_chunked_prefill_bounds_peak_memory(tiny):
    model, processor = tiny["tiny-idefics3"].model, tiny["tiny-idefics3"].processor
    prompt = "the cat sat on the mat. " * 110  # ~1,500 tokens (tiny vocabulary) of a 2,048 context

    def run(step):
        rs = list(stream_generate(model, processor, prompt, max_tokens=4, prefill_step_size=step))
        return [r.token for r in rs], rs[-1].peak_memory, [r.logprobs for r in rs]

    (whole, whole_peak, logprobs), (chunked, chunked_peak, _) = run(4096), run(128)
    print(f"{len(processor(prompt)['input_ids'][0])}-token prompt: peak {whole_peak * 1e3:.1f} MB in one "
          f"chunk, {chunked_peak * 1e3:.1f} MB in chunks of 128")
    assert_same_greedy(chunked, logprobs, whole, TOKENS_MOVE, at_least=4, what="chunks of 128 vs one")
    assert chunked_peak < whole_peak / 2


def test_stream_and_generate_agree_and_stop_reasons(tiny, images):
    t = tiny["tiny-idefics3"]
    model, processor, ref = t.model, t.processor, t.ref
    messages = scenario_turns("tiled", images)[0]
    responses = list(stream_generate(model, processor, messages, max_tokens=10))
    assert [r.finish_reason for r in responses] == [None] * 9 + ["length"]
    text = "".join(r.text for r in responses)
    assert text == generate(model, processor, messages, max_tokens=10)
    assert text == processor.tokenizer.decode([r.token for r in responses], skip_special_tokens=True)
    r = responses[-1]
    assert r.prompt_tokens == len(ref["tiled"][0]["input_ids"]) and r.generation_tokens == 10
    assert r.prompt_tps > 0 and r.generation_tps > 0 and r.peak_memory > 0

    # A token declared end-of-utterance ends generation there, and its text is not emitted.
    eos = ref["tiled"][0]["tokens"][5]
    responses = list(stream_generate(model, with_eos(processor, eos), messages, max_tokens=20))
    assert responses[-1].finish_reason == "stop" and responses[-1].token == eos
    assert len(responses) == ref["tiled"][0]["tokens"].index(eos) + 1


def with_eos(processor, eos: int):
    p = copy.copy(processor)
    p.tokenizer = copy.copy(processor.tokenizer)
    p.tokenizer.eos_token_ids = {eos}
    return p


def test_stop_strings_end_the_text_and_are_never_streamed(tiny, images):
    model, processor = tiny["tiny-idefics3"].model, tiny["tiny-idefics3"].processor
    messages = scenario_turns("text_only", images)[0]
    full = generate(model, processor, messages, max_tokens=24)
    assert len(full) >= 6
    stop = full[len(full) // 2 :][:2]
    cut = full.index(stop)
    responses = list(stream_generate(model, processor, messages, max_tokens=24, stop=["\x00never", stop]))
    assert "".join(r.text for r in responses) == full[:cut]
    assert responses[-1].finish_reason == "stop"


def test_a_stop_string_that_is_one_token_stops_on_it_even_when_skipped(tiny):
    """`<image>` is a named special token: never text with skip_special_tokens, yet as a stop
    string it ends generation on the token, kept or skipped, and is not in the text."""
    tok = tiny["tiny-idefics3"].processor.tokenizer
    ids = tok.encode("Hello there") + tok.encode("<image>") + tok.encode(" after")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello there after"
    for skip in (True, False):
        stream, text = TextStream(tok, 100, ["<image>"], skip), ""
        for n, i in enumerate(ids):
            t, finish = stream.add(i)
            text += t
            if finish:
                break
        assert (text, finish, n) == ("Hello there", "stop", len(tok.encode("Hello there")))


def test_context_length_is_checked_before_any_work(tiny, images):
    model, processor = tiny["tiny-idefics3"].model, tiny["tiny-idefics3"].processor
    messages = scenario_turns("tiled", images)[0]
    with pytest.raises(InvalidRequestError, match="beyond the model's context length of 2048"):
        next(stream_generate(model, processor, messages, max_tokens=2000))
    with pytest.raises(InvalidRequestError, match="max_tokens must be >= 1"):
        next(stream_generate(model, processor, messages, max_tokens=0))


def test_second_turn_about_the_same_image_never_runs_the_vision_tower(tiny, images, monkeypatch):
    model, processor = tiny["tiny-idefics3"].model, tiny["tiny-idefics3"].processor
    cache = ChatCache(model)
    turn = [{"role": "user", "content": [{"type": "image", "path": images["wide.png"]},
                                         {"type": "text", "text": "a"}]}]
    tokens = [r.token for r in stream_generate(model, processor, turn, max_tokens=3, prompt_cache=cache)]
    encoded = []
    monkeypatch.setattr(model, "get_image_features", lambda *a: encoded.append(a) or 1 / 0)
    turn += [assistant(reply_text(processor.tokenizer, tokens)),
             {"role": "user", "content": [{"type": "text", "text": "and?"}]}]
    second = list(stream_generate(model, processor, turn, max_tokens=3, prompt_cache=cache))
    assert encoded == [] and second[-1].cached_tokens > processor.preflight(turn).total_image_tokens


def test_cache_is_rebuilt_when_a_new_turn_changes_the_cached_images(tiny, images):
    model, processor = tiny["tiny-idefics3"].model, tiny["tiny-idefics3"].processor
    wide, square = images["wide.png"], images["square.png"]
    cache = ChatCache(model)
    first = [{"role": "user", "content": [{"type": "image", "path": wide}, {"type": "text", "text": "a"}]}]
    list(stream_generate(model, processor, first, max_tokens=2, prompt_cache=cache))
    other = [{"role": "user", "content": [{"type": "image", "path": square}, {"type": "text", "text": "a"}]}]
    fresh_rs = list(stream_generate(model, processor, other, max_tokens=8))
    fresh = [r.token for r in fresh_rs]
    reused = list(stream_generate(model, processor, other, max_tokens=8, prompt_cache=cache))
    assert_same_greedy([r.token for r in reused], [r.logprobs for r in fresh_rs], fresh, TOKENS_MOVE, at_least=6,
                       what="rebuilt cache vs fresh")
    assert reused[-1].cached_tokens < len(processor(other)["input_ids"][0])


def test_detokenizer_never_splits_a_character(tiny):
    tokenizer = tiny["tiny-idefics3"].processor.tokenizer
    text = "héllo wörld 日本語 🎉 naïve\nnext line ✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # the tiny vocabulary is mostly single bytes
    detok = StreamingDetokenizer(tokenizer)
    segments = []
    for t in ids:
        detok.add_token(t)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert "".join(segments) == text == detok.text
    assert not any("\ufffd" in s for s in segments)


def logits_fixture():
    return mx.array([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])


def test_sampling_filters():
    logits = logits_fixture()
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.array(x[0]))))  # noqa: E731
    assert kept(apply_top_k(logits, 2)) == {0, 5}
    p = np.exp(np.array(logits[0])) / np.exp(np.array(logits[0])).sum()
    # Top-p keeps the most likely tokens until their mass reaches p: 3.0, then 2.0, ...
    assert kept(apply_top_p(logits, float(p[5]) - 1e-3)) == {5}
    assert kept(apply_top_p(logits, float(p[5] + p[0]) - 1e-3)) == {0, 5}
    assert kept(apply_min_p(logits, float(p[1] / p[5]) - 1e-3)) == {0, 1, 5}
    assert make_sampler(0.0)(logits).item() == 5
    for bad in (dict(temp=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1.0)):
        with pytest.raises(InvalidRequestError):
            make_sampler(**{"temp": 1.0, **bad})
    if HAS_TORCH:
        filters_match_transformers()


def filters_match_transformers():
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = mx.random.normal((1, 64), key=mx.random.key(1)) * 3
    t = torch.from_numpy(np.array(logits))
    ids = torch.zeros((1, 1), dtype=torch.long)
    for ours, ref in [
        (apply_top_k(logits, 7), TopKLogitsWarper(7)(ids, t)),
        (apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, t)),
        (apply_min_p(logits / 0.7, 0.05), MinPLogitsWarper(0.05)(ids, TemperatureLogitsWarper(0.7)(ids, t))),
    ]:
        assert np.array_equal(np.isfinite(np.array(ours)), torch.isfinite(ref).numpy())


def test_repetition_penalty_matches_transformers_formula():
    logits = logits_fixture()
    tokens = mx.array([0, 4, 4, 2])
    (penalty,) = make_logits_processors(1.5, repetition_context_size=3)
    out = np.array(penalty(tokens, mx.array(logits)))[0]
    ref = np.array(logits)[0].copy()
    for t in {4, 2}:  # the last 3 tokens only
        ref[t] = ref[t] * 1.5 if ref[t] < 0 else ref[t] / 1.5
    np.testing.assert_allclose(out, ref)
    assert make_logits_processors(1.0) == [] and make_logits_processors(None) == []


def test_seeded_sampling_is_reproducible(tiny, images):
    model, processor = tiny["tiny-idefics3"].model, tiny["tiny-idefics3"].processor
    messages = scenario_turns("text_only", images)[0]
    sampler = make_sampler(temp=1.0, top_p=0.9, top_k=50, min_p=0.01)

    def run(seed):
        mx.random.seed(seed)
        return [r.token for r in stream_generate(model, processor, messages, max_tokens=16, sampler=sampler,
                                                 logits_processors=make_logits_processors(1.3))]

    assert run(3) == run(3)
    assert run(3) != run(4)


def forcing(prompt_len: int, target: list[int]):
    """A logits processor that makes the model emit `target`: a reply of canonical tokens."""
    def force(tokens, logits):
        n = min(tokens.size - prompt_len, len(target) - 1)  # the step run ahead of the stop
        return mx.where(mx.arange(logits.shape[-1]) == target[n], 0.0, -mx.inf)[None]
    return force


@pytest.mark.parametrize("source", ["tiny-smolvlm", "smollm2-gguf"])
def test_second_turn_reuses_all_of_the_first(tmp_path, images, source):
    # SmolVLM's template renders a stored reply as `Assistant: ` + text after a generation
    # prompt `Assistant:`; SmolLM2's adds nothing. Either way the history re-rendered with
    # reply_message must tokenize to exactly what the cache holds.
    from make_generate_golden import gguf_path

    if source == "smollm2-gguf":
        model, processor = load(gguf_path())
        messages, end = [{"role": "user", "content": "What colours are there?"}], "<|im_end|>"
    else:
        model, processor = load(tiny_folder(source, tmp_path))
        messages, end = [user("What colours are there?", [images["square.png"]])], "<end_of_utterance>"
    tok = processor.tokenizer
    # The reply ends with the end-of-turn token the template writes after a stored reply.
    target = tok.encode(" Red, green and blue.", add_special_tokens=False) + [tok.convert_tokens_to_ids(end)]
    cache = ChatCache(model)
    n_prompt = len(processor(messages)["input_ids"][0])
    first = list(stream_generate(model, processor, messages, max_tokens=len(target) + 1, prompt_cache=cache,
                                 logits_processors=[forcing(n_prompt, target)]))
    reply = "".join(r.text for r in first)
    assert [r.token for r in first] == target and reply == " Red, green and blue."
    held = cache.offset
    assert held == n_prompt + len(target)
    if source == "tiny-smolvlm":  # the reply stored as streamed (leading space) breaks the reuse
        as_streamed = processor(messages + [assistant(reply)], add_generation_prompt=False)
        assert as_streamed["input_ids"][0].tolist()[:held] != cache.tokens
    messages += [processor.reply_message(reply), user("And shapes?") if source == "tiny-smolvlm"
                 else {"role": "user", "content": "And shapes?"}]
    second = list(stream_generate(model, processor, messages, max_tokens=1, prompt_cache=cache))
    print(f"{source}: turn 1 held {held} tokens; turn 2 reused {second[-1].cached_tokens} "
          f"of {second[-1].prompt_tokens}")
    assert second[-1].cached_tokens == held
