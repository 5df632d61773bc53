"""Continuous batching: sequences join a running decode batch and leave it when done.

Every step decodes one token for the whole batch first and queues it (`mx.async_eval`),
then hands out the previous step's tokens while it computes, then advances one waiting
prompt by one unit of work: a batch of image tiles through the vision tower, or one prefill
chunk (mlx-lm's BatchGenerator order). So a long prompt (a 64-frame video) never stalls the
running streams for more than one unit per token, and a short prompt that arrives behind it
is prefilled in turn with it rather than after it. A prompt is prefilled alone (its own
images, its own chunks, as `generate_step` does); its KV rows then join the batch
(`BatchKVCache.extend`) and decode with the others. `BatchEngine` is the core that the
server runs on a thread and that `batch_generate` runs to completion.
"""

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import mlx.core as mx
import numpy as np

from .chat_cache import tile_digests
from .errors import InvalidRequestError
from .generate import check_kv_options, check_length, clip_max_tokens, prefill_chunks
from .models.cache import (QUANTIZED_KV_START, BatchKVCache, BatchQuantizedKVCache, QuantizedKVCache,
                           maybe_quantize_kv_cache)
from .prefix_cache import FeatureCache, PrefixCache
from .sample_utils import make_logits_processors, make_sampler, sample_next
from .speculative import DraftModel, Gate, PromptLookup, SpeculativeStats, agreed
from .text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's and the k most likely
    skip_special_tokens: bool = True
    # Speculative decoding (greedy rows without logprobs only; others decode one token a
    # step): by prompt lookup (0: off), or by the engine's draft model, proposing
    # `num_draft_tokens` (None: the draft's own count; 0: off).
    prompt_lookup_tokens: int = 0
    ngram_size: int = 3
    num_draft_tokens: int | None = None

    def check(self):
        """Raise InvalidRequestError for values the sampler factories refuse (no MLX arrays made)."""
        make_sampler(self.temperature, self.top_p, self.top_k, self.min_p)
        make_logits_processors(self.repetition_penalty, self.repetition_context_size)
        if self.prompt_lookup_tokens and self.num_draft_tokens:
            raise InvalidRequestError("prompt_lookup_tokens and num_draft_tokens exclude each other: pick one")


@dataclass
class Event:
    """One step of one sequence: new text and token, or the end (finish_reason / error)."""

    text: str
    token: int | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None
    draft_tokens: int = 0  # speculative decoding: drafts checked, and of those accepted
    accepted_tokens: int = 0


class Sequence:
    def __init__(self, inputs: dict, params: SamplingParams, on_event: Callable, tokenizer,
                 partition: bytes = b"", drafter: DraftModel | None = None, draft_inputs: dict | None = None):
        self.inputs = inputs
        self.partition = partition  # cache partition (tenant, cache_salt): reuse only within it
        self.ids = np.asarray(inputs["input_ids"])[0].tolist()
        self.params = params
        self.on_event = on_event
        # Made on the engine thread, which owns every MLX array (a seeded sampler holds a key).
        self.sampler = self.processors = None
        self.text = TextStream(tokenizer, params.max_tokens, params.stop, params.skip_special_tokens)
        self.generated: list[int] = []
        self.cached = 0
        self.done = self.cancelled = False
        self.drafter, self.draft_inputs, self.gate = drafter, draft_inputs, None
        if params.prompt_lookup_tokens and params.temperature == 0 and params.logprobs is None:
            self.drafter = PromptLookup(params.prompt_lookup_tokens, params.ngram_size)
        if self.drafter is not None:
            self.gate = Gate()
        self.stats = SpeculativeStats()

    def push(self, token: int, logprob: float | None = None, top=None):
        self.generated.append(token)
        text, finish = self.text.add(token)
        self.done = finish is not None
        self.on_event(Event(text, token, len(self.ids), self.text.n, self.cached, finish, logprob, top,
                            draft_tokens=self.stats.drafted, accepted_tokens=self.stats.accepted))

    def drafts(self) -> list[int] | mx.array:
        """This row's drafts: a list (prompt lookup) or a lazy array (a draft model's steps)."""
        if self.drafter is None or not self.gate.open():
            return []
        k = min(self.drafter.num_draft_tokens, self.params.max_tokens - self.text.n - 1)
        return self.drafter.propose(self.ids + self.generated, len(self.ids), k, None)[0] if k > 0 else []

    def fail(self, message: str):
        self.done = True
        self.on_event(Event("", None, len(self.ids), self.text.n, self.cached, "error", error=message))


class BatchEngine:
    """Admits sequences (any thread: `add`, `cancel`) and advances them all (`step`, on one thread)."""

    def __init__(self, model, processor, max_batch: int = 16, prefill_step_size: int = 512,
                 feature_cache_tiles: int = 64, prefix_cache_bytes: int = 1 << 30,
                 draft: DraftModel | None = None, kv_bits: int | None = None, kv_group_size: int = 64,
                 quantized_kv_start: int = QUANTIZED_KV_START):
        """`draft`: a smaller model of the same tokenizer (refused otherwise) that greedy rows
        may draft with; each such row gets its own copy of it (`DraftModel.fork`).
        `kv_bits`, `kv_group_size`, `quantized_kv_start`: generate_step's, for a prompt's
        prefill; the batch quantizes all its rows once its buffer holds `quantized_kv_start`
        positions (its longest row), so a shorter row is quantized sooner than it would be alone."""
        check_kv_options(model, kv_bits, kv_group_size, None)
        if draft is not None:
            draft.check(processor.tokenizer)
        self.model, self.processor, self.draft = model, processor, draft
        self.kv_bits, self.kv_group_size, self.quantized_kv_start = kv_bits, kv_group_size, quantized_kv_start
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.features = FeatureCache(feature_cache_tiles)
        self.prefixes = PrefixCache(model, prefix_cache_bytes)
        self.active: list[Sequence] = []
        self.cache: list[BatchKVCache] | None = None
        self.y = None  # (B,) the tokens sampled for `active` and not yet handed out
        self.info: list = []  # per active sequence: logprob arrays for those tokens, or None
        self.prefilling: deque[tuple[Sequence, object]] = deque()  # (sequence, its prefill generator)
        self._pending: deque[Sequence] = deque()
        self._lock = threading.Lock()

    def draft_tokens(self, params: SamplingParams) -> int:
        """Tokens the draft model proposes per step for a sequence of `params`; 0: it does not
        use it. Raises InvalidRequestError when `params` ask for a draft model there is not."""
        params.check()
        k = params.num_draft_tokens
        if k is None:
            k = 0 if self.draft is None else self.draft.num_draft_tokens
        if k and self.draft is None:
            raise InvalidRequestError("num_draft_tokens needs a draft model (the server's --draft-model)")
        greedy = params.temperature == 0 and params.logprobs is None
        return k if greedy and not params.prompt_lookup_tokens else 0

    def add(self, inputs: dict, params: SamplingParams, on_event: Callable, partition: bytes = b"",
            draft_inputs: dict | None = None) -> Sequence:
        """Queue a prompt (processor output); raises InvalidRequestError if it cannot fit. Cached
        prompts and image features are shared only between sequences of one `partition`.
        `max_tokens` beyond the context left after the prompt is cut to it (finish_reason "length").
        `draft_inputs`: the draft model's processor output for the same messages, needed when
        `draft_tokens(params)` > 0."""
        n = np.asarray(inputs["input_ids"]).shape[-1]
        if params.max_tokens >= 1:
            params = replace(params, max_tokens=clip_max_tokens(self.model, n, params.max_tokens))
        check_length(self.model, n, params.max_tokens)
        k = self.draft_tokens(params)
        if k and draft_inputs is None:
            raise InvalidRequestError("drafting with the draft model needs its processor's output (draft_inputs)")
        drafter = self.draft.fork(k) if k else None
        seq = Sequence(inputs, params, on_event, self.processor.tokenizer, partition, drafter,
                       draft_inputs if k else None)
        with self._lock:
            self._pending.append(seq)
        return seq

    @staticmethod
    def cancel(seq: Sequence):
        seq.cancelled = True  # leaves the batch at the start of the next step

    @property
    def waiting(self) -> int:
        return len(self._pending) + len(self.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.active or self.prefilling or self._pending)

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": self.waiting,
                "image_features": self.features.stats(), "prefixes": self.prefixes.stats()}

    def step(self):
        """Decode one token for the batch (queued), hand out the previous one, then advance
        one waiting prompt by one unit of work."""
        self._drop_done()
        try:
            queued, drafts = None, []
            if any(s.drafter is not None for s in self.active):
                self._emit()  # drafts continue what each row has handed out: all of it
                self.y, self.info = None, []
                self._drop_done()
                drafts = [s.drafts() for s in self.active]
                mx.eval([d for d in drafts if isinstance(d, mx.array)])  # the draft models' steps, together
                drafts = [d.tolist() if isinstance(d, mx.array) else d for d in drafts]
            if drafts and max(map(len, drafts)):
                self._decode_drafts(drafts, max(map(len, drafts)))
            elif self.active:
                queued = self._decode()
                self._emit()
        except Exception as e:  # a fault of the batch itself: end every sequence in it
            log.exception("decode step failed; ending the %d sequences in the batch", len(self.active))
            for s in self.active:
                s.fail(f"generation failed: {e}")
            self._drop_done()
            queued = None
        if queued is not None:
            self.y, self.info = queued
        self._drop_done()
        self._advance_prompt()

    def fail_all(self, message: str):
        """End every sequence, running or waiting, and free the batch."""
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for s in self.active + [s for s, _ in self.prefilling] + pending:
            s.fail(message)
        self.active, self.cache, self.y, self.info = [], None, None, []
        self.prefilling.clear()
        mx.clear_cache()

    def _sample(self, seqs: list[Sequence], logits: mx.array, fed: mx.array | None):
        """Tokens (B,) for `seqs` from their logits (B, V), each with its own sampler and logits
        processors (sample_utils.sample_next, as generate_step); `fed` (B,) are the tokens these
        logits follow, not yet in a sequence's `generated`."""
        if all(s.params.temperature == 0 and not s.processors for s in seqs):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            rows = []
            for i, s in enumerate(seqs):
                context = None
                if s.processors:
                    context = mx.array(s.ids + s.generated, mx.uint32)
                    if fed is not None:
                        context = mx.concatenate([context, fed[i : i + 1].astype(mx.uint32)])
                rows.append(sample_next(logits[i : i + 1], context, s.sampler, s.processors))
            tokens = mx.concatenate([t for t, _ in rows])
            logprobs = mx.concatenate([lp for _, lp in rows])
        info = []
        for i, s in enumerate(seqs):
            k = s.params.logprobs
            if k is None:
                info.append(None)
                continue
            top = mx.argsort(-logprobs[i])[:k] if k else mx.zeros((0,), mx.uint32)
            info.append((logprobs[i, tokens[i]], top, logprobs[i, top]))
        return tokens, info

    def _decode(self):
        fed = self.y
        if fed is None:  # every token is out (a drafted step): feed each row's last
            fed, self.info = mx.array([s.generated[-1] for s in self.active]), []
        self._maybe_quantize()
        logits = self.model(input_ids=fed[:, None], cache=self.cache)[:, -1, :]
        tokens, info = self._sample(self.active, logits, fed if self.y is not None else None)
        mx.async_eval(tokens, [x for x in info if x is not None])
        return tokens, info

    def _decode_drafts(self, drafts: list[list[int]], K: int):
        """One forward over each row's last token and its drafts (padded to K), then each row
        keeps the drafts its own greedy choice agrees with: rows accept different lengths,
        and BatchKVCache.trim_rows drops each row's rejected positions. Every token is out
        before and after (no step ahead)."""
        tic = time.perf_counter()
        last = [s.generated[-1] for s in self.active]
        x = mx.array([[t] + d + [t] * (K - len(d)) for t, d in zip(last, drafts)])
        self._maybe_quantize()
        logits = self.model(input_ids=x, cache=self.cache)
        choice = mx.argmax(logits, axis=-1)  # (B, K + 1)
        # Rows that do not draft (sampling, logprobs) take position 0 as a plain step does.
        plain = [i for i, s in enumerate(self.active) if s.drafter is None]
        if plain:
            idx = mx.array(plain)
            tokens, info = self._sample([self.active[i] for i in plain], logits[idx, 0], None)
            self._hand_out([self.active[i] for i in plain], tokens, info)
        choice, drop = choice.tolist(), []
        for i, (s, d) in enumerate(zip(self.active, drafts)):
            n = agreed(d, choice[i])
            drop.append(K - n)
            if i in plain:
                continue
            s.stats.drafted += len(d)
            s.stats.accepted += n
            if d:
                s.drafter.accepted(d)  # a draft model rewinds its cache to what was kept
            s.gate.update(len(d), n, time.perf_counter() - tic)
            for t in d[:n] + [choice[i][n]]:
                if not s.done:
                    s.push(t)
        for c in self.cache:
            c.trim_rows(drop)

    def _emit(self):
        if self.y is not None and self.active:
            self._hand_out(self.active, self.y, self.info)

    @staticmethod
    def _hand_out(seqs: list[Sequence], tokens: mx.array, infos: list):
        for s, t, info in zip(seqs, tokens.tolist(), infos):
            if info is None:
                s.push(t)
            else:
                lp, top, vals = info
                s.push(t, lp.item(), list(zip(top.tolist(), vals.tolist())))

    def _advance_prompt(self):
        while len(self.active) + len(self.prefilling) < self.max_batch:
            with self._lock:
                seq = self._pending.popleft() if self._pending else None
            if seq is None:
                break
            if not seq.cancelled:
                self.prefilling.append((seq, self._prefill(seq)))
        while self.prefilling:
            seq, work = self.prefilling.popleft()
            if seq.cancelled:
                continue
            try:
                next(work)
            except StopIteration as done:
                self._join(seq, *done.value)
            except InvalidRequestError as e:  # the request's own fault (its image tokens, ...)
                seq.fail(str(e))
            except Exception as e:
                log.exception("prefill failed")
                seq.fail(f"generation failed: {e}")
            else:
                self.prefilling.append((seq, work))  # round robin: the next prompt goes next step
            return

    def _quantized(self, c: BatchKVCache) -> BatchQuantizedKVCache:
        if isinstance(c, BatchQuantizedKVCache):
            return c
        return BatchQuantizedKVCache.from_float(c, self.kv_group_size, self.kv_bits)

    def _maybe_quantize(self):
        if self.kv_bits is not None and self.cache[0].idx >= self.quantized_kv_start:
            self.cache = [self._quantized(c) for c in self.cache]

    def _join(self, seq: Sequence, layers: list, token: mx.array, info):
        rows = [BatchQuantizedKVCache.from_rows([c.state], c.group_size, c.bits) if isinstance(c, QuantizedKVCache)
                else BatchKVCache.from_rows([c.state]) for c in layers]
        if self.cache is None or not self.active:
            self.cache, self.y, self.info = rows, token, [info]
        else:
            if isinstance(rows[0], BatchQuantizedKVCache) or isinstance(self.cache[0], BatchQuantizedKVCache):
                self.cache, rows = [self._quantized(c) for c in self.cache], [self._quantized(r) for r in rows]
            for c, r in zip(self.cache, rows):
                c.extend(r)
            if self.y is None:  # the others' tokens are all out (a drafted step): this one too
                self._hand_out([seq], token, [info])
            else:
                self.y = mx.concatenate([self.y, token])
                mx.eval(self.y)  # now, not behind the decode the next step queues
                self.info.append(info)
        self.active.append(seq)

    def _prefill(self, seq: Sequence):
        """A generator: one `yield` per unit of work (a batch of tiles through the vision
        tower, one prefill chunk); returns (KV layers, first token (1,), its logprob info)."""
        model, inputs, ids, p = self.model, seq.inputs, seq.ids, seq.params
        seq.sampler = make_sampler(p.temperature, p.top_p, p.top_k, p.min_p, p.seed)
        seq.processors = make_logits_processors(p.repetition_penalty, p.repetition_context_size)
        # Salted digests keep both the feature cache and the prefix cache's tiles per partition.
        tiles = [seq.partition + d for d in tile_digests(inputs)]
        pv, pam = inputs.get("pixel_values"), inputs.get("pixel_attention_mask")
        per_tile = model.tokens_per_image(*pv.shape[-2:]) if pv is not None else 1
        cache = self.prefixes.lookup(ids, tiles, per_tile, seq.partition)
        start = seq.cached = cache.offset
        k = cache.tiles_in(ids[:start])
        arr = mx.array(ids)
        embeds = None
        if len(tiles) > k:
            uncached = ids[start:]
            model.check_image_tokens(uncached.count(model.config.image_token_id), len(tiles) - k, per_tile)
            feats, step = [], model.vision_batch_size
            for i in range(k, len(tiles), step):
                j = min(i + step, len(tiles))
                feats.append(self.features.features(model, pv[0, i:j], None if pam is None else pam[0, i:j],
                                                    tiles[i:j]))
                mx.eval(feats[-1])
                yield
            embeds = model.merge_image_features(arr[None, start:], mx.concatenate(feats))
            mx.eval(embeds)
        def quantize():  # as generate_step does before each forward
            maybe_quantize_kv_cache(cache.layers, self.kv_bits, self.kv_group_size, self.quantized_kv_start)

        last = yield from prefill_chunks(model, arr[start:], embeds, cache.layers, self.prefill_step_size, quantize)
        quantize()
        logits = model(**last, cache=cache.layers)[:, -1, :]
        token, info = self._sample([seq], logits, None)
        mx.eval(token, [x for x in info if x is not None], [c.state for c in cache.layers])
        cache.tokens, cache.tiles = ids, tiles
        self.prefixes.store(cache, seq.partition)
        if seq.draft_inputs is not None:
            yield  # the draft model's prefill of its own prompt: one more unit
            seq.drafter.start(seq.draft_inputs)
            mx.eval([c.state for c in seq.drafter.cache])
            seq.draft_inputs = None
        return cache.layers, token, info[0]

    def _drop_done(self):
        keep = [i for i, s in enumerate(self.active) if not (s.done or s.cancelled)]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        self.info = [self.info[i] for i in keep] if self.info else []
        if keep:
            for c in self.cache:
                c.filter(keep)
            self.y = self.y[mx.array(keep)] if self.y is not None else None
        else:
            self.cache, self.y, self.info = None, None, []
            mx.clear_cache()


def batch_generate(model, processor, prompts: list, images: list | None = None, *,
                   max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   stop: list[str] | None = None, max_batch: int = 16, prompt_lookup_tokens: int = 0,
                   ngram_size: int = 3, draft: DraftModel | None = None, **controls) -> list[str]:
    """Generate for many prompts at once (chat messages or strings, with `images[i]` for a
    string prompt); returns the texts in prompt order. Sequences decode together in one
    batch of up to `max_batch`, and a finished one makes room for the next.
    `prompt_lookup_tokens` > 0 drafts that many tokens per greedy row by n-gram lookup
    (speculative.PromptLookup); `draft` (speculative.DraftModel) drafts its `num_draft_tokens`
    per greedy row with a smaller model, each row through the draft's own processor and cache.
    The texts are the same."""
    engine = BatchEngine(model, processor, max_batch=max_batch, draft=draft)
    params = SamplingParams(max_tokens, temperature, top_p, stop=list(stop or []),
                            prompt_lookup_tokens=prompt_lookup_tokens, ngram_size=ngram_size)
    texts, errors = [""] * len(prompts), {}

    def collect(i):
        def on_event(e: Event):
            texts[i] += e.text
            if e.error:
                errors[i] = e.error

        return on_event

    for i, p in enumerate(prompts):
        im = images[i] if images else None
        inputs = processor(p, images=im, **controls)
        draft_inputs = draft.processor(p, images=im, **controls) if engine.draft_tokens(params) else None
        engine.add(inputs, params, collect(i), draft_inputs=draft_inputs)
    while engine.busy:
        engine.step()
    if errors:
        raise RuntimeError("; ".join(f"prompt {i}: {m}" for i, m in sorted(errors.items())))
    return texts
