"""Speculative decoding (mlx_smolvlm/speculative.py) on the tiny checkpoints: greedy output is
plain decoding's, token for token, for prompt lookup and draft models (one with another image
geometry), every KV-cache kind, images and text, stop strings, eos, max_tokens, repetition
penalty and a chat's prompt cache; sampling keeps the target's distribution and repeats under
a seed; a draft with another tokenizer is refused.

Greedy equality compares a k-position verify forward with k one-token forwards: different
matmul shapes, so equal only up to float32 rounding. Every comparison first checks that plain
decoding's top-1/top-2 log-prob margins along the way are far above that (MARGIN).
"""

import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from make_generate_golden import gguf_path, tiny_folder, user

from mlx_smolvlm.batch import BatchEngine, SamplingParams, batch_generate
from mlx_smolvlm.models.cache import BatchKVCache
from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.loading import dequantize_model
from mlx_smolvlm.chat_cache import ChatCache
from mlx_smolvlm.errors import InvalidRequestError
from mlx_smolvlm.sample_utils import make_logits_processors, make_sampler
from mlx_smolvlm.speculative import DraftModel, PromptLookup, accept_sampled

MARGIN = 1e-3  # log-prob gap; the two paths differ by up to 6e-5 (real 135M decoder, float32)
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # tiny-idefics3: 32 px tiles of 4 tokens (SmolVLM-256M's geometry, scale 4); tiny-smolvlm:
    # 36 px tiles of 9 tokens (the 2.2B's, scale 3); one tokenizer, as the family shares.
    return {n: load(tiny_folder(n, tmp_path_factory.mktemp(n))) for n in ("tiny-idefics3", "tiny-smolvlm")}


@pytest.fixture(scope="module")
def images(sample_images):
    return sample_images


def messages(kind, images):
    if kind == "image":
        return [user("What is in the image?", [images["wide.png"]])]
    return [user("Write the alphabet twice, then count to twenty.")]


def drafter(kind, models, target):
    other = "tiny-smolvlm" if target == "tiny-idefics3" else "tiny-idefics3"
    return {
        "lookup": lambda: PromptLookup(5, 2),
        "self": lambda: DraftModel(*models[target], 4),  # agrees always: long accepted runs
        "other": lambda: DraftModel(*models[other], 3),  # other weights and image geometry
    }[kind]()


def tokens(responses):
    return [r.token for r in responses]


def check_margins(responses):
    lp = np.stack([np.array(r.logprobs) for r in responses])
    top2 = np.sort(lp, axis=-1)[:, -2:]
    gap = (top2[:, 1] - top2[:, 0]).min()
    print(f"smallest top-1/top-2 margin of plain decoding: {gap:.2e}")
    assert gap > MARGIN, "a near-tie: equality would rest on float noise"


CACHES = {
    "float": {},
    "rotating": {"max_kv_size": 20},  # + the prompt's length: evicts mid-answer, drafting stops there
    # Quantized caches need head_dim 64 (groups of 32/64): the real decoder below.
    "kv8": {"kv_bits": 8, "quantized_kv_start": 0},  # from the start (the default waits for 2048)
    "kv4-from-60": {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 60},  # switches mid-answer
}


def check_equal(model, processor, msgs, drafts, **kw):
    """Plain and speculative greedy runs agree; returns plain's responses and each drafter's last."""
    if "max_kv_size" in kw:
        kw["max_kv_size"] += len(processor(msgs)["input_ids"][0])
    plain = list(stream_generate(model, processor, msgs, max_tokens=MAX_TOKENS, **kw))
    check_margins(plain)
    last = {}
    for name, d in drafts.items():
        spec = list(stream_generate(model, processor, msgs, max_tokens=MAX_TOKENS, draft=d, **kw))
        r = spec[-1]
        print(f"{name}: drafted {r.draft_tokens}, accepted {r.accepted_tokens}")
        assert tokens(spec) == tokens(plain), name
        assert [x.text for x in spec] == [x.text for x in plain]
        assert r.finish_reason == plain[-1].finish_reason
        assert r.accepted_tokens <= r.draft_tokens
        last[name] = r
    return plain, last


@pytest.mark.parametrize("cache", ["float", "rotating"])
@pytest.mark.parametrize("kind", ["image", "text"])
@pytest.mark.parametrize("target", ["tiny-idefics3", "tiny-smolvlm"])
def test_greedy_equals_plain(models, images, target, kind, cache):
    model, processor = models[target]
    drafts = {d: drafter(d, models, target) for d in ("lookup", "self", "other")}
    plain, last = check_equal(model, processor, messages(kind, images), drafts, **CACHES[cache])
    assert plain[-1].finish_reason == "length"
    assert last["self"].accepted_tokens == last["self"].draft_tokens > 0  # the same model agrees
    assert last["other"].draft_tokens > 0


@pytest.fixture(scope="module")
def smollm2():
    model, processor = load(gguf_path())
    model.model.layers = model.model.layers[:6]  # of 30, to stay fast; still head_dim 64
    # Float weights: a verify over k tokens then costs about one token's (MLX's CPU quantized
    # matmul costs k times one), and float32 is where exactness is promised.
    dequantize_model(model, mx.float32)
    return model, processor


@pytest.mark.parametrize("cache", list(CACHES))
def test_greedy_equals_plain_real_decoder(smollm2, cache):
    model, processor = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 3
    msgs = [{"role": "user", "content": f"Copy this text: {text}"}]
    drafts = {"lookup": PromptLookup(8, 3), "self": DraftModel(model, processor, 4)}
    check_equal(model, processor, msgs, drafts, **CACHES[cache])


def test_draft_reads_its_own_image_geometry(models, images):
    msgs = messages("image", images)
    (target, tp), (draft, dp) = models["tiny-smolvlm"], models["tiny-idefics3"]
    n_target, n_draft = (len(p(msgs)["input_ids"][0]) for p in (tp, dp))
    assert n_target != n_draft  # 9 vs 4 image tokens per tile, other tilings
    d = DraftModel(target, tp, 4)  # the target drafting for itself through a draft's plumbing
    d.begin(tp, msgs, None, {})
    assert d.cache[0].offset == n_target
    d = DraftModel(draft, dp, 4)
    d.begin(tp, msgs, None, {})
    assert d.cache[0].offset == n_draft


def test_stop_strings_eos_and_max_tokens(models, images):
    model, processor = models["tiny-idefics3"]
    msgs = messages("image", images)
    plain = list(stream_generate(model, processor, msgs, max_tokens=MAX_TOKENS))
    check_margins(plain)
    text = "".join(r.text for r in plain)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    n_prompt = len(processor(msgs)["input_ids"][0])
    eos = min(processor.tokenizer.eos_token_ids)

    def force_eos(tokens, logits):  # an eos the drafts cannot foresee, after 11 tokens
        if tokens.size == n_prompt + 11:
            logits[:, eos] = 100.0
        return logits

    for kw in ({"stop": [stop]}, {"logits_processors": [force_eos]}, {"max_tokens": 7}):
        kw = {"max_tokens": MAX_TOKENS, **kw}
        ref = list(stream_generate(model, processor, msgs, **kw))
        for d in ("lookup", "self"):
            spec = list(stream_generate(model, processor, msgs, draft=drafter(d, models, "tiny-idefics3"), **kw))
            assert tokens(spec) == tokens(ref)
            assert "".join(r.text for r in spec) == "".join(r.text for r in ref)
            assert spec[-1].finish_reason == ref[-1].finish_reason
    assert len(ref) == 7 and ref[-1].finish_reason == "length"


def test_repetition_penalty_per_position(smollm2):
    model, processor = smollm2
    msgs = [{"role": "user", "content": "Copy this text: " + "one two three four five. " * 3}]
    procs = make_logits_processors(1.3, 8)
    plain = list(stream_generate(model, processor, msgs, max_tokens=MAX_TOKENS, logits_processors=procs))
    check_margins(plain)
    assert tokens(plain) != tokens(stream_generate(model, processor, msgs, max_tokens=MAX_TOKENS))
    for d in (PromptLookup(8, 3), DraftModel(model, processor, 4)):
        spec = list(stream_generate(model, processor, msgs, max_tokens=MAX_TOKENS, logits_processors=procs,
                                    draft=d))
        assert tokens(spec) == tokens(plain)
        assert spec[-1].accepted_tokens > 0


def test_chat_prompt_cache(models, images):
    model, processor = models["tiny-idefics3"]
    turns = [[user("What is in the image?", [images["wide.png"]])], [user("And the colours?")]]

    def chat(draft):
        cache, msgs, out = ChatCache(model), [], []
        for turn in turns:
            msgs += turn
            rs = list(stream_generate(model, processor, msgs, max_tokens=12, prompt_cache=cache, draft=draft,
                                      stop=[processor.tokenizer.decode([474, 436])]))
            out.append((tokens(rs), rs[-1].cached_tokens))
            # The cache holds exactly what it says it holds: no rejected or unread drafts.
            assert cache.offset == len(cache.tokens)
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": "".join(r.text for r in rs)}]})
        return out

    plain = chat(None)
    assert plain[1][1] > 0  # the second turn reused the cache
    assert chat(PromptLookup(5, 2)) == plain
    assert chat(DraftModel(model, processor, 4)) == plain


def test_sampled_acceptance_keeps_the_target_distribution():
    # p over 4 tokens; drafts from q (a draft model) or fixed (prompt lookup): the first token
    # out must be distributed as p either way.
    mx.random.seed(0)
    p = mx.array([0.1, 0.5, 0.3, 0.1])
    q = mx.array([0.4, 0.2, 0.2, 0.2])
    lp = mx.log(mx.stack([p, p]))
    n, counts = 4000, {"draft": np.zeros(4), "lookup": np.zeros(4)}
    for _ in range(n):
        d = mx.random.categorical(mx.log(q)).item()
        counts["draft"][accept_sampled(lp, [d], mx.log(q)[None])[0]] += 1
        counts["lookup"][accept_sampled(lp, [0], None)[0]] += 1
    for kind, c in counts.items():
        err = np.abs(c / n - np.array(p)).max()
        print(f"{kind}: empirical {np.round(c / n, 3)} vs p {np.array(p)}: max error {err:.3f}")
        assert err < 0.03  # ~4 standard errors at n = 4000


def test_seeded_sampling_repeats(models, images):
    model, processor = models["tiny-idefics3"]
    msgs = messages("image", images)

    def run(draft, seed=None):
        if seed is None:
            mx.random.seed(7)  # MLX's global generator
        else:
            mx.random.seed(np.random.randint(1 << 30))  # the sampler's own key must decide alone
        return tokens(stream_generate(model, processor, msgs, max_tokens=20, draft=draft,
                                      sampler=make_sampler(0.8, top_p=0.9, seed=seed)))

    for d in (PromptLookup(5, 2), DraftModel(*models["tiny-smolvlm"], 3)):
        assert run(d) == run(d)
        assert run(d, seed=3) == run(d, seed=3)


def test_a_draft_with_another_tokenizer_is_refused(models, images):
    model, processor = models["tiny-idefics3"]
    other = SimpleNamespace(tokenizer=SimpleNamespace(vocab={"a": 0}))
    with pytest.raises(InvalidRequestError, match="tokenizer differs") as e:
        list(stream_generate(model, processor, messages("text", images), draft=DraftModel(model, other)))
    assert "\n" not in str(e.value)


def test_cli_flags(tiny_idefics3, images):
    def cli(*args):
        cmd = [sys.executable, "-m", "mlx_smolvlm.generate", "--model", tiny_idefics3, "--image",
               images["wide.png"], "--max-tokens", "20", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    plain = cli()
    for flags in (["--prompt-lookup-tokens", "5", "--ngram-size", "2"], ["--draft-model", tiny_idefics3]):
        out = cli(*flags, "--verbose")
        assert out.startswith(plain.split("==========")[0].rstrip("\n"))
        assert "Speculative: " in out and "accepted" in out


def test_batch_prompt_lookup_rows_accept_different_lengths(models, images, monkeypatch):
    model, processor = models["tiny-idefics3"]
    prompts = [messages("image", images), messages("text", images), [user("Hi")],
               [user("Describe.", [images["square.png"]])]]
    solo = ["".join(r.text for r in stream_generate(model, processor, p, max_tokens=MAX_TOKENS)) for p in prompts]
    assert batch_generate(model, processor, prompts, max_tokens=MAX_TOKENS, prompt_lookup_tokens=5,
                          ngram_size=2) == solo
    # One sampled row decodes plainly beside the drafting greedy rows; a spy on the cache
    # records what each verify step rewinds per row.
    drops = []
    trim_rows = BatchKVCache.trim_rows
    monkeypatch.setattr(BatchKVCache, "trim_rows", lambda self, n: (drops.append(list(n)), trim_rows(self, n)))
    engine, last = BatchEngine(model, processor), {}
    for i, p in enumerate(prompts):
        params = SamplingParams(MAX_TOKENS, temperature=0.7 if i == 3 else 0.0, seed=1,
                                prompt_lookup_tokens=5, ngram_size=2)
        engine.add(processor(p), params, lambda e, i=i: last.__setitem__(i, e))
    while engine.busy:
        engine.step()
    print("accepted per row:", [last[i].accepted_tokens for i in range(4)],
          "drafted:", [last[i].draft_tokens for i in range(4)])
    assert any(len(set(n)) > 1 for n in drops)  # rows rewound by different lengths in one step
    assert last[3].draft_tokens == 0
    assert all(last[i].finish_reason in ("stop", "length") for i in range(4))


def test_batch_cache_trim_rows_is_each_rows_trim():
    rng = np.random.default_rng(0)
    rows = [mx.array(rng.standard_normal((1, 2, L, 8)).astype(np.float32)) for L in (5, 9, 7)]
    cache = BatchKVCache.from_rows([(r, r * 2) for r in rows])
    new = mx.array(rng.standard_normal((3, 2, 4, 8)).astype(np.float32))
    cache.update_and_fetch(new, new * 2)
    cache.trim_rows([3, 0, 2])  # keep 1, 4 and 2 of the new positions
    kept = [mx.concatenate([r, new[b : b + 1, :, :k]], axis=2) for b, (r, k) in enumerate(zip(rows, (1, 4, 2)))]
    keys, values = cache.state
    assert cache.offset.tolist() == [r.shape[2] for r in kept]
    for b, r in enumerate(kept):
        L = r.shape[2]
        assert mx.array_equal(keys[b : b + 1, :, -L:], r) and mx.array_equal(values[b : b + 1, :, -L:], r * 2)
    assert min(cache.left) == 0  # columns that are padding in every row are gone



def batch_prompts(images):
    # Images and text, prompts of different lengths: rows of different offsets in one batch.
    return [messages("image", images), messages("text", images), [user("Hi")],
            [user("Describe.", [images["square.png"]])]]


def solo_texts(model, processor, prompts):
    """Plain greedy texts, each run's margins checked first."""
    texts = []
    for p in prompts:
        plain = list(stream_generate(model, processor, p, max_tokens=MAX_TOKENS))
        check_margins(plain)
        texts.append("".join(r.text for r in plain))
    return texts


def batch_run(model, processor, prompts, draft):
    """(texts, each row's last event, each row's Sequence) from one BatchEngine with `draft`."""
    engine, last, texts = BatchEngine(model, processor, draft=draft), {}, [""] * len(prompts)

    def on_event(i, e):
        texts[i] += e.text
        last[i] = e

    seqs = [engine.add(processor(p), SamplingParams(MAX_TOKENS), lambda e, i=i: on_event(i, e),
                       draft_inputs=draft.processor(p)) for i, p in enumerate(prompts)]
    while engine.busy:
        engine.step()
    return texts, [last[i] for i in range(len(prompts))], seqs


def test_batch_draft_model_equals_plain(models, images):
    """batch_generate(draft=): the other tiny model drafts for each row through its own
    processor (4 vs 9 image tokens per tile, other tilings) and cache; texts are plain's."""
    model, processor = models["tiny-smolvlm"]
    prompts = batch_prompts(images)
    solo = solo_texts(model, processor, prompts)
    assert batch_generate(model, processor, prompts, max_tokens=MAX_TOKENS,
                          draft=DraftModel(*models["tiny-idefics3"], 3)) == solo
    draft, dp = models["tiny-idefics3"]
    texts, last, seqs = batch_run(model, processor, prompts, DraftModel(draft, dp, 3))
    print("drafted per row:", [e.draft_tokens for e in last], "accepted:", [e.accepted_tokens for e in last])
    assert texts == solo
    assert all(e.draft_tokens > 0 for e in last)
    for p, s in zip(prompts, seqs):  # the draft's cache: its own prompt, then the answer it was fed
        n_draft, n_target = len(dp(p)["input_ids"][0]), len(s.ids)
        assert s.drafter.cache[0].offset == n_draft + len(s.drafter.fed)
        assert (n_draft != n_target) == (p[0]["content"][0]["type"] == "image")


def test_batch_draft_model_rewinds_rejected_positions(models, images, monkeypatch):
    """The target drafting for itself accepts every draft, unless the draft's cache keeps
    positions the target rejected. A spy spoils the first draft of every other proposal (the
    target rejects it, and the k - 1 positions the draft's cache already holds after it must
    be rewound): every unspoiled proposal must still be accepted whole."""
    model, processor = models["tiny-idefics3"]
    prompts = batch_prompts(images)
    propose, spoiled = DraftModel.propose, {}

    def spy(self, *args):
        drafts, q = propose(self, *args)
        n = spoiled.setdefault(id(self), [0, 0])  # proposals, drafts in spoiled proposals
        n[0] += 1
        if n[0] % 2 == 0:
            n[1] += drafts.size
            drafts = mx.concatenate([mx.where(drafts[:1] == 1, 2, 1), drafts[1:]])  # never the target's
        return drafts, q

    monkeypatch.setattr(DraftModel, "propose", spy)
    solo = solo_texts(model, processor, prompts)
    texts, last, seqs = batch_run(model, processor, prompts, DraftModel(model, processor, 4))
    assert texts == solo
    for e, s in zip(last, seqs):
        proposals, lost = spoiled[id(s.drafter)]
        print(f"proposals {proposals}, drafted {e.draft_tokens}, spoiled {lost}, accepted {e.accepted_tokens}")
        assert proposals >= 2 and lost > 0
        assert e.accepted_tokens == e.draft_tokens - lost
