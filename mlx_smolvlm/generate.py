"""Generation: load, the cached decode loop, streaming responses, and the CLI.

    python -m mlx_smolvlm.generate --image photo.jpg --prompt "Describe this image."
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .cache import KVCache, make_prompt_cache
from .detokenizer import StreamingDetokenizer
from .gguf import load_gguf
from .loading import CheckpointError, get_model_path, load_model
from .model import Model
from .processing import load_processor, text_processor
from .prompt_cache import PromptCache, tile_digests
from .sample_utils import make_logits_processors, make_sampler
from .tokenizer import Tokenizer

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def load(path_or_repo: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False):
    """Load a model and its processor from a folder, a Hub repo id or a `.gguf` file.

    Returns `(model, processor)`. A GGUF file gives a text-only decoder (e.g. SmolLM2).
    """
    if str(path_or_repo).endswith(".gguf"):
        path = Path(path_or_repo).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        model, _ = load_gguf(path, lazy=lazy)
        return model, text_processor(Tokenizer.from_gguf(path))
    path = get_model_path(str(path_or_repo))
    return load_model(path, dtype=dtype, lazy=lazy), load_processor(path)


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
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) pairs, computing each next token while the current one is read.

    `prompt` holds the whole context's ids (1-D). A `prompt_cache` may already hold a prefix
    of it; only the rest is prefilled, in chunks of `prefill_step_size`.
    `input_embeddings` (1, L, D), if given, are those of the uncached ids (images merged).
    """
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    sampler = sampler or make_sampler()
    logits_processors = logits_processors or []
    tokens = prompt
    ids = prompt[cache[0].offset :]

    def chunk(i, j):
        if input_embeddings is not None:
            return {"input_embeddings": input_embeddings[:, i:j]}
        return {"input_ids": ids[None, i:j]}

    def step(inputs: dict):
        nonlocal tokens
        logits = model(**inputs, cache=cache)[:, -1, :]
        if logits_processors:
            for p in logits_processors:
                logits = p(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    new, done = ids.size, 0
    while new - done > 1:
        n = min(prefill_step_size, new - done - 1)
        model(**chunk(done, done + n), cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        mx.clear_cache()
    y, logprobs = step(chunk(done, new))
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


def check_length(model, n_prompt: int, max_tokens: int):
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    limit = text_config(model).max_position_embeddings
    if n_prompt + max_tokens > limit:
        raise ValueError(
            f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}: {n_prompt + max_tokens} "
            f"is beyond the model's context length of {limit} tokens"
        )


def _held_back(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    for k in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return k
    return 0


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
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = 512,
    **controls,
) -> Iterator[GenerationResponse]:
    """Generate from chat `messages` (transformers' format) or a raw prompt string.

    Yields a GenerationResponse per token. `controls` go to the processor
    (do_image_splitting, max_tiles, longest_edge). A `prompt_cache` kept across calls
    (multi-turn chat) prefills only the tokens that follow what it already holds.
    """
    inputs = processor(prompt, images=images, **controls)
    ids = np.asarray(inputs["input_ids"])[0].tolist()
    check_length(model, len(ids), max_tokens)
    cache = prompt_cache if prompt_cache is not None else PromptCache(model)
    tiles = tile_digests(inputs)
    start = cache.reusable_prefix(ids, tiles)
    cache.trim_to(start)
    k = cache.tiles_in(ids[:start])
    pixels = None
    if len(tiles) > k:
        pam = inputs.get("pixel_attention_mask")
        pixels = (mx.array(inputs["pixel_values"][:, k:]), None if pam is None else mx.array(pam[:, k:]))

    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_ids
    detok = StreamingDetokenizer(tokenizer)
    stop = [s for s in (stop or []) if s]
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_arr = mx.array(ids)
    embeds = None
    if pixels:
        embeds = model.get_input_embeddings(prompt_arr[None, start:], *pixels)
    steps = generate_step(
        prompt_arr,
        model,
        input_embeddings=embeds,
        prompt_cache=cache.layers,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
    )
    generated, held = [], ""
    try:
        for n, (token, logprobs) in enumerate(steps):
            if n == 0:
                prompt_time = time.perf_counter() - tic
                tic = time.perf_counter()
            generated.append(token)
            finish = None
            if token in eos:
                finish = "stop"
            else:
                detok.add_token(token)
                if n + 1 == max_tokens:
                    finish = "length"
            if finish:
                detok.finalize()
            held += detok.last_segment
            cut = min((held.find(s) for s in stop if s in held), default=-1)
            if cut >= 0:
                text, held, finish = held[:cut], "", "stop"
            elif finish or not stop:
                text, held = held, ""
            else:
                k = len(held) - _held_back(held, stop)
                text, held = held[:k], held[k:]
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
            )
            if finish:
                break
    finally:
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
    return (
        "==========\n"
        f"Prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.1f} tokens-per-sec\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens-per-sec\n"
        f"Peak memory: {r.peak_memory:.3f} GB"
    )


def estimate_peak_memory(cfg, weight_bytes: int, tiles: int, prompt_tokens: int, max_tokens: int, dtype_bytes: int) -> float:
    """A rough peak-memory prediction in GB for --dry-run: weights, KV cache and the larger
    of the vision tower's activations (one batch of tiles) and one prefill chunk's."""
    t = getattr(cfg, "text_config", cfg)
    L = -(-(prompt_tokens + max_tokens) // KVCache.step) * KVCache.step
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * L * dtype_bytes
    vision = 0
    if tiles:
        v, n = cfg.vision_config, min(tiles, Model.vision_batch_size)
        P = v.patches_per_side**2
        acts = n * P * (6 * v.hidden_size + 2 * v.intermediate_size) * dtype_bytes
        vision = acts + n * v.num_attention_heads * P * P * 4
    C = min(512, prompt_tokens)
    prefill = C * (6 * t.hidden_size + 3 * t.intermediate_size) * dtype_bytes
    prefill += t.num_attention_heads * C * prompt_tokens * 4 + t.vocab_size * 4
    return (weight_bytes + kv + max(vision, prefill)) / 1e9


def _checked(kind, ok, what):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_smolvlm.generate", description="Describe images, answer and chat with SmolVLM in MLX."
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id, local folder or .gguf file")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--prompt", help="the question (default with images: 'Describe this image.')")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-tokens", type=_checked(int, lambda v: v >= 1, ">= 1"), default=256)
    p.add_argument("--temp", type=_checked(float, lambda v: v >= 0, ">= 0"), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0)
    p.add_argument("--top-k", type=_checked(int, lambda v: v >= 0, ">= 0"), default=0, help="0 = off")
    p.add_argument("--min-p", type=_checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=0.0)
    p.add_argument("--repetition-penalty", type=_checked(float, lambda v: v > 0, "> 0"))
    p.add_argument(
        "--repetition-context-size", type=_checked(int, lambda v: v >= 0, ">= 0"), default=20,
        help="tokens the repetition penalty looks back over (0 = all)",
    )
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--no-split", action="store_true", help="one global tile per image, no tiling")
    split.add_argument("--max-tiles", type=_checked(int, lambda v: v >= 1, ">= 1"), help="cap tiles per image")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--verbose", action="store_true", help="print prompt/decode speed and peak memory")
    p.add_argument("--dry-run", action="store_true", help="report tiles, tokens and predicted memory only")
    return p


def message(processor, role: str, text: str, images=()) -> dict:
    # Text-only chat templates (SmolLM2's) take a string; SmolVLM's take a content list.
    if processor.image_processor is None:
        if images:
            raise ValueError("this model has no image processor: it takes text only")
        return {"role": role, "content": text}
    content = [{"type": "image", "url" if "://" in str(x) else "path": x} for x in images]
    return {"role": role, "content": content + [{"type": "text", "text": text}]}


def first_messages(processor, args) -> list[dict]:
    messages = [message(processor, "system", args.system)] if args.system else []
    if args.prompt is not None or args.image:
        messages.append(message(processor, "user", args.prompt or "", args.image))
    return messages


def dry_run(args, controls) -> str:
    if args.model.endswith(".gguf"):
        from .gguf import read_gguf
        from .gguf import text_config as gguf_text_config

        path = Path(args.model).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        cfg = gguf_text_config(*reversed(read_gguf(path)))
        processor = text_processor(Tokenizer.from_gguf(path))
        weight_bytes, dtype_bytes = path.stat().st_size, 4
    else:
        from .config import ModelConfig
        from .loading import load_config

        path = get_model_path(args.model)
        raw = load_config(path)
        cfg = ModelConfig.from_dict(raw)
        processor = load_processor(path)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        dtype_bytes = 2 if raw.get("torch_dtype", raw.get("dtype")) in ("bfloat16", "float16") else 4
    messages = first_messages(processor, args)
    report = processor.preflight(messages, **controls)
    n_prompt = processor(messages, **controls)["input_ids"].shape[1]
    limit = getattr(cfg, "text_config", cfg).max_position_embeddings
    peak = estimate_peak_memory(cfg, weight_bytes, report.total_tiles, n_prompt, args.max_tokens, dtype_bytes)
    lines = [str(report)] if report.images else []
    lines += [
        f"prompt: {n_prompt} tokens + up to {args.max_tokens} new = {n_prompt + args.max_tokens} "
        f"of {limit} context",
        f"predicted peak memory: {peak:.3f} GB (weights {weight_bytes / 1e9:.3f} GB)",
    ]
    if n_prompt + args.max_tokens > limit:
        raise ValueError(lines[-2] + ": beyond the context length")
    return "\n".join(lines)


def stream_to_stdout(model, processor, messages, args, controls, prompt_cache=None):
    text, r = "", None
    for r in stream_generate(
        model,
        processor,
        messages,
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp, args.top_p, args.top_k, args.min_p),
        logits_processors=make_logits_processors(args.repetition_penalty, args.repetition_context_size),
        stop=args.stop,
        prompt_cache=prompt_cache,
        **controls,
    ):
        print(r.text, end="", flush=True)
        text += r.text
    print()
    if args.verbose:
        print(format_stats(r))
    return text


def chat(model, processor, messages, args, controls):
    cache = PromptCache(model)
    prompt, images = args.prompt, args.image
    print("Chat: type a message; Ctrl-D or an empty line ends.", file=sys.stderr)
    while True:
        if prompt is None:
            try:
                prompt = input(">> ")
            except EOFError:
                print()
                return
            if not prompt.strip():
                return
        messages.append(message(processor, "user", prompt, images))
        reply = stream_to_stdout(model, processor, messages, args, controls, cache)
        messages.append(message(processor, "assistant", reply))
        prompt, images = None, ()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for x in args.image:
        if "://" not in x and not x.startswith("data:") and not Path(x).expanduser().is_file():
            parser.error(f"--image {x}: no such file")
    if args.prompt is None and not args.chat:
        if not args.image:
            parser.error("--prompt is required without --image")
        args.prompt = "Describe this image."
    if args.seed is not None:
        mx.random.seed(args.seed)
    controls = {"do_image_splitting": False} if args.no_split else {}
    if args.max_tiles:
        controls["max_tiles"] = args.max_tiles
    try:
        if args.dry_run:
            print(dry_run(args, controls))
            return 0
        model, processor = load(args.model)
        if args.chat:
            system = [message(processor, "system", args.system)] if args.system else []
            chat(model, processor, system, args, controls)
        else:
            stream_to_stdout(model, processor, first_messages(processor, args), args, controls)
        return 0
    except KeyboardInterrupt:
        # The partial answer is already on stdout; end its line and leave quietly.
        print(flush=True)
        print("[interrupted]", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
