"""The command line: describe images, answer and chat with SmolVLM (or a text-only GGUF).
`mlx_smolvlm.generate.main` runs it, so users type

    python -m mlx_smolvlm.generate --image photo.jpg --prompt "Describe this image."
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from . import blas
from .chat_cache import ChatCache
from .errors import InvalidRequestError, SmolVLMError
from .generate import format_stats, load, stream_generate
from .loading import get_model_path
from .models.cache import QUANTIZED_KV_START, KVCache
from .models.smolvlm import Model
from .processing import load_processor, text_processor
from .sample_utils import make_logits_processors, make_sampler
from .speculative import DraftModel, PromptLookup
from .tokenizer import Tokenizer

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def estimate_peak_memory(
    cfg, weight_bytes: int, tiles: int, prompt_tokens: int, max_tokens: int, dtype_bytes: int
) -> float:
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


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "stored": None}


def pick_dtype(choice: str) -> tuple[mx.Dtype | None, str]:
    """The compute dtype for `--dtype` (None: as stored), and why, for --verbose."""
    if choice != "auto":
        return DTYPES[choice], f"{choice} (--dtype)"
    if mx.default_device() == mx.cpu and blas.state["library"]:
        # MLX's CPU backend sends float32 matmuls to the BLAS; bfloat16 ones it computes itself,
        # ~10x slower than OpenBLAS (bench/real_config_forward.py).
        return mx.float32, "float32 (fastest on a CPU with a fast BLAS; --dtype to override)"
    return None, "as stored (--dtype to override)"


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
    p.add_argument("--adapter-path", help="LoRA/DoRA adapter folder (mlx-lm or PEFT layout) to apply")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--prompt", help="the question (default with images: 'Describe this image.')")
    p.add_argument("--system", help="a system message")
    at_least_1 = _checked(int, lambda v: v >= 1, ">= 1")
    p.add_argument("--max-tokens", type=at_least_1, default=256)
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
    p.add_argument("--keep-special-tokens", action="store_true",
                   help="keep added special tokens in the text (DocTags models: <doctag>, <loc_N> ...)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--no-split", action="store_true", help="one global tile per image, no tiling")
    split.add_argument("--max-tiles", type=at_least_1, help="tiles per image at most")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable; SmolVLM2)")
    p.add_argument("--fps", type=_checked(float, lambda v: v > 0, "> 0"),
                   help="video frames sampled per second (default: the model's, 1)")
    p.add_argument("--max-frames", type=_checked(int, lambda v: v >= 1, ">= 1"),
                   help="most frames per video (default: the model's, 64)")
    p.add_argument("--frame-size", type=_checked(int, lambda v: v >= 1, ">= 1"),
                   help="square video frame side in pixels; smaller means fewer tokens per frame "
                   "(256M/500M: 512 or a multiple of 64 below; 2.2B: 384 or a multiple of 42 below; "
                   "default: the model's)")
    kv = p.add_argument_group("KV cache (as in mlx-lm)")
    kv.add_argument("--kv-bits", type=int, choices=[4, 8], help="store the KV cache group-quantized")
    kv.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64)
    kv.add_argument("--quantized-kv-start", type=_checked(int, lambda v: v >= 0, ">= 0"),
                    default=QUANTIZED_KV_START,
                    help=f"quantize once the cache holds this many positions (default {QUANTIZED_KV_START}: "
                    "short prompts keep the float answer, videos still get the saving; 0: from the start)")
    kv.add_argument("--max-kv-size", type=_checked(int, lambda v: v > 4, "> 4"),
                    help="cap the cache at this many positions (rotating: the first 4 and the most recent)")
    spec = p.add_argument_group("speculative decoding (greedy output unchanged)")
    drafts = spec.add_mutually_exclusive_group()
    drafts.add_argument("--prompt-lookup-tokens", type=at_least_1, metavar="N",
                        help="draft N tokens by n-gram lookup in the prompt and the answer")
    drafts.add_argument("--draft-model", metavar="PATH",
                        help="a smaller model with the same tokenizer drafting tokens (e.g. SmolVLM2-256M)")
    spec.add_argument("--ngram-size", type=at_least_1, default=3,
                      help="longest n-gram prompt lookup matches (default 3; shorter ones are tried next)")
    spec.add_argument("--num-draft-tokens", type=at_least_1, default=3, help="tokens the draft model proposes")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="compute dtype of the float weights (auto: float32 on a CPU with a fast BLAS, "
                   "else as stored)")
    p.add_argument("--verbose", action="store_true", help="print prompt/decode speed and peak memory")
    p.add_argument("--dry-run", action="store_true", help="report tiles, tokens and predicted memory only")
    return p


def message(processor, role: str, text: str, images=(), videos=()) -> dict:
    if not (images or videos):
        return processor.text_message(role, text)
    if processor.image_processor is None:
        raise InvalidRequestError("this model has no image processor: it takes text only")
    content = [{"type": "video", "path": x} for x in videos]
    content += [{"type": "image", "url" if "://" in str(x) else "path": x} for x in images]
    return {"role": role, "content": content + [{"type": "text", "text": text}]}


def first_messages(processor, args) -> list[dict]:
    messages = [message(processor, "system", args.system)] if args.system else []
    if args.prompt is not None or args.image or args.video:
        messages.append(message(processor, "user", args.prompt or "", args.image, args.video))
    return messages


def dry_run(args, controls) -> str:
    if args.model.endswith(".gguf"):
        from .gguf import read_gguf
        from .gguf import text_config as gguf_text_config

        path = Path(args.model).expanduser()
        weights, metadata = read_gguf(path)
        cfg = gguf_text_config(metadata, weights)
        processor = text_processor(Tokenizer.from_gguf(path, metadata))
        weight_bytes, dtype_bytes = path.stat().st_size, 4
    else:
        from .models.config import ModelConfig
        from .loading import load_config

        path = get_model_path(args.model)
        raw = load_config(path)
        cfg = ModelConfig.from_dict(raw)
        processor = load_processor(path)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        dtype_bytes = 2 if raw.get("torch_dtype", raw.get("dtype")) in ("bfloat16", "float16") else 4
        dtype = pick_dtype(args.dtype)[0]
        if dtype is not None and not raw.get("quantization"):
            weight_bytes = weight_bytes * dtype.size // dtype_bytes
        dtype_bytes = dtype.size if dtype is not None else dtype_bytes
    messages = first_messages(processor, args)
    report = processor.preflight(messages, **controls)
    n_prompt = processor(messages, **controls)["input_ids"].shape[1]
    limit = getattr(cfg, "text_config", cfg).max_position_embeddings
    tiles = report.total_tiles + sum(len(v.indices) for v, _, _ in report.videos)
    peak = estimate_peak_memory(cfg, weight_bytes, tiles, n_prompt, args.max_tokens, dtype_bytes)
    lines = [str(report)] if report.images or report.videos else []
    lines += [
        f"prompt: {n_prompt} tokens + up to {args.max_tokens} new = {n_prompt + args.max_tokens} "
        f"of {limit} context",
        f"predicted peak memory: {peak:.3f} GB (weights {weight_bytes / 1e9:.3f} GB)",
    ]
    if n_prompt + args.max_tokens > limit:
        raise InvalidRequestError(lines[-2] + ": beyond the context length")
    return "\n".join(lines)


def stream_to_stdout(model, processor, messages, args, controls, prompt_cache=None, draft=None):
    text, r = "", None
    for r in stream_generate(
        model,
        processor,
        messages,
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp, args.top_p, args.top_k, args.min_p, args.seed),
        logits_processors=make_logits_processors(args.repetition_penalty, args.repetition_context_size),
        stop=args.stop,
        prompt_cache=prompt_cache,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        max_kv_size=args.max_kv_size,
        skip_special_tokens=not args.keep_special_tokens,
        draft=draft,
        **controls,
    ):
        print(r.text, end="", flush=True)
        text += r.text
    print()
    if args.verbose:
        print(format_stats(r))
    return text


def chat(model, processor, messages, args, controls, draft=None):
    cache = ChatCache(model, args.max_kv_size)
    prompt, images, videos = args.prompt, args.image, args.video
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
        messages.append(message(processor, "user", prompt, images, videos))
        reply = stream_to_stdout(model, processor, messages, args, controls, cache, draft)
        messages.append(processor.reply_message(reply))
        prompt, images, videos = None, (), ()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for x in args.image:
        if "://" not in x and not x.startswith("data:") and not Path(x).expanduser().is_file():
            parser.error(f"--image {x}: no such file")
    for x in args.video:
        if not Path(x).expanduser().is_file():
            parser.error(f"--video {x}: no such file")
    if args.prompt is None and not args.chat:
        if not args.image and not args.video:
            parser.error("--prompt is required without --image or --video")
        args.prompt = "Describe this video." if args.video else "Describe this image."
    controls = {"do_image_splitting": False} if args.no_split else {}
    if args.max_tiles:
        controls["max_tiles"] = args.max_tiles
    for name in ("fps", "max_frames", "frame_size"):
        if getattr(args, name) is not None:
            controls[name] = getattr(args, name)
    try:
        if args.dry_run:
            print(dry_run(args, controls))
            return 0
        dtype, why = pick_dtype(args.dtype)
        if args.verbose:
            print(f"dtype: {why}\n{blas.describe()}", file=sys.stderr)
        model, processor = load(args.model, dtype=dtype, adapter_path=args.adapter_path)
        draft = None
        if args.prompt_lookup_tokens:
            draft = PromptLookup(args.prompt_lookup_tokens, args.ngram_size)
        elif args.draft_model:
            draft = DraftModel(*load(args.draft_model, dtype=dtype), args.num_draft_tokens)
        if args.chat:
            system = [message(processor, "system", args.system)] if args.system else []
            chat(model, processor, system, args, controls, draft)
        else:
            stream_to_stdout(model, processor, first_messages(processor, args), args, controls, draft=draft)
        return 0
    except KeyboardInterrupt:
        # The partial answer is already on stdout; end its line and leave quietly.
        print(flush=True)
        print("[interrupted]", file=sys.stderr)
        return 130
    except (SmolVLMError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
