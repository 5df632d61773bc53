"""The server process on 127.0.0.1 with the tiny checkpoint, driven by the real `openai`
client: answers equal to solo greedy generation (streamed or not), usage and cached
tokens, logprobs, stop strings, special tokens kept on request, every limit answered with a
400 naming its field, the API key, a client leaving mid-stream, and a bounded load test."""

import base64
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import openai
import pytest
from PIL import Image
from helpers import decided_steps
from make_generate_golden import gguf_path
from serving import serve

from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.image_processing import decode_image
from mlx_smolvlm.sample_utils import make_logits_processors, make_sampler

KEY = "test-key"
MAX_TOKENS = 12
# The server batches requests; a batched row and a solo run differ in float32 summation order
# only (test_batch.py). Texts are compared whole, so every step's margin must be wider than
# twice this: `greedy_text` checks it.
BATCH_MOVE = 1e-4


def greedy_text(model, processor, messages, max_tokens):
    """Greedy text of `messages` run alone, after checking no step of it is a near-tie."""
    rs = list(stream_generate(model, processor, messages, max_tokens=max_tokens))
    logprobs = [r.logprobs for r in rs]
    assert decided_steps(logprobs, BATCH_MOVE) == len(rs), "a near-tie: the batched answer may differ"
    return "".join(r.text for r in rs)


@pytest.fixture(scope="module")
def server(tiny_idefics3, tmp_path_factory):
    limits = ["--api-key", KEY, "--max-images", "3", "--max-image-pixels", "20000", "--max-tokens-limit", "500",
              "--max-request-bytes", "200000", "--remote-timeout", "2"]
    with serve(tiny_idefics3, tmp_path_factory.mktemp("log") / "server.log", *limits) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def solo(tiny_idefics3):
    """Greedy text of a request run alone through the Python API."""
    model, processor = load(tiny_idefics3)
    memo = {}

    def run(messages, max_tokens=MAX_TOKENS):
        key = json.dumps([messages, max_tokens])
        if key not in memo:
            memo[key] = greedy_text(model, processor, to_processor(messages), max_tokens)
        return memo[key]

    return run


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def to_processor(messages):
    """The OpenAI messages in the processor's format, as the server converts them."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for p in content:
            if p["type"] == "image_url":
                raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                parts.append({"type": "image", "image": decode_image(raw)})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


def ask(text, *image_urls, system=None):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def good_requests(sample_images):
    wide, square = data_url(sample_images["wide.png"]), data_url(sample_images["square.png"])
    return [
        ask("Describe this.", wide),
        ask("Hello there, how are you?"),
        ask("Compare.", square, wide, system="Be brief."),
        ask("Tell me a story.", system="Be brief."),
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": square}},
                                      {"type": "text", "text": "And this?"}]}],
    ]


def bad_requests(sample_images):
    """(request kwargs, status, param) that the server must refuse."""
    wide = data_url(sample_images["wide.png"])
    big = io.BytesIO()
    Image.new("RGB", (200, 200)).save(big, "PNG")
    big_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()
    return [
        (dict(messages=ask("x"), max_tokens=2.5), 400, "max_tokens"),
        (dict(messages=ask("x"), max_completion_tokens=0), 400, "max_completion_tokens"),
        (dict(messages=ask("x", wide, wide, wide, wide)), 400, "messages"),
        (dict(messages=ask("x", big_url)), 400, "messages[0].content[0]"),
        (dict(messages=ask("x", corrupt)), 400, "messages[0].content[0]"),
        (dict(messages=ask("x", "/etc/hostname")), 400, "messages[0].content[0]"),
        (dict(messages=ask("x", "http://127.0.0.1:9/nothing.png")), 400, "messages[0].content[0]"),
        (dict(messages=ask("x"), temperature=-1), 400, "temperature"),
        (dict(messages=ask("x"), extra_body={"top_k": -1}), 400, "top_k"),
        (dict(messages=ask("x"), extra_body={"min_p": 1.0}), 400, "min_p"),
        (dict(messages=ask("x"), extra_body={"repetition_penalty": 0}), 400, "repetition_penalty"),
        (dict(messages=ask("x" * 300_000)), 400, "messages"),
        (dict(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    ]


def test_answers_equal_solo_generation(client, solo, sample_images):
    for messages in good_requests(sample_images):
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS)
        assert r.choices[0].message.content == solo(messages)
        assert r.usage.completion_tokens <= MAX_TOKENS
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_with_usage_and_cached_tokens(client, solo, sample_images):
    messages = good_requests(sample_images)[0]
    for attempt in range(2):
        chunks = list(client.chat.completions.create(
            model="m", messages=messages, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == solo(messages)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        usage = chunks[-1].usage
        assert not chunks[-1].choices and usage.completion_tokens > 0
    # the second time the prompt (all but its last token) comes from the prefix cache
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_logprobs_stop_and_special_tokens(client, solo, sample_images):
    messages = good_requests(sample_images)[1]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
    text = solo(messages)
    stop = text[3:5]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS, stop=[stop])
    assert r.choices[0].message.content == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    kept = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS,
                                          extra_body={"skip_special_tokens": False})
    assert "<|reserved_special_token_" in kept.choices[0].message.content


def test_max_tokens_beyond_the_limit_is_cut_to_it(client, solo, sample_images):
    """max_tokens above --max-tokens-limit (500) answers as max_tokens=500 would; 64 stop
    strings are accepted, 65 are not."""
    messages = good_requests(sample_images)[1]
    never = [f"\x00{i}" for i in range(64)]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=10**9, stop=never)
    assert r.choices[0].message.content == solo(messages, 500)
    n = r.usage.completion_tokens
    assert n <= 500 and r.choices[0].finish_reason == ("length" if n == 500 else "stop")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=messages, stop=never + ["x"])
    assert e.value.body["param"] == "stop"


def test_seeded_sampling_repeats(client, sample_images):
    kw = dict(model="m", messages=good_requests(sample_images)[1], max_tokens=MAX_TOKENS, temperature=1.0,
              top_p=0.95, seed=3)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b


@pytest.mark.parametrize("kw", [dict(temperature=0.9, top_k=4, min_p=0.05, seed=21),
                                dict(temperature=0.0, repetition_penalty=1.4, repetition_context_size=6)])
def test_sampling_settings_as_the_python_api(client, tiny_idefics3, sample_images, kw):
    """top_k, min_p, repetition penalty and seed mean what they mean in the CLI and the Python
    API: the same sampler factory and logits processors, so the same text."""
    model, processor = load(tiny_idefics3)
    messages = good_requests(sample_images)[0]
    rs = list(stream_generate(model, processor, to_processor(messages), max_tokens=MAX_TOKENS,
                              sampler=make_sampler(kw["temperature"], 1.0, kw.get("top_k", 0), kw.get("min_p", 0.0),
                                                   kw.get("seed")),
                              logits_processors=make_logits_processors(kw.get("repetition_penalty"),
                                                                       kw.get("repetition_context_size", 20))))
    if kw["temperature"] == 0:
        assert decided_steps([r.logprobs for r in rs], BATCH_MOVE) == len(rs), "a near-tie: texts may differ"
    expected = "".join(r.text for r in rs)
    extra = {k: v for k, v in kw.items() if k not in ("temperature", "seed")}
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS,
                                       temperature=kw["temperature"], seed=kw.get("seed"), extra_body=extra)
    assert r.choices[0].message.content == expected


def test_limits_auth_and_media(client, server, sample_images, tmp_path):
    for kwargs, status, param in bad_requests(sample_images):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="m", **kwargs)
        assert e.value.status_code == status, kwargs
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == [client.models.list().data[0].id]


def health(server):
    return httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {KEY}"}).json()


def wait_idle(server, timeout=30):
    for _ in range(int(timeout / 0.05)):
        h = health(server)
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"still busy: {h}")


def test_disconnect_cancels_sequence(server, sample_images):
    body = {"model": "m", "messages": good_requests(sample_images)[1], "max_tokens": 500, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert health(server)["active"] == 1
    t = time.perf_counter()
    wait_idle(server, timeout=5)
    print(f"left the batch {time.perf_counter() - t:.3f} s after the disconnect")


def test_load_16_clients_with_bad_requests(client, server, solo, sample_images):
    good, bad = good_requests(sample_images), bad_requests(sample_images)
    want = [solo(m) for m in good]  # here: MLX in the test process stays on this thread
    for m in good:  # warm up: compile, fill the caches, then take the memory baseline
        client.chat.completions.create(model="m", messages=m, max_tokens=MAX_TOKENS)
    base = wait_idle(server)["memory"]["active_bytes"]
    results, lock = [], threading.Lock()

    def worker(c):
        for k in range(4):
            n = c * 4 + k
            if n % 5 == 4:
                kwargs, status, param = bad[n % len(bad)]
                try:
                    client.chat.completions.create(model="m", **kwargs)
                    got = ("ok", None)
                except openai.APIStatusError as e:
                    got = (e.status_code, e.body.get("param"))
                with lock:
                    results.append((n, "bad", got, (status, param)))
            else:
                m, expected = good[n % len(good)], want[n % len(good)]
                stream = n % 2 == 0
                r = client.chat.completions.create(model="m", messages=m, max_tokens=MAX_TOKENS,
                                                   stream=stream)
                text = "".join(c.choices[0].delta.content or "" for c in r) if stream \
                    else r.choices[0].message.content
                with lock:
                    results.append((n, "good", text, expected))

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(16)]
    peak = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, health(server)["active"])
        time.sleep(0.02)
    assert sorted(n for n, *_ in results) == list(range(64))  # none lost, none twice
    for n, kind, got, want in results:
        assert got == want, (n, kind)
    after = wait_idle(server)
    print(f"peak batch {peak}; memory {base} -> {after['memory']['active_bytes']}; {after}")
    assert peak > 1
    assert after["memory"]["active_bytes"] <= base * 1.05 + 2**20


def video_request(path):
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]


def test_video_part(client, tmp_path, tmp_path_factory):
    from make_generate_golden import tiny_folder
    from video_synth import make_video

    path = tmp_path / "clip.mp4"
    make_video(path, 2, 4, 48, 32)
    with pytest.raises(openai.BadRequestError, match="takes no video"):  # idefics3: SmolVLM v1
        client.chat.completions.create(model="m", messages=video_request(path), max_tokens=4)
    folder = tiny_folder("tiny-smolvlm", tmp_path_factory.mktemp("tiny-smolvlm"))
    with serve(folder, tmp_path / "server.log") as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="m", messages=video_request(path), max_tokens=MAX_TOKENS)
    model, processor = load(folder)
    local = [{"role": "user", "content": [{"type": "video", "path": str(path)},
                                          {"type": "text", "text": "What happens?"}]}]
    assert r.choices[0].message.content == greedy_text(model, processor, local, MAX_TOKENS)
    assert r.usage.prompt_tokens > 50  # the frames' tokens are in


def test_prompt_lookup_per_request(client, solo, sample_images):
    """Speculative decoding by prompt lookup, per request (`prompt_lookup_tokens`, our
    extension): the same answers, concurrently with plain requests; usage reports the drafts
    in OpenAI's predicted-output fields."""
    requests = good_requests(sample_images)[:4]

    def one(i):
        extra = {"prompt_lookup_tokens": 5, "ngram_size": 2} if i % 2 == 0 else {}
        return client.chat.completions.create(model="m", messages=requests[i], max_tokens=MAX_TOKENS,
                                              extra_body=extra)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    drafted = 0
    for i, r in enumerate(results):
        assert r.choices[0].message.content == solo(requests[i])
        details = r.usage.completion_tokens_details
        if i % 2 and details is not None:
            assert not details.accepted_prediction_tokens and not details.rejected_prediction_tokens
        elif details is not None:
            drafted += details.accepted_prediction_tokens + details.rejected_prediction_tokens
    assert drafted > 0
    with pytest.raises(openai.BadRequestError, match="prompt_lookup_tokens"):
        client.chat.completions.create(model="m", messages=ask("x"), extra_body={"prompt_lookup_tokens": -1})
    with pytest.raises(openai.BadRequestError, match="--draft-model"):  # this server has no draft
        client.chat.completions.create(model="m", messages=ask("x"), extra_body={"num_draft_tokens": 2})


def test_draft_model_server(tiny_idefics3, solo, sample_images, tmp_path):
    """--draft-model: loaded once, used by greedy requests unless they set num_draft_tokens
    to 0; the same answers (text and image prompts, concurrently), drafts reported in usage.
    The model drafting for itself agrees with itself, so drafts are accepted."""
    args = ["--draft-model", str(tiny_idefics3), "--num-draft-tokens", "3"]
    with serve(tiny_idefics3, tmp_path / "server.log", *args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        requests = good_requests(sample_images)[:4]

        def one(i):
            extra = [{}, {"num_draft_tokens": 5}, {"num_draft_tokens": 0}, {}][i]
            return client.chat.completions.create(model="m", messages=requests[i], max_tokens=MAX_TOKENS,
                                                  extra_body=extra)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        for i, r in enumerate(results):
            assert r.choices[0].message.content == solo(requests[i])
            details = r.usage.completion_tokens_details
            print(i, details)
            if i == 2:  # drafting off for this request
                assert details is None or not details.accepted_prediction_tokens
            else:
                assert details.accepted_prediction_tokens > 0
        for extra, param in (({"num_draft_tokens": 65}, "num_draft_tokens"),
                             ({"num_draft_tokens": 2, "prompt_lookup_tokens": 2}, "exclude each other")):
            with pytest.raises(openai.BadRequestError, match=param):
                client.chat.completions.create(model="m", messages=ask("x"), extra_body=extra)


def test_draft_model_with_another_tokenizer_is_refused(tiny_idefics3):
    """The real SmolLM2-135M GGUF's tokenizer is not the tiny checkpoint's: refused at start, one line."""
    cmd = [sys.executable, "-m", "mlx_smolvlm.server", "--model", str(tiny_idefics3), "--draft-model",
           str(gguf_path()), "--port", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "tokenizer differs" in r.stderr, r.stderr


def test_quantized_kv_server_answers_as_quantized_solo(tmp_path_factory):
    # --kv-bits 8 from the first position: the answer and its log-probs are those of the Python
    # API with the same kv_bits (the quantized batch cache: tests/test_batch.py). The SmolLM2 GGUF:
    # the tiny checkpoints' head_dim (16) is below the smallest quantization group.
    kv = dict(kv_bits=8, quantized_kv_start=0)
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    model, processor = load(gguf_path(), dtype=mx.float32)
    rs = list(stream_generate(model, processor, to_processor(messages), max_tokens=MAX_TOKENS, **kv))
    assert decided_steps([r.logprobs for r in rs], 1e-3) == len(rs), "a near-tie: the answer may differ"
    flags = ["--dtype", "float32", "--kv-bits", "8", "--quantized-kv-start", "0"]
    with serve(gguf_path(), tmp_path_factory.mktemp("log") / "server.log", *flags) as url:
        r = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120).chat.completions.create(
            model="m", messages=messages, max_tokens=MAX_TOKENS, logprobs=True)
    assert r.choices[0].message.content == "".join(x.text for x in rs)
    ours = [t.logprob for t in r.choices[0].logprobs.content]
    diff = max(abs(a - x.logprobs[x.token].item()) for a, x in zip(ours, rs))
    print(f"server --kv-bits 8 vs Python API: max chosen-token log-prob diff {diff:.3g}")
    assert len(ours) == len(rs) and diff <= 1e-3
