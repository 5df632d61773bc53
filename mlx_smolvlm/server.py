"""An OpenAI-compatible HTTP server with continuous batching.

    python -m mlx_smolvlm.server --model HuggingFaceTB/SmolVLM-256M-Instruct [--port 8080]

POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
GET /health (without a key only "ok"; with one: batch, cache hit counts, memory). One
thread owns the model and runs BatchEngine.step in a loop; requests join its running batch
as they arrive. Hardening lives beside it: media_fetch.py (SSRF-checked downloads),
media_admission.py (image and video budgets, container allow-list), admission.py (429s,
the decode pool), tenancy.py (API keys, cache partitions), http_guard.py (slowloris).
"""

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .admission import Admission, Busy, release_heap
from .batch import BatchEngine, Event
from .cli import add_kv_quantization_args
from .generate import text_config
from .openai_request import USER_FAULTS, ChatRequest, Limits, RequestError, parse_chat
from .tenancy import Tenants, partition, read_keys

log = logging.getLogger("mlx_smolvlm.server")


class EngineThread:
    """Runs `engine.step()` on its own thread while there is work; events go back to
    each request's asyncio queue."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlx-smolvlm-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, inputs: dict, params, partition: bytes = b"", draft_inputs: dict | None = None) -> tuple:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seq = self.engine.add(inputs, params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e), partition,
                              draft_inputs)
        self._wake.set()
        return seq, queue

    def _run(self):
        while not self._stop:
            if not self.engine.busy:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # never leave a request waiting on a dead loop
                self.engine.fail_all(f"generation failed: {e}")


def _usage(e: Event) -> dict:
    usage = {
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "total_tokens": e.prompt_tokens + e.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": e.cached_tokens},
    }
    if e.draft_tokens:  # speculative decoding: OpenAI's fields for predicted tokens kept and dropped
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": e.accepted_tokens,
            "rejected_prediction_tokens": e.draft_tokens - e.accepted_tokens,
        }
    return usage


def _logprobs(tokenizer, e: Event) -> dict:
    def entry(token, logprob):
        s = tokenizer.decode([token])
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    return {**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top_logprobs]}


def _max_token_chars(tokenizer) -> int:
    # Byte-level BPE spells each byte as one character: a token's length bounds its text's.
    return max(len(t) for t in tokenizer.vocab)


def create_app(engine: BatchEngine, model_id: str, limits: Limits | None = None,
               api_key: str | list[str] | None = None, controls: dict | None = None,
               admission: Admission | None = None, enable_docs: bool = False) -> FastAPI:
    """`controls` go to the processor with every request (e.g. do_image_splitting=False).
    `api_key`: one key or a list (each a tenant with its own cache partition)."""
    limits, controls = limits or Limits(), controls or {}
    tenants = Tenants([api_key] if isinstance(api_key, str) else list(api_key or []))
    admission = admission or Admission(engine.max_batch + 64, engine.max_batch if tenants.required else None)
    runner = EngineThread(engine)
    tokenizer = engine.processor.tokenizer
    video = getattr(engine.processor, "video_options", None)
    if video is not None:  # count sampled frames as the processor will sample them
        limits.video_fps, limits.video_max_frames, limits.video_skip_secs = video.fps, video.max_frames, video.skip_secs
    context = text_config(engine.model).max_position_embeddings
    if limits.max_prompt_chars is None:
        limits.max_prompt_chars = context * _max_token_chars(tokenizer)
    if limits.max_prompt_tokens is None:
        limits.max_prompt_tokens = context

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()
        admission.close()

    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="mlx_smolvlm", lifespan=lifespan, **docs)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # 404, 405 in OpenAI's shape too
        return JSONResponse(RequestError(str(e.detail), status=e.status_code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_fault(request, e: Exception):
        rid = uuid.uuid4().hex[:12]
        log.error("request %s failed: %s", rid, e, exc_info=e)
        err = RequestError(f"internal server error (request id {rid})", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: Request) -> str:
        tenant = tenants.identify(request.headers.get("authorization", ""))
        if tenant is None:
            raise RequestError("invalid or missing API key", status=401, code="invalid_api_key")
        return tenant

    def hold(tenant: str):
        """A slot of the admission control, as a release function to call exactly once."""
        try:
            admission.acquire(tenant)
        except Busy as e:
            raise RequestError(str(e), status=429, code="rate_limit_exceeded", type="rate_limit_error",
                               headers={"Retry-After": str(e.retry_after)}) from None
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                admission.release(tenant)

        return release

    async def read_json(request: Request):
        size = request.headers.get("content-length") or "0"
        if not size.isdigit() or int(size) > limits.max_request_bytes:
            raise RequestError(f"request body over {limits.max_request_bytes} bytes", "messages",
                               code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(limits.body_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limits.max_request_bytes:
                        raise RequestError(f"request body over {limits.max_request_bytes} bytes", "messages",
                                           code="request_too_large")
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {limits.body_timeout:g} s",
                               status=408, code="request_timeout") from None
        except ClientDisconnect:
            raise RequestError("the client left before sending its body", status=499) from None
        try:
            return await admission.run(json.loads, body)
        except (ValueError, RecursionError):  # also a document nested too deep
            raise RequestError("the request body is not valid JSON") from None

    def watch_disconnect(request: Request) -> asyncio.Task:
        """Cancels the calling request's task when its client goes away (body already read)."""
        task = asyncio.current_task()

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            task.cancel()

        return asyncio.create_task(watch())

    @app.get("/health")
    async def health(request: Request):
        if tenants.identify(request.headers.get("authorization", "")) is None:
            return {"status": "ok"}  # no key: only that the server is up
        memory = {"active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory(),
                  "cache_bytes": mx.get_cache_memory()}
        return {"status": "ok", "model": model_id, **engine.stats(), "requests": admission.total,
                "memory": memory}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "mlx_smolvlm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        tenant = authorize(request)
        release = hold(tenant)
        watcher = req = None
        streaming = False
        try:
            body = await read_json(request)
            watcher = watch_disconnect(request)
            req = await parse_chat(body, limits, decode=False)
            try:  # before any media is decoded
                drafting = engine.draft_tokens(req.params)
            except USER_FAULTS as e:  # num_draft_tokens without --draft-model, or with prompt lookup
                raise RequestError(str(e), "num_draft_tokens") from None
            async with admission.decoding:  # decoded media of only a few requests held at once
                await req.decode(limits, admission.run)
                try:
                    inputs = await admission.run(engine.processor, req.messages, **controls)
                    # The draft model reads the messages through its own processor (its tiling).
                    draft_inputs = (await admission.run(engine.draft.processor, req.messages, **controls)
                                    if drafting else None)
                except USER_FAULTS as e:  # media the model cannot take
                    raise RequestError(req.scrub(str(e)), "messages") from None
                req.messages = None  # the decoded images: inputs hold their pixels now
                await admission.run(release_heap)
            try:
                seq, queue = runner.submit(inputs, req.params, partition(tenant, req.cache_salt), draft_inputs)
            except USER_FAULTS as e:  # a prompt beyond the context
                raise RequestError(str(e), "messages") from None
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
            if req.stream:
                watcher.cancel()  # the streaming response watches the client itself
                streaming = True
                def end():  # also when the stream never started: the client left at once
                    engine.cancel(seq)
                    release()

                return StreamingResponse(_stream(seq, queue, req, head, release), media_type="text/event-stream",
                                         background=BackgroundTask(end))
            return await _complete(seq, queue, req, head)
        except asyncio.CancelledError:
            if watcher is None or watcher.cancelled() or not watcher.done():
                raise
            asyncio.current_task().uncancel()  # the client left: its work is dropped
            return Response(status_code=499)
        finally:
            if watcher is not None:
                watcher.cancel()
            if req is not None:
                req.cleanup()
            if not streaming:
                release()

    async def _complete(seq, queue, req: ChatRequest, head: dict):
        text, logprobs = "", []
        try:
            while True:
                e = await queue.get()
                if e.error:
                    raise RuntimeError(e.error)
                text += e.text
                if req.params.logprobs is not None:
                    logprobs.append(_logprobs(tokenizer, e))
                if e.finish_reason:
                    break
        finally:
            engine.cancel(seq)  # a no-op once finished; else it leaves the batch next step
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": logprobs} if req.params.logprobs is not None else None,
                  "finish_reason": e.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(e)}

    async def _stream(seq, queue, req: ChatRequest, head: dict, release):
        def chunk(delta, finish=None, logprobs=None):
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                e = await queue.get()
                if e.error:
                    log.error("generation failed while streaming: %s", e.error)
                    err = RequestError("internal server error", status=500, type="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                lp = None
                if req.params.logprobs is not None:
                    lp = {"content": [_logprobs(tokenizer, e)]}
                if e.text or lp:
                    yield chunk({"content": e.text}, logprobs=lp)
                if e.finish_reason:
                    yield chunk({}, e.finish_reason)
                    if req.include_usage:
                        body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(e)}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also on a client that went away: its sequence leaves the batch next step
            engine.cancel(seq)
            release()

    return app


def build_parser() -> argparse.ArgumentParser:
    from .cli import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id, local folder or .gguf file")
    p.add_argument("--adapter-path", help="LoRA/DoRA adapter folder (mlx-lm or PEFT layout) to apply")
    p.add_argument("--model-id", help="the name /v1/models reports (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", action="append",
                   help="require 'Authorization: Bearer KEY'; repeat for several keys, each a tenant with "
                        "its own cache partition (default: $MLX_SMOLVLM_API_KEY, else none)")
    p.add_argument("--api-keys-file", help="a file of API keys, one per line")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--draft-model", metavar="PATH",
                   help="a smaller model with the same tokenizer drafting for greedy requests (speculative decoding)")
    p.add_argument("--num-draft-tokens", type=int, default=3,
                   help="tokens the draft model proposes per step (a request's num_draft_tokens overrides it)")
    p.add_argument("--feature-cache-tiles", type=int, default=64, help="image tiles whose features are kept")
    p.add_argument("--prefix-cache-bytes", type=int, default=1 << 30,
                   help="bytes of recent prompts' KV kept for reuse (0: off)")
    d = Limits()
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens, help="largest max_tokens accepted")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    p.add_argument("--max-images", type=int, default=d.max_images, help="images and videos per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds)
    p.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                   help="frames in one video file (counted while demuxing, before decoding)")
    p.add_argument("--max-video-frame-pixels", type=int, default=d.max_video_frame_pixels)
    p.add_argument("--max-video-decode-pixels", type=int, default=d.max_video_decode_pixels,
                   help="frames decoded to reach the sampled ones x width x height, from demuxing one video")
    p.add_argument("--max-video-sample-pixels", type=int, default=d.max_video_sample_pixels,
                   help="sampled frames x width x height of one video (each is resized at full size)")
    p.add_argument("--no-remote-media", action="store_true", help="refuse http(s) image and video URLs")
    p.add_argument("--remote-timeout", type=float, default=d.remote_timeout,
                   help="seconds for a whole media download, redirects included")
    p.add_argument("--remote-max-bytes", type=int, default=d.remote_max_bytes)
    p.add_argument("--allowed-media-domains", nargs="+", help="fetch media only from these host names")
    p.add_argument("--allow-private-networks", action="store_true",
                   help="let media URLs reach loopback, private and link-local addresses (local setups only)")
    p.add_argument("--allow-local-files", action="store_true", help="accept file paths as media URLs")
    p.add_argument("--no-image-splitting", action="store_true",
                   help="one tile per image (no upscaling and tiling): fewer tokens, less detail")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests held beyond --max-batch before answering 429 with Retry-After")
    p.add_argument("--max-concurrent-per-key", type=int,
                   help="requests one API key may have in flight (default: --max-batch when keys are set)")
    p.add_argument("--decode-workers", type=int, default=2, help="threads decoding JSON, images and videos")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a complete request head")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout, help="seconds to receive a request body")
    p.add_argument("--keep-alive-timeout", type=int, default=5)
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections; past it the oldest idle one is closed")
    add_kv_quantization_args(p)  # a rotating cache (--max-kv-size) has no batch kind
    p.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None):
    import uvicorn

    from .errors import SmolVLMError
    from .generate import load
    from .http_guard import guarded_protocol
    from .speculative import DraftModel

    args = build_parser().parse_args(argv)
    env_key = os.environ.get("MLX_SMOLVLM_API_KEY")
    keys = read_keys(args.api_key or ([env_key] if env_key else []), args.api_keys_file)
    if args.api_keys_file and not keys:
        raise SystemExit(f"{args.api_keys_file}: no API keys in it")
    dtype = getattr(mx, args.dtype) if args.dtype else None
    try:
        model, processor = load(args.model, dtype=dtype, adapter_path=args.adapter_path)
        # Loaded once; BatchEngine refuses one whose tokenizer differs.
        draft = DraftModel(*load(args.draft_model, dtype=dtype), args.num_draft_tokens) if args.draft_model else None
        engine = BatchEngine(model, processor, max_batch=args.max_batch,
                             prefill_step_size=args.prefill_step_size,
                             feature_cache_tiles=args.feature_cache_tiles,
                             prefix_cache_bytes=args.prefix_cache_bytes, draft=draft, kv_bits=args.kv_bits,
                             kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start)
    except (SmolVLMError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    domains = tuple(h.lower().rstrip(".") for h in args.allowed_media_domains) if args.allowed_media_domains else None
    limits = Limits(
        max_request_bytes=args.max_request_bytes, max_images=args.max_images,
        max_image_pixels=args.max_image_pixels, max_tokens=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, allow_remote=not args.no_remote_media,
        remote_timeout=args.remote_timeout, remote_max_bytes=args.remote_max_bytes,
        allow_local_files=args.allow_local_files, allow_private_media=args.allow_private_networks,
        allowed_media_domains=domains, max_video_seconds=args.max_video_seconds,
        max_video_frames=args.max_video_frames,
        max_video_frame_pixels=args.max_video_frame_pixels,
        max_video_decode_pixels=args.max_video_decode_pixels, body_timeout=args.body_timeout,
        max_video_sample_pixels=args.max_video_sample_pixels,
    )
    per_key = args.max_concurrent_per_key or (args.max_batch if keys else None)
    admission = Admission(args.max_batch + args.max_queue, per_key, args.decode_workers)
    controls = {"do_image_splitting": False} if args.no_image_splitting else {}
    app = create_app(engine, args.model_id or str(args.model), limits, keys, controls, admission,
                     args.enable_docs)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                http=guarded_protocol(args.header_timeout, args.max_connections),
                timeout_keep_alive=args.keep_alive_timeout, h11_max_incomplete_event_size=16 * 1024)


if __name__ == "__main__":
    sys.exit(main())
