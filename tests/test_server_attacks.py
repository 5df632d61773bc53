"""The server attacked as an outsider would, on 127.0.0.1 only: the real server process with
the tiny checkpoint and a decoy HTTP server beside it. Each attack must get a 4xx in
OpenAI's error shape within a bounded time and server RSS, never reach the decoy, and
leave the server answering a good request with the same greedy text. Every loop here is
bounded in count and time."""

import asyncio
import base64
import io
import json
import math
import random
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image
from serving import serve_process

KEYS = ["key-alice", "key-bob", "key-carol"]
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
RESULTS = []  # (attack, result, seconds, RSS MB after, peak RSS MB) for the closing table
GENERIC_FETCH_ERROR = "the media URL could not be fetched"


class Decoy:
    """An HTTP server on loopback that records every hit: /img.png, /redirect (302 to
    /img.png), /slow (a PNG trickled one byte every 0.2 s)."""

    def __init__(self, host="127.0.0.1"):
        self.hits, self.slow_ended, png = [], [], io.BytesIO()
        Image.new("RGB", (32, 24), (200, 30, 30)).save(png, "PNG")
        self.png = png.getvalue()
        decoy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                decoy.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://{host}:{decoy.port}/img.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                if self.path == "/slow":
                    try:
                        for b in decoy.png[:50]:  # at most 10 s, and the client leaves long before
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:  # the client left: what the test wants
                        pass
                    decoy.slow_ended.append(time.perf_counter())
                else:
                    self.wfile.write(decoy.png)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def rss_mb(pid) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


@pytest.fixture(scope="module")
def decoy():
    d = Decoy()
    yield d
    d.close()


@pytest.fixture(scope="module")
def server(tiny_idefics3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack")
    keys = folder / "keys.txt"
    keys.write_text("# one key per line\n" + "\n".join(KEYS) + "\n")
    args = ["--api-keys-file", str(keys), "--max-images", "3", "--max-image-pixels", "40000",
            "--max-request-bytes", str(25 * 2**20), "--remote-timeout", "2", "--default-max-tokens", "4",
            "--max-tokens-limit", "2000", "--max-batch", "4", "--max-queue", "2", "--max-concurrent-per-key", "3",
            "--header-timeout", "1", "--body-timeout", "2", "--max-connections", "64", "--log-level", "warning",
            "--max-video-decode-pixels", "1000000", "--max-video-sample-pixels", "500000",
            "--max-video-frames", "50"]
    with serve_process(tiny_idefics3, folder / "server.log", *args) as (url, proc):
        yield url, proc.pid


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as c:
        yield c


GOOD = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8}


def good_answer(client) -> str:
    # A fresh cache_salt: no prefix reuse, so the same computation as the first time.
    r = client.post("/v1/chat/completions", json={**GOOD, "cache_salt": f"fresh-{time.perf_counter_ns()}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def baseline(client):
    return good_answer(client)


def chat(client, body=None, content=None, **kw):
    """POST a chat body (or raw bytes as `content`); returns (response, seconds)."""
    if content is None:  # ASCII JSON: a lone surrogate goes as its \\u escape
        content = json.dumps(body).encode()
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, **kw)
    return r, time.perf_counter() - t


def assert_openai_error(r, status=400):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    return err


def record(server, attack, result, seconds):
    rss, peak = rss_mb(server[1])
    RESULTS.append((attack, result, seconds, rss, peak))


def media(url, kind="image_url"):
    return {"messages": [{"role": "user", "content": [{"type": kind, kind: {"url": url}},
                                                      {"type": "text", "text": "What is this?"}]}]}


def png_bomb(side=12000) -> bytes:
    """A real PNG of side x side black pixels (~420 KB): 432 MB once decoded."""
    comp, rows = zlib.compressobj(9), []
    row = bytes(1 + 3 * side)
    rows = [comp.compress(row) for _ in range(side)] + [comp.flush()]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(rows)) + chunk(b"IEND", b"")


def b64(kind, data: bytes) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def test_ssrf_spellings_never_reach_the_decoy(server, client, decoy, baseline):
    p = decoy.port
    urls = [f"http://127.0.0.1:{p}/img.png", f"http://127.1:{p}/img.png", f"http://2130706433:{p}/img.png",
            f"http://0x7f000001:{p}/img.png", f"http://0177.0.0.1:{p}/img.png", f"http://[::1]:{p}/img.png",
            f"http://[::ffff:127.0.0.1]:{p}/img.png", f"http://[::ffff:7f00:1]:{p}/img.png",
            f"http://localhost:{p}/img.png", f"http://localhost.:{p}/img.png", f"http://LocalHost:{p}/img.png",
            f"http://0.0.0.0:{p}/img.png", f"http://0:{p}/img.png", "http://169.254.169.254/latest/meta-data/",
            f"http://127.0.0.1:{p}/redirect", f"http://user:pw@127.0.0.1:{p}/img.png",
            f"http://evil.example@127.0.0.1:{p}/img.png", f"http://127.0.0.1:{p + 70000}/img.png",
            "http://xn--ls8h\udcff.com/x.png", "http://a..b/x.png", "http://-bad-.invalid:99999/",
            f"https://127.0.0.1:{p}/img.png", f"http://[64:ff9b::7f00:1]:{p}/img.png"]
    slowest = 0.0
    for kind in ("image_url", "video_url"):
        for url in urls:
            r, dt = chat(client, media(url, kind))
            slowest = max(slowest, dt)
            err = assert_openai_error(r)
            assert err["param"] == "messages[0].content[0]", err
            if "\udcff" not in url:  # a lone surrogate is refused as such, before any fetch
                assert err["message"] == GENERIC_FETCH_ERROR, (url, err)
            assert dt < 3, (url, dt)
    assert decoy.hits == []
    record(server, f"SSRF: {len(urls)} spellings x image/video", "400, one generic text, decoy never hit", slowest)
    assert good_answer(client) == baseline


def test_redirect_is_checked_on_every_hop(monkeypatch):
    """In-process: a first hop the policy allows (127.0.0.1 stands for a public host here)
    redirecting to a refused one (127.0.0.2) is stopped before connecting to it."""
    from mlx_smolvlm import media_fetch

    inner, front = Decoy("127.0.0.2"), Decoy("127.0.0.1")
    try:
        # /redirect on 127.0.0.1 sends clients to 127.0.0.2's port: point it there
        front.port, real = inner.port, front.port
        monkeypatch.setattr(media_fetch, "address_allowed", lambda a, private=False: a == "127.0.0.1")
        policy = media_fetch.FetchPolicy(timeout=2)
        assert asyncio.run(media_fetch.fetch_or_log(f"http://127.0.0.1:{real}/img.png", policy)) == front.png
        assert asyncio.run(media_fetch.fetch_or_log(f"http://127.0.0.1:{real}/redirect", policy)) is None
        assert front.hits == ["/img.png", "/redirect"] and inner.hits == []
    finally:
        inner.close()
        front.close()


def test_private_networks_flag_and_domains(tiny_idefics3, tmp_path, decoy):
    """--allow-private-networks reaches the decoy (once); --allowed-media-domains refuses other
    hosts, also behind a redirect; the whole download has one deadline."""
    args = ["--allow-private-networks", "--allowed-media-domains", "localhost", "--remote-timeout", "3",
            "--default-max-tokens", "2", "--log-level", "warning"]
    with serve_process(tiny_idefics3, tmp_path / "server.log", *args) as (url, proc), \
            httpx.Client(base_url=url, timeout=30) as c:
        p, before = decoy.port, len(decoy.hits)
        assert not decoy.slow_ended
        r, _ = chat(c, media(f"http://localhost:{p}/img.png"))
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 20, r.text
        assert decoy.hits[before:] == ["/img.png"]
        r, _ = chat(c, media(f"http://127.0.0.1:{p}/img.png"))  # not a listed domain
        assert_openai_error(r)
        r, _ = chat(c, media(f"http://localhost:{p}/redirect"))  # to 127.0.0.1: not listed
        assert_openai_error(r)
        r, dt = chat(c, media(f"http://localhost:{p}/slow"))  # one byte every 0.2 s
        assert assert_openai_error(r)["message"] == GENERIC_FETCH_ERROR
        assert 2.9 < dt < 8, dt
        RESULTS.append(("trickling download (1 B / 0.2 s), --remote-timeout 3", "400 after the one deadline",
                        dt, *rss_mb(proc.pid)))
        for _ in range(100):  # the decoy sees the first download's socket closed (at most 2 s)
            if decoy.slow_ended:
                break
            time.sleep(0.02)
        # a client that leaves ends the download with it
        body = json.dumps(media(f"http://localhost:{p}/slow"))
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(100):  # at most 2 s until the download runs
            if decoy.hits[-1:] == ["/slow"] and len(decoy.hits) == before + 4:
                break
            time.sleep(0.02)
        time.sleep(0.3)
        s.close()
        left, ended = time.perf_counter(), len(decoy.slow_ended)
        for _ in range(150):  # the decoy notices a closed socket at its next write (0.2 s)
            if len(decoy.slow_ended) > ended:
                break
            time.sleep(0.02)
        gone = decoy.slow_ended[-1] - left
        assert len(decoy.slow_ended) > ended and gone < 2.0, gone
        assert decoy.hits[before:] == ["/img.png", "/redirect", "/slow", "/slow"]
        RESULTS.append(("client leaves during a trickling download", "download closed", gone, *rss_mb(proc.pid)))


def test_containers_that_read_other_files(server, client, tmp_path, decoy):
    from video_synth import make_video

    clip, before = make_video(tmp_path / "clip.mp4", 2, 4, 48, 32), len(decoy.hits)
    payloads = {
        "ffconcat": f"ffconcat version 1.0\nfile {clip}\nfile /etc/passwd\n".encode(),
        "concat (no header)": f"file '{clip}'\n".encode(),
        "HLS playlist": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:{decoy.port}/a.ts\n"
                        f"#EXTINF:1,\nfile://{clip}\n#EXT-X-ENDLIST\n".encode(),
        "image2 pattern": b"/tmp/img%03d.png",
        "SDP with a URL": f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                          f"m=video {decoy.port} RTP/AVP 96\na=rtpmap:96 H264/90000\n".encode(),
        "PNG 12000x12000 as video": png_bomb(),
    }
    for name, data in payloads.items():
        r, dt = chat(client, media(b64("video/mp4", data), "video_url"))
        err = assert_openai_error(r)
        assert "/tmp" not in err["message"] and "passwd" not in err["message"], err
        assert "supported container" in err["message"], err
        assert dt < 3, (name, dt)
        record(server, f"video_url: {name}", "400 not a supported container", dt)
    # a real mp4 passes the container check and reaches the model (which takes no video)
    r, _ = chat(client, media(b64("video/mp4", clip.read_bytes()), "video_url"))
    assert "takes no video" in assert_openai_error(r)["message"] and "/tmp" not in r.text
    assert decoy.hits[before:] == []


def test_media_bombs(server, client, baseline, tmp_path):
    r, dt = chat(client, media(b64("image/png", png_bomb())))
    assert "over the limit" in assert_openai_error(r)["message"]
    record(server, "image_url: PNG 12000x12000 (420 KB)", "400 from the header", dt)
    from video_synth import make_video

    # 4 s at 6 fps of 320x320: 4 sampled frames (1 fps), but ~20 decoded to reach them (GOP 12)
    # of 0.1 M pixels each: over --max-video-decode-pixels 1000000
    gop = make_video(tmp_path / "gop.mp4", 4, 6, 320, 320)
    r, dt = chat(client, media(b64("video/mp4", gop.read_bytes()), "video_url"))
    assert "decode budget" in assert_openai_error(r)["message"] and dt < 3, r.text
    record(server, "video over the decode budget (frames from keyframes)", "400 from demuxing, no decoding", dt)
    # 4 s at 2 fps of 384x384: 4 sampled frames of 0.15 M pixels, over --max-video-sample-pixels
    wide = make_video(tmp_path / "wide.mp4", 4, 2, 384, 384)
    r, dt = chat(client, media(b64("video/mp4", wide.read_bytes()), "video_url"))
    assert "4 sampled frames of 384x384" in assert_openai_error(r)["message"] and dt < 3, r.text
    record(server, "video over the sampled-frames budget", "400 from demuxing, no decoding", dt)
    # 60 frames in the file, over --max-video-frames 50: refused while demuxing
    many = make_video(tmp_path / "many.mp4", 6, 10, 16, 16)
    r, dt = chat(client, media(b64("video/mp4", many.read_bytes()), "video_url"))
    assert "more than 50 frames" in assert_openai_error(r)["message"] and dt < 3, r.text
    record(server, "video with more frames than --max-video-frames", "400 while demuxing", dt)
    assert good_answer(client) == baseline


def test_huge_text_prompt(server, client, baseline):
    body = {"messages": [{"role": "user", "content": "a " * (10 * 2**20)}]}  # 20 MB
    r, dt = chat(client, body)
    err = assert_openai_error(r)
    assert err["code"] == "context_length_exceeded" and dt < 5, (err, dt)
    record(server, "20 MB text prompt", "400 context_length_exceeded before tokenizing", dt)
    assert good_answer(client) == baseline


MALFORMED = [
    ("negative seed", None, {**GOOD, "seed": -5}),
    ("stream_options a string", None, {**GOOD, "stream_options": "yes"}),
    ("stream_options a list", None, {**GOOD, "stream_options": [1]}),
    ("role a list", None, {"messages": [{"role": ["user"], "content": "x"}]}),
    ("content []", None, {"messages": [{"role": "user", "content": []}]}),
    ("content null", None, {"messages": [{"role": "user", "content": None}]}),
    ("lone surrogate", '{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("JSON nested 100k deep", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
    ("NaN temperature", '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
    ("huge integer", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + "0" * 5000 + "}", None),
    ("not JSON", "{'messages': ", None),
    ("body a list", "[1, 2]", None),
    ("empty stop string", None, {**GOOD, "stop": [""]}),
    ("image_url an int", None, media(5)),
    ("part not an object", None, {"messages": [{"role": "user", "content": ["hi"]}]}),
    ("stream a string", None, {**GOOD, "stream": "yes"}),
    ("cache_salt an object", None, {**GOOD, "cache_salt": {"a": 1}}),
    ("100k empty messages", None, {"messages": [{"role": "user", "content": ""}] * 100_000}),
    ("100k empty parts", None, {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 100_000}]}),
]


def test_malformed_requests_are_4xx(server, client, baseline):
    for name, raw, body in MALFORMED:
        r, dt = chat(client, body, content=raw.encode("utf-8", "surrogatepass") if raw else None)
        if name == "negative seed":  # a valid 64-bit seed, as OpenAI takes
            assert r.status_code == 200, r.text
            continue
        assert_openai_error(r)
        assert dt < 3, (name, dt)
    record(server, f"{len(MALFORMED)} malformed requests", "400 each (negative seed: 200)", dt)
    assert good_answer(client) == baseline


def fuzz_values():
    return [None, True, False, 0, -1, 1, 2.5, -1e308, 1e308, 2**70, "", "x", "\ud800", [], [None], {},
            {"url": 1}, [{"type": "text"}], "a" * 300]


def test_fuzzed_field_types(server, client, baseline):
    """Every field of a request (top level, message, part) replaced by values of other
    types: a 2xx or a 4xx in OpenAI's shape, never a 5xx."""
    rng = random.Random(0)
    base = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2,
            "temperature": 0, "top_p": 1, "seed": 1, "stop": ["x"], "logprobs": False, "top_logprobs": 0,
            "n": 1, "stream": False, "stream_options": {"include_usage": True}, "cache_salt": "s",
            "skip_special_tokens": True, "max_completion_tokens": 2, "model": "m"}
    paths = [(k,) for k in base] + [("messages", 0, "role"), ("messages", 0, "content"),
                                    ("messages", 0, "content", 0), ("messages", 0, "content", 0, "type"),
                                    ("messages", 0, "content", 0, "text"), ("messages", 0)]
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    image = {"type": "image_url", "image_url": {"url": b64("image/png", png.getvalue())}}
    with_image = {**base, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]}
    paths = [(base, p) for p in paths] + [(with_image, ("messages", 0, "content", 0, k)) for k in ("type", "image_url")] \
        + [(with_image, ("messages", 0, "content", 0, "image_url", "url"))]
    statuses, t0 = [], time.perf_counter()
    for start, path in paths:
        for v in rng.sample(fuzz_values(), 6):
            body = json.loads(json.dumps(start))
            node = body
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = v
            r, dt = chat(client, body)
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, v, r.text[:300])
            if r.status_code >= 400:
                assert_openai_error(r, r.status_code)
            assert dt < 10, (path, v, dt)
    record(server, f"{len(statuses)} fuzzed field values", f"{statuses.count(200)} x 200, "
           f"{sum(s >= 400 for s in statuses)} x 4xx, 0 x 5xx", time.perf_counter() - t0)
    assert good_answer(client) == baseline


def raw_socket(server, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", int(server[0].rsplit(":", 1)[1])), timeout=5)
    s.sendall(head)
    return s


def holding_request(server, key: str) -> socket.socket:
    """A request whose body never finishes: it holds one admission slot until closed."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").encode()
    return raw_socket(server, head)


def test_admission_429_with_retry_after(server, client, baseline):
    url = server[0]
    held = [holding_request(server, KEYS[0]) for _ in range(3)]
    try:
        time.sleep(0.3)
        r, dt = chat(client, GOOD)  # alice: over her 3 concurrent requests
        err = assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "1" and "API key" in err["message"], (r.headers, err)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=30) as bob:
            assert bob.post("/v1/chat/completions", json=GOOD).status_code == 200  # bob is not held up
            held += [holding_request(server, KEYS[1]) for _ in range(3)]
            time.sleep(0.3)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[2]}"}, timeout=30) as carol:
            r = carol.post("/v1/chat/completions", json=GOOD)  # 6 held = --max-batch 4 + --max-queue 2
            assert "at its limit" in assert_openai_error(r, 429)["message"] and r.headers["retry-after"]
        record(server, "7th request (3 per key, 6 in all held)", "429 + Retry-After: 1", dt)
        # a body that stops arriving is answered 408 after --body-timeout 2
        t = time.perf_counter()
        reply = held[0].recv(4096)
        assert b" 408 " in reply.split(b"\r\n", 1)[0], reply[:200]
        record(server, "body never completed", "408 after --body-timeout", time.perf_counter() - t)
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert good_answer(client) == baseline


def test_slowloris_does_not_starve(server, client, baseline):
    """200 half-open connections (request heads never finished) against --max-connections 64
    and --header-timeout 1: a good request is answered at once, the idle ones are closed."""
    socks = []
    for i in range(200):
        try:
            socks.append(raw_socket(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-a: "))
        except OSError:
            break
    t = time.perf_counter()
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=30) as fresh:
        answer = good_answer(fresh)
    dt = time.perf_counter() - t
    assert answer == baseline
    assert dt < 5, dt
    deadline, closed = time.time() + 5, 0
    for s in socks:
        s.settimeout(max(deadline - time.time(), 0.01))
        try:
            closed += s.recv(1024) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except TimeoutError:
            pass
        s.close()
    assert closed == len(socks) == 200, closed
    record(server, "slowloris: 200 half-open sockets", f"good request in {dt:.2f} s, all 200 closed", dt)


def test_client_leaving_stops_decoding(server, client):
    """A non-streamed request whose client leaves stops decoding within a step."""
    body = json.dumps({"messages": [{"role": "user", "content": "Count."}], "max_tokens": 1900})
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", content=body)
    full = time.perf_counter() - t
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1900, r.text[:300]
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    s = raw_socket(server, head)
    for _ in range(500):  # wait (at most 5 s) until it decodes, then leave
        if client.get("/health").json()["active"] == 1:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the request never started decoding")
    s.close()
    t = time.perf_counter()
    for _ in range(200):
        h = client.get("/health").json()
        if h["active"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.01)
    idle = time.perf_counter() - t
    print(f"1900 tokens take {full:.2f} s; idle {idle:.3f} s after the client left")
    assert h["active"] == 0 and idle < full / 3, (idle, full)
    record(server, "non-streamed client leaves while decoding", f"batch empty {idle:.2f} s later "
           f"(full run {full:.1f} s)", idle)


def test_cache_isolation_across_keys(server, baseline):
    """After alice's prompt with a secret, bob's right and wrong guesses get the same
    cached_tokens; alice herself reuses her prefix, but not under another cache_salt."""
    def cached(key, pin, salt=None):
        body = {"messages": [{"role": "system", "content": f"The PIN is {pin}. Never say it."},
                             {"role": "user", "content": "Hello"}], "max_tokens": 1}
        if salt:
            body["cache_salt"] = salt
        r = httpx.post(f"{server[0]}/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(KEYS[0], "7391", salt="x")
    right, wrong = cached(KEYS[1], "7391", salt="x"), cached(KEYS[2], "0000", salt="x")
    assert right == wrong, (right, wrong)
    salted_right, salted_wrong = cached(KEYS[0], "7391", salt="y"), cached(KEYS[0], "0000", salt="z")
    assert salted_right == salted_wrong
    own = cached(KEYS[0], "7391", salt="x")
    assert own > right + 10, (own, right)
    record(server, "cache probe across keys / cache_salt", f"cached_tokens right {right} = wrong {wrong}; "
           f"salted {salted_right} = {salted_wrong}; own {own}", 0.0)


def test_health_and_docs_without_key(server, client):
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    assert "model" in client.get("/health").json()
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert_openai_error(httpx.get(f"{server[0]}{path}"), 404)
    assert_openai_error(httpx.get(f"{server[0]}/v1/models"), 401)
    assert_openai_error(httpx.post(f"{server[0]}/v1/chat/completions", json=GOOD,
                                   headers={"Authorization": "Bearer key-alic"}), 401)


def test_same_answer_afterwards_and_table(server, client, baseline):
    assert good_answer(client) == baseline
    h = client.get("/health").json()
    assert h["requests"] == 0 and h["active"] == 0, h  # no admission slot or sequence leaked
    rss, peak = rss_mb(server[1])
    print(f"\nserver RSS after all attacks: {rss:.0f} MB (peak {peak:.0f} MB)")
    print("| attack | result | time (s) | RSS after (MB) | peak RSS (MB) |\n|---|---|---|---|---|")
    for attack, result, dt, r, p in RESULTS:
        print(f"| {attack} | {result} | {dt:.2f} | {r:.0f} | {p:.0f} |")
    assert peak < 1500 and not any(math.isnan(x[2]) for x in RESULTS)


def test_server_fault_is_a_logged_500(caplog):
    """In-process, with an engine whose processor breaks: a 500 in OpenAI's shape that quotes
    a request id, which the log holds with the traceback; a user fault stays a 400."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from mlx_smolvlm.errors import InvalidRequestError
    from mlx_smolvlm.server import create_app

    def processor(messages, **controls):
        if messages[0]["content"][0]["text"] == "too long":
            raise InvalidRequestError("the prompt is beyond the context")
        raise ValueError("disk on fire")  # not ours to blame on the client: a 500

    processor.tokenizer = SimpleNamespace(vocab={"ab": 0, "abcd": 1})
    config = SimpleNamespace(max_position_embeddings=100)
    engine = SimpleNamespace(processor=processor, model=SimpleNamespace(config=config), max_batch=2, busy=False,
                             draft=None, draft_tokens=lambda params: 0)
    with TestClient(create_app(engine, "stub"), raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        err = assert_openai_error(r, 500)
        assert err["type"] == "server_error" and "disk" not in err["message"]
        rid = err["message"].rsplit(" ", 1)[1].rstrip(")")
        assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "too long"}]})
        assert "beyond the context" in assert_openai_error(r)["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 401}]})
        assert assert_openai_error(r)["code"] == "context_length_exceeded"  # 100 tokens x 4 characters


def test_decode_budget_counts_what_the_decoder_decodes(tmp_path):
    """`load_video(decode=False).decoded_frames`, which the decode budget uses, equals the
    frames the decoder really produces to reach the sampled ones (GOP 12, B-frames)."""
    import av
    from video_synth import make_video

    from mlx_smolvlm import video

    path = make_video(tmp_path / "gop.mp4", 8, 6, 64, 64)
    probe = video.load_video(path, decode=False)
    produced = 0

    class Counting:  # the container, counting the frames its decoder yields
        def __init__(self, container):
            self.container = container

        def seek(self, *args, **kwargs):
            return self.container.seek(*args, **kwargs)

        def decode(self, stream):
            nonlocal produced
            for frame in self.container.decode(stream):
                produced += 1
                yield frame

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts, keys = video._frame_pts(c, stream)
        frames = list(video._decode(Counting(c), stream, pts, keys, probe.indices))
    print(f"{len(probe.indices)} samples of {probe.total_frames} frames: {produced} decoded, "
          f"{probe.decoded_frames} counted")
    assert len(frames) == len(probe.indices) > 2 and produced == probe.decoded_frames


def test_decoding_past_the_counted_frames_is_refused(tmp_path):
    """A seek index that sends every seek back to the start (a Matroska file's Cues are the
    sender's to write) would decode the video once per sampled frame; `_decode` stops at
    the limit load_video gives it (twice the counted frames plus 8 per sample)."""
    import av
    from video_synth import make_video

    from mlx_smolvlm import video

    path = make_video(tmp_path / "gop.mp4", 12, 6, 32, 32)
    probe = video.load_video(path, decode=False)
    limit = 2 * probe.decoded_frames + 8 * len(probe.indices)

    class Lying:  # the container, its every seek landing on the first frame
        def __init__(self, container):
            self.container, self.produced = container, 0

        def seek(self, offset, **kwargs):
            return self.container.seek(0, **kwargs)

        def decode(self, stream):
            for frame in self.container.decode(stream):
                self.produced += 1
                yield frame

        def __getattr__(self, name):
            return getattr(self.container, name)

    def run(limit):
        with av.open(str(path)) as c:
            stream, lying = c.streams.video[0], Lying(c)
            pts, keys = video._frame_pts(c, stream)
            try:
                return len(list(video._decode(lying, stream, pts, keys, probe.indices, limit))), lying.produced
            except video.VideoError as e:
                return str(e), lying.produced

    n, produced = run(None)
    print(f"{len(probe.indices)} samples, {probe.decoded_frames} frames counted: a lying index decodes {produced}")
    assert n == len(probe.indices) and produced > limit
    message, produced = run(limit)
    assert message.startswith(f"{path}: reaching the sampled frames decodes more than {limit}"), message
    assert produced == limit + 1
    assert len(video.load_video(path).frames) == len(probe.indices)  # an honest index stays within it


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "AVIF"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns of the corrupt EXIF it skips
def test_corrupt_images_are_image_errors(fmt):
    """Bytes flipped in a small image: `decode_image` decodes it or raises ImageError (a 400),
    whatever Pillow's decoder raised (libavif: RuntimeError)."""
    from PIL import features

    from mlx_smolvlm.errors import ImageError
    from mlx_smolvlm.image_processing import decode_image

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow without AVIF")
    rng, out = random.Random(0), io.BytesIO()
    Image.frombytes("RGB", (32, 24), rng.randbytes(32 * 24 * 3)).save(out, fmt)
    data, refused = out.getvalue(), 0
    for _ in range(400):
        d = bytearray(data)
        for _ in range(4):
            d[rng.randrange(len(d))] = rng.randrange(256)
        try:
            decode_image(bytes(d))
        except ImageError:
            refused += 1
    print(f"{fmt}: {refused} of 400 mutated images refused")
