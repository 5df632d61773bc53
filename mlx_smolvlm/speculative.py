"""Speculative decoding: draft several tokens cheaply, check them all with one forward.

A drafter proposes up to k tokens. `PromptLookup` copies what followed the latest earlier
occurrence of the context's last n-gram (prompt and answer alike: documents, OCR, tables and
copied text repeat themselves). `DraftModel` runs a smaller model with the same tokenizer, its
own processor (its own image tiling and image-token count) and its own KV cache. The target
runs its last token and the k drafts in one forward (on a CPU in float32, 8 positions cost
~1.25x one: decode is bound by reading the weights), keeps the longest prefix it agrees with
(greedy) or applies the standard speculative acceptance rule (sampling: what comes out is
distributed as the target's own samples), and trims the rejected positions from its cache.

Greedy output is plain decoding's token for token, up to floating-point near-ties: the logits
of k positions computed in one matmul can differ in the last bits from k one-token forwards
(as they can between two BLAS kernels), so a decision whose top-1/top-2 margin is within that
noise may go the other way (float32, the real 135M decoder: log-probs of a 5- or 9-token
verify differ from one-token steps by up to 6e-5). The tests check the margins they rely on.
"""

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx

from .errors import InvalidRequestError
from .generate import prefill_chunks, run
from .models.cache import KVCache, make_prompt_cache
from .sample_utils import categorical, filtered_logits, greedy


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, kept


def target_distribution(sampler: Callable | None) -> tuple[Callable | None, mx.array | None]:
    """(None, None) when `sampler` is greedy; else (logprobs (N, V) -> the log-probabilities
    it draws from, after temperature and filters, as the acceptance rule needs; the random key
    of a seeded sampler, so a seeded run repeats, or None for MLX's global generator)."""
    if sampler is None or sampler is greedy:
        return None, None
    draw = getattr(sampler, "draw", sampler)
    if isinstance(draw, partial) and draw.func is categorical:
        f = partial(filtered_logits, **draw.keywords)
        seed = getattr(sampler, "seed", None)
        return (lambda lp: (x := f(lp)) - mx.logsumexp(x, axis=-1, keepdims=True),
                None if seed is None else mx.random.key(seed))
    raise InvalidRequestError("speculative decoding needs a sampler made by make_sampler")


class PromptLookup:
    """Drafts by n-gram lookup in the context: the last `ngram_size` tokens (or fewer, down to
    one, when that finds nothing) are searched for earlier in the prompt and the answer, and
    the tokens that followed their latest occurrence are proposed."""

    def __init__(self, num_draft_tokens: int = 10, ngram_size: int = 3):
        if num_draft_tokens < 1 or ngram_size < 1:
            raise InvalidRequestError(f"prompt lookup needs >= 1 draft tokens and n-gram size, got "
                                      f"{num_draft_tokens} and {ngram_size}")
        self.num_draft_tokens, self.ngram_size = num_draft_tokens, ngram_size

    def begin(self, processor, prompt, images, controls):
        pass

    def accepted(self, drafts: list[int]):
        pass

    def propose(self, context: list[int], n_prompt: int, k: int, dist, key=None) -> tuple[list[int], None]:
        L = len(context)
        for n in range(min(self.ngram_size, L - 1), 0, -1):
            tail = context[-n:]
            for i in range(L - n - 1, -1, -1):
                if context[i : i + n] == tail:
                    return context[i + n : i + n + k], None
        return [], None


class DraftModel:
    """A smaller model of the same tokenizer drafting for the target. It reads the same
    messages through its own processor and keeps its own cache, rewound to the context the
    target accepted before each proposal."""

    def __init__(self, model, processor, num_draft_tokens: int = 3):
        if num_draft_tokens < 1:
            raise InvalidRequestError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.model, self.processor, self.num_draft_tokens = model, processor, num_draft_tokens
        self._checked = None

    def check(self, tokenizer):
        """Refuse (one line) a target whose tokenizer is not the draft's; checked once per tokenizer."""
        if self._checked is not tokenizer:
            if tokenizer.vocab != self.processor.tokenizer.vocab:
                raise InvalidRequestError("the draft model's tokenizer differs from the model's: "
                                          "a draft must share the vocabulary")
            self._checked = tokenizer

    def fork(self, num_draft_tokens: int) -> "DraftModel":
        """A drafter for one more sequence (a batch row): the same weights and processor, its own
        cache and answer."""
        d = DraftModel(self.model, self.processor, num_draft_tokens)
        d._checked = self._checked
        return d

    def begin(self, processor, prompt, images, controls):
        self.check(processor.tokenizer)
        self.start(self.processor(prompt, images=images, **controls))

    def start(self, inputs: dict):
        """Prefill the draft's cache with its own processor's output for the messages."""
        ids = mx.array(inputs["input_ids"][0])
        embeds = None
        if "pixel_values" in inputs:
            pam = inputs.get("pixel_attention_mask")
            embeds = self.model.get_input_embeddings(
                ids[None], mx.array(inputs["pixel_values"]), None if pam is None else mx.array(pam))
        self.cache = make_prompt_cache(self.model)
        self.model(**run(prefill_chunks(self.model, ids, embeds, self.cache, 512)), cache=self.cache)
        self.fed: list[int] = []  # answer tokens in the draft's cache after its own prompt

    def propose(self, context: list[int], n_prompt: int, k: int, dist, key=None) -> tuple[mx.array, mx.array | None]:
        answer = context[n_prompt:]
        n = 0
        while n < min(len(self.fed), len(answer)) and self.fed[n] == answer[n]:
            n += 1
        for c in self.cache:
            c.trim(len(self.fed) - n)
        x = mx.array(answer[n:])[None]
        drafts, qs = [], []
        keys = [None] * k if key is None else mx.random.split(key, k)
        for i in range(k):  # one lazy graph: evaluated with the target's verify
            lp = self.model(input_ids=x, cache=self.cache)[:, -1]
            lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
            if dist is None:
                t = mx.argmax(lp, axis=-1)
            else:
                q = dist(lp)
                t = mx.random.categorical(q, axis=-1, key=keys[i])
                qs.append(q)
            drafts.append(t)
            x = t[None]
        # The last draft is not fed; the cache holds the answer and drafts[:-1].
        self._pending = (answer, k)
        drafts = mx.concatenate(drafts)
        return drafts, (mx.concatenate(qs) if qs else None)

    def accepted(self, drafts: list[int]):
        answer, k = self._pending
        self.fed = answer + drafts[: k - 1]


def agreed(drafts: list[int], choice: list[int]) -> int:
    """How many leading drafts the target's greedy `choice` after each prefix agrees with."""
    n = 0
    while n < len(drafts) and drafts[n] == choice[n]:
        n += 1
    return n


def room(cache: list, kv_bits: int | None, quantized_kv_start: int) -> int:
    """Positions the next forward may append and still be undone exactly by a trim, with
    every position computed as plain decoding would: a rotating cache must not evict yet, and
    a float cache due to be quantized must not run past where plain decoding would switch."""
    n = 1 << 30
    for c in cache:
        if hasattr(c, "max_size"):
            n = min(n, c.max_size - c.offset)
        if kv_bits is not None and isinstance(c, KVCache):
            n = min(n, quantized_kv_start - c.offset)
    return n


class Gate:
    """Draft only while it pays. Pauses drafting (for 4 steps, doubling while it keeps failing)
    when the running share of accepted drafts falls below `floor`, or when drafted steps take
    more seconds per token than plain ones: verifying k tokens costs ~1.2x one in float32 on a
    CPU but ~k times one with 4-bit weights there (MLX's CPU quantized matmul is compute-bound)."""

    def __init__(self, floor: float = 0.3):
        # The first 2 steps run plain: the speed drafting has to beat.
        self.floor, self.rate, self.skip, self.pause = floor, 0.5, 2, 4
        self.spec = self.plain = None  # running seconds per emitted token

    def open(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True

    def update(self, drafted: int, accepted: int, seconds: float):
        per = seconds / (accepted + 1)
        if not drafted:
            self.plain = per if self.plain is None else 0.7 * self.plain + 0.3 * per
            return
        self.spec = per if self.spec is None else 0.5 * self.spec + 0.5 * per
        self.rate = 0.5 * self.rate + 0.5 * accepted / drafted
        slower = self.plain is not None and self.spec > self.plain
        if self.rate < self.floor or slower:
            self.skip, self.pause = self.pause, min(2 * self.pause, 64)
            self.rate, self.spec = 0.5, None  # measured afresh when drafting resumes
        elif accepted == drafted:
            self.pause = 4


def accept_sampled(logprobs: mx.array, drafts: list[int], q: mx.array | None, key=None) -> list[int]:
    """The standard speculative acceptance rule. `logprobs` (k + 1, V): the target's (filtered)
    log-probabilities after each prefix of the drafts; `q` (k, V): the draft's, None for a
    deterministic draft (prompt lookup: q is one-hot). Draft i is kept with probability
    min(1, p_i(d) / q_i(d)); at the first rejection the token is drawn from max(p_i - q_i, 0),
    renormalised; if all are kept, one more comes from p_k. The output is distributed as p."""
    k = len(drafts)
    k1, k2 = (None, None) if key is None else mx.random.split(key)
    p = mx.exp(logprobs)
    if k:
        d = mx.array(drafts)
        pd = mx.take_along_axis(p[:k], d[:, None], axis=-1)[:, 0]
        qd = mx.ones_like(pd) if q is None else mx.take_along_axis(mx.exp(q), d[:, None], axis=-1)[:, 0]
        keep = (mx.random.uniform(shape=(k,), key=k1) < pd / qd).tolist()
        n = keep.index(False) if False in keep else k
    else:
        n = 0
    row = p[n]
    if n < k:
        if q is None:
            row = mx.where(mx.arange(row.shape[0]) == drafts[n], 0.0, row)
        else:
            row = mx.maximum(row - mx.exp(q[n]), 0.0)
        # p == q exactly leaves nothing: then p itself is the right law.
        row = mx.where(row.sum() > 0, row, p[n])
    token = mx.random.categorical(mx.log(row), key=k2).item()
    return drafts[:n] + [token]


def speculative_steps(prompt: mx.array, model, drafter, cache: list, quantize: Callable, *,
                      input_embeddings, max_tokens, sampler, logits_processors, prefill_step_size,
                      kv_bits, quantized_kv_start, stats) -> Iterator[tuple[int, mx.array]]:
    """generate_step's loop with drafts (generate_step(drafter=...) calls it after its checks):
    the same (token, logprobs) pairs (greedy: the same tokens), several per forward when
    drafts are accepted. `drafter` is a PromptLookup or DraftModel after its `begin`."""
    dist, key = target_distribution(sampler)

    def next_key():  # a seeded sampler's own key, split per use; None: the global generator
        nonlocal key
        if key is None:
            return None
        key, k = mx.random.split(key)
        return k

    sampler = sampler or greedy
    processors = logits_processors or []
    gate = Gate()
    context = prompt.tolist()  # the prompt and the tokens yielded: lookup and processors read it
    n_prompt = len(context)

    def logprobs_of(logits: mx.array, drafts: mx.array | None) -> mx.array:
        # Row j predicts the token after context + drafts[:j]: processors see that prefix.
        if processors:
            base, rows = mx.array(context), []
            for j in range(logits.shape[0]):
                tokens = mx.concatenate([base, drafts[:j]]) if j else base
                row = logits[j : j + 1]
                for p in processors:
                    row = p(tokens, row)
                rows.append(row)
            logits = mx.concatenate(rows)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    try:
        ids = prompt[cache[0].offset :]
        inputs = run(prefill_chunks(model, ids, input_embeddings, cache, prefill_step_size, quantize))
        quantize()
        lp = logprobs_of(model(**inputs, cache=cache)[0, -1:], None)
        y = sampler(lp).item()
        context.append(y)
        yield y, lp[0]
        while len(context) - n_prompt < max_tokens:
            quantize()
            left = max_tokens - (len(context) - n_prompt)
            k = min(drafter.num_draft_tokens, left - 1, room(cache, kv_bits, quantized_kv_start) - 1)
            drafts, q, tic = [], None, time.perf_counter()
            if k > 0 and gate.open():
                drafts, q = drafter.propose(context, n_prompt, k, dist, next_key() if dist else None)
            d_arr = mx.array(drafts) if isinstance(drafts, list) else drafts
            x = mx.concatenate([mx.array([y]), d_arr.astype(mx.int32)]) if d_arr.size else mx.array([y])
            lp = logprobs_of(model(input_ids=x[None], cache=cache)[0], d_arr)
            if dist is None:
                choice = mx.argmax(lp, axis=-1)
                mx.eval(choice, d_arr)
                t, drafts = choice.tolist(), d_arr.tolist()
                n = agreed(drafts, t)
                out = drafts[:n] + [t[n]]
            else:
                drafts = d_arr.tolist()
                out = accept_sampled(dist(lp), drafts, q, next_key())
            n = len(out) - 1
            for c in cache:
                c.trim(len(drafts) - n)
            if drafts:
                drafter.accepted(drafts)
            stats.drafted += len(drafts)
            stats.accepted += n
            gate.update(len(drafts), n, time.perf_counter() - tic)
            for i, tok in enumerate(out):
                context.append(tok)
                yield tok, lp[i]
            y = out[-1]
    finally:
        # Stopped early (eos, a stop string): the cache holds only what was yielded.
        extra = cache[0].offset - len(context)
        if extra > 0:
            for c in cache:
                c.trim(extra)
