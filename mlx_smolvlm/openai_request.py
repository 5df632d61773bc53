"""OpenAI chat-completion requests -> processor messages and SamplingParams, with the
server's limits. Every refusal is a RequestError naming the offending field, which the
server turns into a 400 with OpenAI's error JSON."""

import base64
import binascii
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .batch import SamplingParams
from .errors import InvalidRequestError
from .image_processing import ImageError, decode_image
from .media_admission import MediaBudget, MediaRefused, check_video, image_size
from .media_fetch import FetchPolicy, fetch_or_log

MAX_STOP, MAX_STOP_CHARS = 64, 256
# Errors of the processor and the engine that are the request's fault (a 4xx).
USER_FAULTS = (InvalidRequestError,)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_request_bytes: int = 20 * 2**20
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 4096
    default_max_tokens: int = 512
    allow_remote: bool = True
    remote_timeout: float = 10.0
    remote_max_bytes: int = 20 * 2**20
    allow_local_files: bool = False
    allow_private_media: bool = False
    allowed_media_domains: tuple[str, ...] | None = None
    body_timeout: float = 30.0
    max_prompt_chars: int | None = None  # set by the server: context x longest token
    max_prompt_tokens: int | None = None  # set by the server: the context
    max_video_seconds: float = 600.0
    max_video_frames: int = 100_000
    max_video_frame_pixels: int = 3840 * 2160
    max_video_decode_pixels: int = 2**35
    max_video_sample_pixels: int = 64 * 1920 * 1088
    video_fps: float = 1.0  # the processor's sampling (the server sets it)
    video_max_frames: int = 64
    video_skip_secs: float = 1.0

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(self.remote_timeout, self.remote_max_bytes, self.allow_private_media,
                           self.allowed_media_domains)

    def media_budget(self) -> MediaBudget:
        return MediaBudget(
            max_image_pixels=self.max_image_pixels, max_video_seconds=self.max_video_seconds,
            max_video_frames=self.max_video_frames, max_video_frame_pixels=self.max_video_frame_pixels,
            max_video_decode_pixels=self.max_video_decode_pixels,
            max_video_sample_pixels=self.max_video_sample_pixels, fps=self.video_fps,
            max_frames=self.video_max_frames, skip_secs=self.video_skip_secs)


@dataclass
class ChatRequest:
    messages: list
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    cache_salt: str | None = None
    temp_files: list = field(default_factory=list)  # videos written for the processor

    async def decode(self, limits: Limits, run=None):
        try:
            await decode_media(self.messages, limits, self.temp_files, run)
        except BaseException:
            self.cleanup()
            raise

    def scrub(self, message: str) -> str:
        """`message` without the server's temp file paths."""
        for i, f in enumerate(self.temp_files):
            message = message.replace(f, f"video {i}")
        return message

    def cleanup(self):
        for f in self.temp_files:
            Path(f).unlink(missing_ok=True)


def _number(body, name, default, lo, hi, kind=float):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise RequestError(f"{name} must be a{'n integer' if kind is int else ' number'}", name)
    if not lo <= v <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {v}", name)
    return kind(v)


def _seed(body: dict) -> int | None:
    # Any 64-bit integer, as OpenAI and vLLM take; MLX's key wants it unsigned.
    seed = _number(body, "seed", None, -(2**63), 2**64 - 1, int)
    return None if seed is None else seed % 2**64


def sampling_params(body: dict, limits: Limits) -> SamplingParams:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # Beyond --max-tokens-limit (or the context left after the prompt, BatchEngine.add) is cut to
    # it, finishing with "length", as llama-server does: docling asks 8192 of every server.
    max_tokens = min(_number(body, name, limits.default_max_tokens, 1, 2**63 - 1, int), limits.max_tokens)
    if _number(body, "n", 1, 1, 1, int) != 1:
        raise RequestError("only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    # vLLM sets no count (OpenAI: 4); the bounds keep the per-token stop check small.
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop must be a string or a list of up to {MAX_STOP} non-empty strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(f"stop strings are at most {MAX_STOP_CHARS} characters", "stop")
    stop = [_text(s, "stop") for s in stop]
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("logprobs must be a boolean", "logprobs")
    top = _number(body, "top_logprobs", 0, 0, 20, int)
    if top and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    skip = _flag(body, "skip_special_tokens", True)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_number(body, "top_k", 0, 0, 2**31 - 1, int),
        min_p=_number(body, "min_p", 0.0, 0.0, 0.999),
        repetition_penalty=_number(body, "repetition_penalty", None, 0.01, 10.0),
        repetition_context_size=_number(body, "repetition_context_size", 20, 0, 2**31 - 1, int),
        seed=_seed(body),
        stop=stop,
        logprobs=top if logprobs else None,
        skip_special_tokens=skip,
        # Our extensions: speculative decoding for this request (greedy rows), by prompt lookup
        # or by the server's --draft-model (absent: its --num-draft-tokens; 0: off).
        prompt_lookup_tokens=_number(body, "prompt_lookup_tokens", 0, 0, 64, int),
        ngram_size=_number(body, "ngram_size", 3, 1, 16, int),
        num_draft_tokens=_number(body, "num_draft_tokens", None, 0, 64, int),
    )


def _bytes_of(url: str, limits: Limits, param: str) -> bytes | None:
    """The bytes of a data: URL or (if allowed) a local file; None for an http(s) URL."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise RequestError("data URLs must be base64-encoded", param)
        if len(data) * 3 // 4 > limits.remote_max_bytes:
            raise RequestError(f"media larger than {limits.remote_max_bytes} bytes", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("invalid base64 in data URL", param) from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise RequestError("remote URLs are turned off on this server (--no-remote-media)", param)
        return None
    if not limits.allow_local_files:
        raise RequestError("local file paths are refused (start the server with --allow-local-files)", param)
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise RequestError(f"no such file: {path}", param)
    if path.stat().st_size > limits.remote_max_bytes:
        raise RequestError(f"media larger than {limits.remote_max_bytes} bytes", param)
    return path.read_bytes()


async def _fetch(url: str, limits: Limits, param: str) -> bytes:
    data = _bytes_of(url, limits, param)
    if data is None:
        data = await fetch_or_log(url, limits.fetch_policy())
        if data is None:  # one text for every failure: the reason is in the server log
            raise RequestError("the media URL could not be fetched", param, code="media_fetch_failed")
    return data


def _image(data: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        image_size(data, limits.media_budget())
        return decode_image(data)
    except (MediaRefused, ImageError) as e:
        raise RequestError(str(e), param) from None


def _video(data: bytes, limits: Limits, param: str, temp_files: list) -> str:
    fd, path = tempfile.mkstemp(suffix=".video")
    temp_files.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        check_video(path, limits.media_budget())
    except MediaRefused as e:
        raise RequestError(str(e), param) from None
    return path


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise RequestError("must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
        raise RequestError("the text is not valid Unicode (lone surrogate)", param) from None
    return value


def _url(part: dict, kind: str, param: str) -> str:
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise RequestError(f"{kind} needs a url", param)
    return _text(url, param)


def _parts(messages) -> list:
    """Checked structure: [(role, [part, ...])] with each part ("text", str, param) or
    (kind, url, param); nothing fetched yet."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"role must be one of {sorted(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise RequestError("content must be a string or a non-empty list of parts", f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(("text", _text(part.get("text"), param), param))
            elif kind in ("image_url", "video_url"):
                parts.append((kind, _url(part, kind, param), param))
            else:
                raise RequestError("parts are text, image_url or video_url", param)
        out.append((ROLES[role], parts))
    return out


async def parse_messages(messages, limits: Limits) -> list:
    """OpenAI messages -> the processor's (transformers') format with media fetched but not
    decoded yet: each media part holds its bytes until `decode_media`."""
    if limits.max_prompt_tokens is not None and isinstance(messages, list) \
            and len(messages) > limits.max_prompt_tokens:
        # Each message adds at least one token (its role): refuse before rendering the template.
        raise RequestError(f"{len(messages)} messages cannot fit the model's context of "
                           f"{limits.max_prompt_tokens} tokens", "messages", code="context_length_exceeded")
    structure = _parts(messages)
    n_parts = sum(len(parts) for _, parts in structure)
    if limits.max_prompt_tokens is not None and n_parts > limits.max_prompt_tokens:
        raise RequestError(f"{n_parts} content parts are more than the model's context of "
                           f"{limits.max_prompt_tokens} tokens", "messages", code="context_length_exceeded")
    media = [p for _, parts in structure for p in parts if p[0] != "text"]
    if len(media) > limits.max_images:
        raise RequestError(f"more than {limits.max_images} images or videos", "messages")
    chars = sum(len(text) for _, parts in structure for kind, text, _ in parts if kind == "text")
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        # No token is longer than max_prompt_chars / context characters: this many cannot fit.
        raise RequestError(f"the text of {chars} characters cannot fit the model's context "
                           f"(at most {limits.max_prompt_chars})", "messages", code="context_length_exceeded")
    out = []
    for role, parts in structure:
        converted = []
        for kind, value, param in parts:
            if kind == "text":
                converted.append({"type": "text", "text": value})
            else:
                converted.append({"type": kind, "data": await _fetch(value, limits, param), "param": param})
        out.append({"role": role, "content": converted})
    return out


async def decode_media(messages: list, limits: Limits, temp_files: list, run=None):
    """Decode the media parts of `parse_messages`' output in place (images to PIL, videos to
    checked temp files). `run(fn, *args)` runs the work off the event loop."""
    run = run or _inline
    for m in messages:
        for i, part in enumerate(m["content"]):
            if part["type"] == "image_url":
                m["content"][i] = {"type": "image", "image": await run(_image, part["data"], limits, part["param"])}
            elif part["type"] == "video_url":
                path = await run(_video, part["data"], limits, part["param"], temp_files)
                m["content"][i] = {"type": "video", "path": path}


async def _inline(fn, *args):
    return fn(*args)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be a boolean", name)
    return v


async def parse_chat(body, limits: Limits, decode: bool = True) -> ChatRequest:
    """The request checked, its media fetched and (with `decode`) decoded: else the caller
    runs `req.decode(...)`, e.g. in a bounded pool."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    params = sampling_params(body, limits)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    if body.get("model") is not None:
        _text(body["model"], "model")
    salt = body.get("cache_salt")
    if salt is not None and (not _text(salt, "cache_salt") or len(salt) > 256):
        raise RequestError("cache_salt must be a string of 1 to 256 characters", "cache_salt")
    req = ChatRequest([], params, _flag(body, "stream"), _flag(options or {}, "include_usage"), salt)
    try:
        req.messages = await parse_messages(body.get("messages"), limits)
        if decode:
            await req.decode(limits)
    except BaseException:
        req.cleanup()
        raise
    return req
