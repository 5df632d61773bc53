"""An OpenAI-compatible HTTP server with continuous batching.

    python -m mlx_smolvlm.server --model HuggingFaceTB/SmolVLM-256M-Instruct [--port 8080]

POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
GET /health (batch, cache hit counts, memory). One thread owns the model and runs
BatchEngine.step in a loop; requests join its running batch as they arrive.
"""

import argparse
import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .batch import BatchEngine, Event
from .openai_request import ChatRequest, Limits, RequestError, parse_chat


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

    def submit(self, inputs: dict, params) -> tuple:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seq = self.engine.add(inputs, params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
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
    return {
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "total_tokens": e.prompt_tokens + e.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": e.cached_tokens},
    }


def _logprobs(tokenizer, e: Event) -> dict:
    def entry(token, logprob):
        s = tokenizer.decode([token])
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    return {**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top_logprobs]}


def create_app(engine: BatchEngine, model_id: str, limits: Limits | None = None,
               api_key: str | None = None, controls: dict | None = None) -> FastAPI:
    """`controls` go to the processor with every request (e.g. do_image_splitting=False)."""
    limits, controls = limits or Limits(), controls or {}
    runner = EngineThread(engine)
    tokenizer = engine.processor.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="mlx_smolvlm", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    def authorize(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise RequestError("invalid or missing API key", status=401, code="invalid_api_key")

    async def read_json(request: Request):
        size = int(request.headers.get("content-length") or 0)
        body = bytearray()
        if size <= limits.max_request_bytes:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_request_bytes:
                    break
        if max(size, len(body)) > limits.max_request_bytes:
            raise RequestError(f"request body over {limits.max_request_bytes} bytes", "messages",
                               code="request_too_large")
        try:
            return json.loads(body)
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None

    @app.get("/health")
    async def health():
        memory = {"active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory(),
                  "cache_bytes": mx.get_cache_memory()}
        return {"status": "ok", "model": model_id, **engine.stats(), "memory": memory}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "mlx_smolvlm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        req = await parse_chat(await read_json(request), limits)
        try:
            inputs = await asyncio.to_thread(engine.processor, req.messages, **controls)
            seq, queue = runner.submit(inputs, req.params)
        except ValueError as e:  # images the model cannot take, a prompt beyond the context
            raise RequestError(str(e), "messages") from None
        finally:
            req.cleanup()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            return StreamingResponse(_stream(seq, queue, req, head), media_type="text/event-stream")
        return await _complete(request, seq, queue, req, head)

    async def _complete(request, seq, queue, req: ChatRequest, head: dict):
        text, logprobs = "", []
        try:
            while True:
                try:
                    e = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if e.error:
                    raise RequestError(e.error, status=500, type="server_error")
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

    async def _stream(seq, queue, req: ChatRequest, head: dict):
        def chunk(delta, finish=None, logprobs=None):
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                e = await queue.get()
                if e.error:
                    err = RequestError(e.error, status=500, type="server_error")
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

    return app


def build_parser() -> argparse.ArgumentParser:
    from .generate import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id, local folder or .gguf file")
    p.add_argument("--adapter-path", help="LoRA/DoRA adapter folder (mlx-lm or PEFT layout) to apply")
    p.add_argument("--model-id", help="the name /v1/models reports (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("MLX_SMOLVLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MLX_SMOLVLM_API_KEY, else none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--feature-cache-tiles", type=int, default=64, help="image tiles whose features are kept")
    p.add_argument("--prefix-cache-entries", type=int, default=8, help="recent prompts whose KV is kept")
    d = Limits()
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens, help="largest max_tokens accepted")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    p.add_argument("--max-images", type=int, default=d.max_images, help="images and videos per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--no-remote-media", action="store_true", help="refuse http(s) image and video URLs")
    p.add_argument("--remote-timeout", type=float, default=d.remote_timeout)
    p.add_argument("--remote-max-bytes", type=int, default=d.remote_max_bytes)
    p.add_argument("--allow-local-files", action="store_true", help="accept file paths as media URLs")
    p.add_argument("--no-image-splitting", action="store_true",
                   help="one tile per image (no upscaling and tiling): fewer tokens, less detail")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None):
    import uvicorn

    from .generation import load

    args = build_parser().parse_args(argv)
    dtype = getattr(mx, args.dtype) if args.dtype else None
    try:
        model, processor = load(args.model, dtype=dtype, adapter_path=args.adapter_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = BatchEngine(model, processor, max_batch=args.max_batch,
                         prefill_step_size=args.prefill_step_size,
                         feature_cache_tiles=args.feature_cache_tiles,
                         prefix_cache_entries=args.prefix_cache_entries)
    limits = Limits(
        max_request_bytes=args.max_request_bytes, max_images=args.max_images,
        max_image_pixels=args.max_image_pixels, max_tokens=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, allow_remote=not args.no_remote_media,
        remote_timeout=args.remote_timeout, remote_max_bytes=args.remote_max_bytes,
        allow_local_files=args.allow_local_files,
    )
    controls = {"do_image_splitting": False} if args.no_image_splitting else {}
    app = create_app(engine, args.model_id or str(args.model), limits, args.api_key, controls)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
