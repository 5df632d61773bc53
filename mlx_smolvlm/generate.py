"""Generation: load, the cached decode loop (chunked prefill, one step evaluated ahead),
stop conditions and streaming responses. `main` runs the command line of cli.py."""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterator

import mlx.core as mx
import numpy as np

from .chat_cache import ChatCache, n_tiles, tile_digests
from .errors import InvalidRequestError
from .gguf import load_gguf
from .loading import get_model_path, load_model
from .models.cache import QUANTIZED_KV_START, make_prompt_cache, maybe_quantize_kv_cache
from .processing import load_processor, text_processor
from .sample_utils import make_sampler, sample_next
from .text_stream import TextStream
from .tokenizer import Tokenizer


def load(path_or_repo: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False,
         adapter_path: str | Path | None = None):
    """Load a model and its processor from a folder, a Hub repo id or a `.gguf` file.

    Returns `(model, processor)`. A GGUF file gives a text-only decoder (e.g. SmolLM2).
    `adapter_path`: a LoRA/DoRA adapter folder (mlx-lm or PEFT layout) applied on top.
    """
    if str(path_or_repo).endswith(".gguf"):
        path = Path(path_or_repo).expanduser()
        model, metadata = load_gguf(path, dtype=dtype, lazy=lazy)
        processor = text_processor(Tokenizer.from_gguf(path, metadata))
    else:
        path = get_model_path(str(path_or_repo))
        model, processor = load_model(path, dtype=dtype, lazy=lazy), load_processor(path)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path, dtype)
    return model, processor


def text_config(model):
    # A VLM keeps its decoder's config under text_config; a TextModel's config is one.
    return getattr(model.config, "text_config", model.config)


def generate_step(
    prompt: mx.array,
    model,
    *,
    input_embeddings: mx.array | None = None,
    prompt_cache: list | None = None,
    max_tokens: int = 256,
    sampler: Callable | None = None,
    logits_processors: list[Callable] | None = None,
    prefill_step_size: int = 512,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = QUANTIZED_KV_START,
    max_kv_size: int | None = None,
    drafter=None,
    stats=None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) pairs, computing each next token while the current one is read.

    `prompt` holds the whole context's ids (1-D). A `prompt_cache` may already hold a prefix
    of it; only the rest is prefilled, in chunks of `prefill_step_size`.
    `input_embeddings` (1, L, D), if given, are those of the uncached ids (images merged).
    `kv_bits` (4 or 8) stores the KV cache group-quantized once it holds `quantized_kv_start`
    positions; `max_kv_size` caps a new cache at that many positions (mlx-lm's options).
    `drafter` (speculative.py, after its `begin`) decodes speculatively: greedy tokens are the
    same, several per forward; `stats` (speculative.SpeculativeStats) counts the drafts.
    """
    check_kv_options(model, kv_bits, kv_group_size, max_kv_size)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, max_kv_size)
    sampler = sampler or make_sampler()
    logits_processors = logits_processors or []
    tokens = prompt

    def quantize():
        maybe_quantize_kv_cache(cache, kv_bits, kv_group_size, quantized_kv_start)

    if drafter is not None:
        # Imported here: speculative.py builds on this module's prefill.
        from .speculative import SpeculativeStats, speculative_steps

        yield from speculative_steps(
            prompt, model, drafter, cache, quantize, input_embeddings=input_embeddings, max_tokens=max_tokens,
            sampler=sampler, logits_processors=logits_processors, prefill_step_size=prefill_step_size,
            kv_bits=kv_bits, quantized_kv_start=quantized_kv_start,
            stats=stats if stats is not None else SpeculativeStats())
        return

    def step(inputs: dict):
        quantize()
        y, logprobs = sample_next(model(**inputs, cache=cache)[:, -1, :], tokens, sampler, logits_processors)
        return y, logprobs.squeeze(0)

    ids = prompt[cache[0].offset :]
    y, logprobs = step(run(prefill_chunks(model, ids, input_embeddings, cache, prefill_step_size, quantize)))
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            if logits_processors:
                tokens = mx.concatenate([tokens, y])
            next_y, next_logprobs = step({"input_ids": y[None]})
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def run(steps: Generator):
    """Drive a generator to its end and return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def prefill_chunks(model, ids: mx.array, input_embeddings, cache: list, step_size: int,
                   before_chunk: Callable = lambda: None) -> Generator[None, None, dict]:
    """Run all but the last position of the uncached prompt `ids` (or of its
    `input_embeddings`) through `cache`, in chunks of `step_size`, yielding after each; returns
    the model inputs of that last position, whose logits give the first token. generate_step
    runs it through; the batch engine one chunk per step, between decode steps."""

    def chunk(i, j):
        if input_embeddings is not None:
            return {"input_embeddings": input_embeddings[:, i:j]}
        return {"input_ids": ids[None, i:j]}

    new, done = ids.size, 0
    while new - done > 1:
        n = min(step_size, new - done - 1)
        before_chunk()
        model(**chunk(done, done + n), cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        mx.clear_cache()
        yield
    return chunk(done, new)


def check_kv_options(model, kv_bits, kv_group_size, max_kv_size):
    if kv_bits is not None and kv_bits not in (4, 8):
        raise InvalidRequestError(f"kv_bits must be 4 or 8, got {kv_bits}")
    if kv_group_size not in (32, 64, 128):
        raise InvalidRequestError(f"kv_group_size must be 32, 64 or 128, got {kv_group_size}")
    head_dim = text_config(model).head_dim  # mx.quantize groups each key's last axis
    if kv_bits is not None and head_dim % kv_group_size:
        raise InvalidRequestError(f"kv_group_size {kv_group_size} does not divide the model's head_dim of "
                                  f"{head_dim}: pick a smaller group")
    if kv_bits is not None and max_kv_size is not None:
        raise InvalidRequestError("a rotating cache (max_kv_size) cannot be quantized (kv_bits), as in mlx-lm")


@dataclass
class GenerationResponse:
    """One streamed step: the new text and token, and the running statistics.

    `finish_reason` is None while generating, then "stop" (end of utterance / eos or a
    stop string) or "length" (max_tokens). Speeds are tokens per second; memory is in GB.
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    cached_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: drafts checked, and of those accepted
    accepted_tokens: int = 0


def check_length(model, n_prompt: int, max_tokens: int):
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    limit = text_config(model).max_position_embeddings
    if n_prompt + max_tokens > limit:
        raise InvalidRequestError(
            f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}: {n_prompt + max_tokens} "
            f"is beyond the model's context length of {limit} tokens"
        )


def clip_max_tokens(model, n_prompt: int, max_tokens: int) -> int:
    """`max_tokens` cut to the context left after the prompt, as llama-server bounds generation
    (the answer then ends with finish_reason "length"); an error if the prompt leaves no room."""
    limit = text_config(model).max_position_embeddings
    if n_prompt >= limit:
        raise InvalidRequestError(f"the prompt has {n_prompt} tokens: no room left in the model's "
                                  f"context length of {limit} tokens")
    return min(max_tokens, limit - n_prompt)


def stream_generate(
    model,
    processor,
    prompt,
    images=None,
    *,
    max_tokens: int = 256,
    sampler: Callable | None = None,
    logits_processors: list[Callable] | None = None,
    stop: list[str] | None = None,
    prompt_cache: ChatCache | None = None,
    prefill_step_size: int = 512,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = QUANTIZED_KV_START,
    max_kv_size: int | None = None,
    skip_special_tokens: bool = True,
    clip_to_context: bool = False,
    draft=None,
    **controls,
) -> Iterator[GenerationResponse]:
    """Generate from chat `messages` (transformers' format) or a raw prompt string.

    Yields a GenerationResponse per token. `skip_special_tokens=False` keeps added special
    tokens in the text (DocTags: `<doctag>`, `<loc_12>` ...; `stop` strings may be such
    tokens); the end-of-sequence token ends generation and is never text. A prompt plus
    `max_tokens` beyond the context length is an error, unless `clip_to_context`: then
    generation ends where the context does (finish_reason "length"). `controls` go to the processor
    (do_image_splitting, max_tiles, longest_edge). A `prompt_cache` kept across calls
    (multi-turn chat) prefills only the tokens that follow what it already holds.
    KV-cache options (`kv_bits`, `kv_group_size`, `quantized_kv_start`, `max_kv_size`): see
    generate_step; `max_kv_size` applies to a cache made here (ChatCache takes its own).
    `draft` (speculative.PromptLookup or DraftModel) turns on speculative decoding: greedy
    output stays the same tokens, several per forward when drafts are accepted.
    """
    inputs = processor(prompt, images=images, **controls)
    ids = np.asarray(inputs["input_ids"])[0].tolist()
    if clip_to_context and max_tokens >= 1:
        max_tokens = clip_max_tokens(model, len(ids), max_tokens)
    check_length(model, len(ids), max_tokens)
    check_kv_options(model, kv_bits, kv_group_size, max_kv_size)
    cache = prompt_cache if prompt_cache is not None else ChatCache(model, max_kv_size)
    if "pixel_values" in inputs:  # tokens per tile follow the pixel size (small video frames)
        cache.image_seq_len = model.tokens_per_image(*inputs["pixel_values"].shape[-2:])
    # Digests only matter to a cache a later call may reuse (SHA1 of a 64-frame video: 200 MB).
    tiles = tile_digests(inputs) if prompt_cache is not None else [None] * n_tiles(inputs)
    start = cache.trim_to(cache.reusable_prefix(ids, tiles))
    k = cache.tiles_in(ids[:start])
    pixels = None
    if len(tiles) > k:
        pam = inputs.get("pixel_attention_mask")
        pixels = (mx.array(inputs["pixel_values"][:, k:]), None if pam is None else mx.array(pam[:, k:]))

    text_stream = TextStream(processor.tokenizer, max_tokens, stop, skip_special_tokens)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_arr = mx.array(ids)
    embeds = None
    if pixels:
        embeds = model.get_input_embeddings(prompt_arr[None, start:], *pixels)
    stats = None
    if draft is not None:
        from .speculative import SpeculativeStats

        draft.begin(processor, prompt, images, controls)
        stats = SpeculativeStats()
    steps = generate_step(
        prompt_arr,
        model,
        drafter=draft,
        stats=stats,
        input_embeddings=embeds,
        prompt_cache=cache.layers,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    generated = []
    try:
        for n, (token, logprobs) in enumerate(steps):
            if n == 0:
                prompt_time = time.perf_counter() - tic
                tic = time.perf_counter()
            generated.append(token)
            text, finish = text_stream.add(token)
            yield GenerationResponse(
                text=text,
                token=token,
                logprobs=logprobs,
                prompt_tokens=len(ids),
                prompt_tps=(len(ids) - start) / prompt_time,
                generation_tokens=n + 1,
                generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
                cached_tokens=start,
                draft_tokens=stats.drafted if stats else 0,
                accepted_tokens=stats.accepted if stats else 0,
            )
            if finish:
                break
    finally:
        steps.close()  # a speculative loop trims what it ran ahead of the tokens taken
        cache.record(ids, generated, tiles)


def generate(model, processor, prompt, images=None, verbose: bool = False, **kwargs) -> str:
    """Generate the whole answer and return its text.

    With `verbose`, stream it to stdout and print the statistics. For the statistics
    as values, read the last GenerationResponse of `stream_generate`.
    """
    text = ""
    for r in stream_generate(model, processor, prompt, images, **kwargs):
        if verbose:
            print(r.text, end="", flush=True)
        text += r.text
    if verbose:
        print()
        print(format_stats(r))
    return text


def format_stats(r: GenerationResponse) -> str:
    cached = f" ({r.cached_tokens} cached)" if r.cached_tokens else ""
    spec = ""
    if r.draft_tokens:
        spec = (f"Speculative: {r.draft_tokens} drafted, {r.accepted_tokens} accepted "
                f"({100 * r.accepted_tokens / r.draft_tokens:.0f}%)\n")
    return (
        "==========\n"
        f"Prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.1f} tokens-per-sec\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens-per-sec\n"
        f"{spec}Peak memory: {r.peak_memory:.3f} GB"
    )


def main(argv=None) -> int:
    """The command line (mlx_smolvlm/cli.py), run as `python -m mlx_smolvlm.generate`."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
