"""OpenAI chat-completion requests -> processor messages and SamplingParams, with the
server's limits. Every refusal is a RequestError naming the offending field, which the
server turns into a 400 with OpenAI's error JSON."""

import base64
import binascii
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from .batch import SamplingParams
from .image_processing import ImageError, decode_image

MAX_STOP, MAX_STOP_CHARS = 64, 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

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


@dataclass
class ChatRequest:
    messages: list
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    temp_files: list = field(default_factory=list)  # videos written for the processor

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
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"stop must be a string or a list of up to {MAX_STOP} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(f"stop strings are at most {MAX_STOP_CHARS} characters", "stop")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("logprobs must be a boolean", "logprobs")
    top = _number(body, "top_logprobs", 0, 0, 20, int)
    if top and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    skip = body.get("skip_special_tokens", True)
    if not isinstance(skip, bool):
        raise RequestError("skip_special_tokens must be a boolean", "skip_special_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, int),
        stop=stop,
        logprobs=top if logprobs else None,
        skip_special_tokens=skip,
    )


async def _fetch(url: str, limits: Limits, param: str) -> bytes:
    """The bytes behind a data:, http(s): or (if allowed) local-file URL, within the size cap."""
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
        return await _download(url, limits, param)
    path = Path(url.removeprefix("file://")).expanduser()
    if not limits.allow_local_files:
        raise RequestError("local file paths are refused (start the server with --allow-local-files)", param)
    if not path.is_file():
        raise RequestError(f"no such file: {path}", param)
    if path.stat().st_size > limits.remote_max_bytes:
        raise RequestError(f"media larger than {limits.remote_max_bytes} bytes", param)
    return path.read_bytes()


async def _download(url: str, limits: Limits, param: str) -> bytes:
    try:
        async with httpx.AsyncClient(timeout=limits.remote_timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as r:
                r.raise_for_status()
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > limits.remote_max_bytes:
                        raise RequestError(f"media larger than {limits.remote_max_bytes} bytes", param)
                return bytes(data)
    except httpx.HTTPError as e:
        raise RequestError(f"cannot download {url[:100]}: {e or type(e).__name__}", param) from None


def _image(data: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: refuse before decoding
            w, h = im.size
    except Exception:
        raise RequestError("not a supported image format", param) from None
    if w * h > limits.max_image_pixels:
        raise RequestError(f"image of {w}x{h} pixels is over the limit of {limits.max_image_pixels}", param)
    try:
        return decode_image(data)
    except ImageError as e:
        raise RequestError(str(e), param) from None


def _url(part: dict, kind: str, param: str) -> str:
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise RequestError(f"{kind} needs a url", param)
    return url


async def parse_messages(messages, limits: Limits, temp_files: list) -> list:
    """OpenAI messages -> the processor's (transformers') format, media fetched and decoded."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out, n_media = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"role must be one of {sorted(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError("content must be a string or a list of parts", f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
                continue
            if kind not in ("image_url", "video_url"):
                raise RequestError("parts are text, image_url or video_url", param)
            n_media += 1
            if n_media > limits.max_images:
                raise RequestError(f"more than {limits.max_images} images or videos", "messages")
            data = await _fetch(_url(part, kind, param), limits, param)
            if kind == "image_url":
                parts.append({"type": "image", "image": _image(data, limits, param)})
            else:
                fd, path = tempfile.mkstemp(suffix=".video")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                temp_files.append(path)
                parts.append({"type": "video", "path": path})
        out.append({"role": ROLES[m["role"]], "content": parts})
    return out


async def parse_chat(body, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    params = sampling_params(body, limits)
    options = body.get("stream_options") or {}
    req = ChatRequest([], params, bool(body.get("stream")), bool(options.get("include_usage")))
    try:
        req.messages = await parse_messages(body.get("messages"), limits, req.temp_files)
    except BaseException:
        req.cleanup()
        raise
    return req
