"""Continuous batching: sequences join a running decode batch and leave it when done.

Each new sequence is prefilled alone (its own images, its own chunks, exactly as
`generate_step` does), then its KV rows join the batch (models/cache.py BatchKVCache) and it decodes
together with the others, one token per step. `BatchEngine` is the core that the server
runs on a thread and that `batch_generate` runs to completion.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import mlx.core as mx
import numpy as np

from .chat_cache import tile_digests
from .generate import check_length, clip_max_tokens, prefill
from .models.cache import BatchKVCache
from .prefix_cache import FeatureCache, PrefixCache
from .sample_utils import apply_top_p
from .speculative import Gate, PromptLookup
from .text_stream import TextStream


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's and the k most likely
    skip_special_tokens: bool = True
    # Speculative decoding by prompt lookup (0: off). Greedy rows without logprobs only;
    # others decode one token a step.
    prompt_lookup_tokens: int = 0
    ngram_size: int = 3


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
    draft_tokens: int = 0  # prompt lookup: drafts checked, and of those accepted
    accepted_tokens: int = 0


def make_row_sampler(temp: float, top_p: float, seed: int | None) -> Callable:
    """(1, V) logprobs -> (1,) token; its own random key, so a seeded request repeats."""
    if temp == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    key = mx.random.key(seed if seed is not None else int(np.random.randint(2**31)))

    def sample(logprobs):
        nonlocal key
        key, k = mx.random.split(key)
        return mx.random.categorical(apply_top_p(logprobs / temp, top_p), key=k)

    return sample


class Sequence:
    def __init__(self, inputs: dict, params: SamplingParams, on_event: Callable, tokenizer,
                 partition: bytes = b""):
        self.inputs = inputs
        self.partition = partition  # cache partition (tenant, cache_salt): reuse only within it
        self.ids = np.asarray(inputs["input_ids"])[0].tolist()
        self.params = params
        self.on_event = on_event
        self.sampler = None  # made on the engine thread, which owns every MLX array
        self.text = TextStream(tokenizer, params.max_tokens, params.stop, params.skip_special_tokens)
        self.cached = 0
        self.last = None  # the token to feed next
        self.done = self.cancelled = False
        self.context = list(self.ids)  # prompt and answer: what prompt lookup searches
        self.lookup = self.gate = None
        if params.prompt_lookup_tokens and params.temperature == 0 and params.logprobs is None:
            self.lookup, self.gate = PromptLookup(params.prompt_lookup_tokens, params.ngram_size), Gate()
        self.drafted = self.accepted = 0

    def push(self, token: int, logprob: float | None = None, top=None):
        text, finish = self.text.add(token)
        self.last, self.done = token, finish is not None
        self.context.append(token)
        self.on_event(Event(text, token, len(self.ids), self.text.n, self.cached, finish, logprob, top,
                            draft_tokens=self.drafted, accepted_tokens=self.accepted))

    def drafts(self) -> list[int]:
        if self.lookup is None or not self.gate.open():
            return []
        k = min(self.lookup.num_draft_tokens, self.params.max_tokens - self.text.n - 1)
        return self.lookup.propose(self.context, len(self.ids), k, None)[0] if k > 0 else []

    def fail(self, message: str):
        self.done = True
        self.on_event(Event("", None, len(self.ids), self.text.n, self.cached, "error", error=message))


def _logprob_info(logprobs: mx.array, token: mx.array, k: int):
    top = mx.argsort(-logprobs)[:k] if k else mx.zeros((0,), mx.uint32)
    return logprobs[token], top, logprobs[top]


class BatchEngine:
    """Admits sequences (any thread: `add`, `cancel`) and advances them all (`step`, on one thread)."""

    def __init__(self, model, processor, max_batch: int = 16, prefill_step_size: int = 512,
                 feature_cache_tiles: int = 64, prefix_cache_entries: int = 8):
        self.model, self.processor = model, processor
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.features = FeatureCache(feature_cache_tiles)
        self.prefixes = PrefixCache(model, prefix_cache_entries)
        self.active: list[Sequence] = []
        self.cache: list[BatchKVCache] | None = None
        self._pending: deque[Sequence] = deque()
        self._lock = threading.Lock()

    def add(self, inputs: dict, params: SamplingParams, on_event: Callable, partition: bytes = b"") -> Sequence:
        """Queue a prompt (processor output); raises InvalidRequestError if it cannot fit. Cached
        prompts and image features are shared only between sequences of one `partition`.
        `max_tokens` beyond the context left after the prompt is cut to it (finish_reason "length")."""
        n = np.asarray(inputs["input_ids"]).shape[-1]
        if params.max_tokens >= 1:
            params = replace(params, max_tokens=clip_max_tokens(self.model, n, params.max_tokens))
        check_length(self.model, n, params.max_tokens)
        seq = Sequence(inputs, params, on_event, self.processor.tokenizer, partition)
        with self._lock:
            self._pending.append(seq)
        return seq

    @staticmethod
    def cancel(seq: Sequence):
        seq.cancelled = True  # leaves the batch at the start of the next step

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self.active or self._pending)

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": self.waiting,
                "image_features": self.features.stats(), "prefixes": self.prefixes.stats()}

    def step(self):
        """Admit waiting sequences (each prefilled alone), then decode one token for all."""
        self._admit()
        self._drop_done()
        if self.active:
            try:
                self._decode()
            except Exception as e:  # a fault of the batch itself: end every sequence in it
                for s in self.active:
                    s.fail(f"generation failed: {e}")
            self._drop_done()

    def fail_all(self, message: str):
        """End every sequence, running or waiting, and free the batch."""
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for s in self.active + pending:
            s.fail(message)
        self.active, self.cache = [], None
        mx.clear_cache()

    def _admit(self):
        while len(self.active) < self.max_batch:
            with self._lock:
                seq = self._pending.popleft() if self._pending else None
            if seq is None:
                return
            if seq.cancelled:
                continue
            try:
                layers = self._prefill(seq)
            except Exception as e:
                seq.fail(str(e))
                continue
            if seq.done:
                continue
            rows = [BatchKVCache.from_rows([c.state]) for c in layers]
            if self.cache is None:
                self.cache = rows
            else:
                for c, r in zip(self.cache, rows):
                    c.extend(r)
            self.active.append(seq)

    def _prefill(self, seq: Sequence) -> list:
        model, inputs, ids, p = self.model, seq.inputs, seq.ids, seq.params
        seq.sampler = make_row_sampler(p.temperature, p.top_p, p.seed)
        # Salted digests keep both the feature cache and the prefix cache's tiles per partition.
        tiles = [seq.partition + d for d in tile_digests(inputs)]
        pv = inputs.get("pixel_values")
        per_tile = model.tokens_per_image(*pv.shape[-2:]) if pv is not None else 1
        cache = self.prefixes.lookup(ids, tiles, per_tile, seq.partition)
        start = seq.cached = cache.offset
        k = cache.tiles_in(ids[:start])
        arr = mx.array(ids)
        embeds = None
        if len(tiles) > k:
            pam = inputs.get("pixel_attention_mask")
            pam = np.ones((1, *pv.shape[1:2], *pv.shape[3:]), bool) if pam is None else pam
            feats = self.features.features(model, pv[0, k:], pam[0, k:], tiles[k:])
            embeds = model.merge_image_features(arr[None, start:], feats)
        last = prefill(model, arr[start:], embeds, cache.layers, self.prefill_step_size)
        logits = model(**last, cache=cache.layers)[:, -1, :]
        cache.tokens, cache.tiles = ids, tiles
        self.prefixes.store(cache, seq.partition)
        self._emit([seq], logits)
        return cache.layers

    def _decode(self):
        drafts = [s.drafts() for s in self.active]
        K = max(map(len, drafts))
        if K == 0:
            y = mx.array([[s.last] for s in self.active])
            self._emit(self.active, self.model(input_ids=y, cache=self.cache)[:, -1, :])
            return
        self._decode_drafts(drafts, K)

    def _decode_drafts(self, drafts: list[list[int]], K: int):
        """One forward over each row's last token and its drafts (padded to K), then each row
        keeps the drafts its own greedy choice agrees with: rows accept different lengths,
        and BatchKVCache.trim_rows drops each row's rejected positions."""
        tic = time.perf_counter()
        x = mx.array([[s.last] + d + [s.last] * (K - len(d)) for s, d in zip(self.active, drafts)])
        logits = self.model(input_ids=x, cache=self.cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        choice = mx.argmax(logprobs, axis=-1)  # (B, K + 1)
        # Rows that do not draft (sampling, logprobs) take position 0 as a plain step does.
        plain = {i: s for i, s in enumerate(self.active) if s.lookup is None}
        if plain:
            self._emit_rows(plain, logprobs[:, 0])
        mx.eval(choice)
        choice, drop = choice.tolist(), []
        for i, (s, d) in enumerate(zip(self.active, drafts)):
            n = 0
            while n < len(d) and d[n] == choice[i][n]:
                n += 1
            drop.append(K - n)
            if i in plain:
                continue
            s.drafted, s.accepted = s.drafted + len(d), s.accepted + n
            s.gate.update(len(d), n, time.perf_counter() - tic)
            for t in d[:n] + [choice[i][n]]:
                if not s.done:
                    s.push(t)
        for c in self.cache:
            c.trim_rows(drop)

    def _emit(self, seqs: list[Sequence], logits: mx.array):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self._emit_rows(dict(enumerate(seqs)), logprobs)

    @staticmethod
    def _emit_rows(rows: dict[int, Sequence], logprobs: mx.array):
        """Sample and push one token for each sequence rows[i] from logprobs[i]."""
        if all(s.params.temperature == 0 for s in rows.values()):
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            tokens = mx.concatenate([rows[i].sampler(logprobs[i : i + 1]) if i in rows else mx.array([0])
                                     for i in range(logprobs.shape[0])])
        info = {i: _logprob_info(logprobs[i], tokens[i], s.params.logprobs)
                for i, s in rows.items() if s.params.logprobs is not None}
        mx.eval(tokens, info)
        tokens = tokens.tolist()
        for i, s in rows.items():
            if i in info:
                lp, top, vals = info[i]
                s.push(tokens[i], lp.item(), list(zip(top.tolist(), vals.tolist())))
            else:
                s.push(tokens[i])

    def _drop_done(self):
        keep = [i for i, s in enumerate(self.active) if not (s.done or s.cancelled)]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if keep:
            for c in self.cache:
                c.filter(keep)
        else:
            self.cache = None
            mx.clear_cache()


def batch_generate(model, processor, prompts: list, images: list | None = None, *,
                   max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   stop: list[str] | None = None, max_batch: int = 16, prompt_lookup_tokens: int = 0,
                   ngram_size: int = 3, **controls) -> list[str]:
    """Generate for many prompts at once (chat messages or strings, with `images[i]` for a
    string prompt); returns the texts in prompt order. Sequences decode together in one
    batch of up to `max_batch`, and a finished one makes room for the next.
    `prompt_lookup_tokens` > 0 drafts that many tokens per greedy row by n-gram lookup
    (speculative.PromptLookup); the texts are the same."""
    engine = BatchEngine(model, processor, max_batch=max_batch)
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
        inputs = processor(p, images=images[i] if images else None, **controls)
        engine.add(inputs, params, collect(i))
    while engine.busy:
        engine.step()
    if errors:
        raise RuntimeError("; ".join(f"prompt {i}: {m}" for i, m in sorted(errors.items())))
    return texts
