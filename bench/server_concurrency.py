"""N concurrent clients against the server vs the same N requests one by one.

    python bench/server_concurrency.py                       # N = 1, 4, 8, 16; 32 tokens each
    python bench/server_concurrency.py --clients 1,4 --max-tokens 16

SmolVLM-256M's real config with random weights (checkpoints/smolvlm-256m, written by
bench_peers.ensure_checkpoint on first use), cast to --dtype; `--layers 3,10` keeps its
widths with fewer vision and decoder layers, for CPUs too slow for the whole model. Every request carries its own
512x512 image (distinct pixels, one tile: --no-image-splitting) and a short question, greedy.
The cross-request caches are off, so only batching is measured. Each (N, mode) runs on a
fresh server process so its peak memory (MLX's, from /health) is its own.
TTFT counts from the moment all N requests are wanted: one by one, request i also waits
for the i-1 before it, as a client with N pages to send would.
"""

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def image_url(seed: int, side: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reduced_checkpoint(vision_layers: int, text_layers: int, preset: str = "smolvlm-256m") -> Path:
    """A make_checkpoint.py preset (SmolVLM-256M's config by default) with fewer layers, random
    float32 weights, and a processor."""
    path = ROOT / f"checkpoints/{preset}-v{vision_layers}t{text_layers}"
    if not (path / "tokenizer.json").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_checkpoint import PRESETS, build_model
        from make_tokenizer import write_processor_for_model

        config = json.loads(json.dumps(PRESETS[preset]))
        config["vision_config"]["num_hidden_layers"] = vision_layers
        config["text_config"]["num_hidden_layers"] = text_layers
        build_model(config).save_pretrained(path)
        write_processor_for_model(path, json.loads((path / "config.json").read_text()))
    return path


def content(n: int, i: int, args) -> list:
    if args.text_only:  # distinct prompts of equal length
        return [{"type": "text", "text": f"Write a short story about lighthouse number {1000 * n + i}."}]
    return [{"type": "image_url", "image_url": {"url": image_url(1000 * n + i, args.side)}},
            {"type": "text", "text": "Describe this image."}]


def start_server(model: Path, dtype: str, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_smolvlm.server", "--model", str(model), "--port", str(port),
           "--dtype", dtype, "--no-image-splitting", "--prefix-cache-bytes", "0",
           "--feature-cache-tiles", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: see {log.name}")
    raise RuntimeError("server did not start")


def request(url: str, body: dict, t0: float) -> dict:
    """Stream one completion; time to first token (from t0) and completion tokens."""
    ttft = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "tokens": usage["completion_tokens"]}


def run(url: str, bodies: list, concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        out = [None] * len(bodies)

        def one(i):
            out[i] = request(url, bodies[i], t0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        out = [request(url, b, t0) for b in bodies]
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in out)
    tokens = sum(r["tokens"] for r in out)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "checkpoints/smolvlm-256m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--side", type=int, default=512, help="image side in pixels (one tile)")
    p.add_argument("--text-only", action="store_true", help="questions without images")
    p.add_argument("--layers", help="VISION,TEXT: the 256M config with fewer layers (a slow CPU)")
    args = p.parse_args()
    if args.layers:
        args.model = reduced_checkpoint(*map(int, args.layers.split(",")))
    elif args.model == ROOT / "checkpoints/smolvlm-256m":
        from bench_peers import ensure_checkpoint

        ensure_checkpoint(args.model)

    rows = []
    for n in map(int, args.clients.split(",")):
        bodies = [{"model": "m", "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": content(n, i, args)}]} for i in range(n)]
        for concurrent in (False, True):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            log = open(f"/tmp/server_concurrency_{n}_{int(concurrent)}.log", "w")
            proc = start_server(args.model, args.dtype, port, log)
            url = f"http://127.0.0.1:{port}"
            try:
                r = run(url, bodies, concurrent)
                r["peak_mb"] = httpx.get(f"{url}/health").json()["memory"]["peak_bytes"] / 2**20
            finally:
                proc.terminate()
                proc.wait()
            r.update(n=n, mode="concurrent" if concurrent else "one by one")
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)

    what = "text-only question" if args.text_only else "1 tile + question"
    print(f"\n{args.model.name}: random weights, {args.dtype}, {what}, "
          f"{args.max_tokens} new tokens per request, greedy\n")
    print("| N | mode | wall s | tokens | aggregate tok/s | TTFT p50 s | TTFT p95 s | peak MB | tok/s ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b in zip(rows[::2], rows[1::2]):
        for r in (a, b):
            ratio = f"{r['tok_s'] / a['tok_s']:.2f}x"
            print(f"| {r['n']} | {r['mode']} | {r['wall']:.1f} | {r['tokens']} | {r['tok_s']:.2f} | "
                  f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
