"""`python -m mlx_smolvlm.generate` as a user runs it: real weights (the SmolLM2 GGUF),
a tiny VLM checkpoint with images, chat, dry-run, bad input and Ctrl-C."""

import signal
import subprocess
import sys
import time

import pytest
from helpers import CLI_ENV, ROOT, assert_same_greedy, cli
from make_generate_golden import gguf_path

from mlx_smolvlm import blas
from mlx_smolvlm.cli import pick_dtype
from mlx_smolvlm.generate import load, stream_generate


@pytest.fixture(scope="module")
def tiny(tiny_idefics3):
    return tiny_idefics3


@pytest.fixture(scope="module")
def images(sample_images):
    return sample_images


# Two float32 runs of the real decoder (another process, another OpenBLAS kernel) put each
# log-prob within this of the other (test_gguf.py: 1e-3 on logits even against transformers).
FLOAT_MOVE = 1e-3


@pytest.fixture(scope="module")
def smollm2():
    return load(gguf_path(), dtype=pick_dtype("auto")[0])  # the CLI's dtype


def assert_float_answer(smollm2, stdout, prompt, system=None, max_tokens=8, at_least=6):
    """The CLI printed the in-process float cache's greedy answer over every step whose decision
    a float32 path cannot flip; returns that decided text."""
    model, processor = smollm2
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    rs = list(stream_generate(model, processor, msgs, max_tokens=max_tokens))
    tokens = [r.token for r in rs]
    n = assert_same_greedy(tokens, [r.logprobs for r in rs], tokens, FLOAT_MOVE, at_least=at_least,
                           what=f"float answer to {prompt!r}")
    decided = processor.tokenizer.decode(tokens[:n], skip_special_tokens=True)
    assert stdout.startswith(decided), (stdout, decided)
    return decided


def test_gguf_answer_with_stats(smollm2):
    prompt = "What is the capital of France?"
    r = cli("--model", gguf_path(), "--system", "Be brief.", "--prompt", prompt, "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Paris" in assert_float_answer(smollm2, r.stdout, prompt, "Be brief.")
    for stat in ("Prompt: ", "tokens-per-sec", "Generation: ", "Peak memory: "):
        assert stat in r.stdout


def test_images_and_tiling_controls(tiny, images):
    r = cli("--model", tiny, "--image", images["wide.png"], "--image", images["square.png"],
            "--prompt", "Compare.", "--max-tokens", 5, "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Generation: 5 tokens" in r.stdout
    # On a CPU with the system OpenBLAS the default is float32, and --verbose says so.
    assert ("dtype: float32" if blas.state["library"] else "dtype: as stored") in r.stderr
    assert "BLAS: " in r.stderr
    tiled = cli("--model", tiny, "--image", images["wide.png"], "--dry-run")
    single = cli("--model", tiny, "--image", images["wide.png"], "--dry-run", "--no-split")
    capped = cli("--model", tiny, "--image", images["wide.png"], "--dry-run", "--max-tiles", 4)
    assert "3x4 grid + global = 13 tiles, 52 image tokens" in tiled.stdout
    assert "1 tile (unsplit), 4 image tokens" in single.stdout
    assert "predicted peak memory" in tiled.stdout and "of 2048 context" in tiled.stdout
    assert "13 tiles" not in capped.stdout


def test_chat_keeps_the_cache_between_turns(tiny):
    r = cli("--model", tiny, "--chat", "--verbose", "--max-tokens", 4, stdin="Hello\nMore\n")
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stdout.splitlines() if "Prompt: " in line]
    assert len(stats) == 2 and "cached" not in stats[0] and "cached)" in stats[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temp", "-1"], "argument --temp: must be >= 0, got -1"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        (["--top-k", "x"], "argument --top-k: expected int, got 'x'"),
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--no-split", "--max-tiles", "2"], "not allowed with argument --no-split"),
    ],
)
def test_invalid_values_give_argparse_errors(args, message):
    r = cli("--model", "unused", "--prompt", "hi", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_model_and_context_length_give_one_line(tiny, images):
    for args, message in [
        (["--model", "no/such-model-here"], "without Hub access, pass a local folder"),
        (["--model", "./nowhere"], "no such model folder"),
        (["--model", "nowhere.gguf"], "no such GGUF file"),
        (["--model", tiny, "--image", images["wide.png"], "--max-tokens", 2000], "context length of 2048"),
    ]:
        r = cli(*args, "--prompt", "hi")
        assert r.returncode == 1 and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_prints_the_partial_answer_and_exits_cleanly():
    cmd = [sys.executable, "-m", "mlx_smolvlm.generate", "--model", str(gguf_path()), "--max-tokens", "200",
           "--prompt", "Write a long story about a dragon."]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=CLI_ENV)
    seen = b""
    deadline = time.time() + 120
    while len(seen.split()) < 3 and time.time() < deadline:
        seen += p.stdout.read(1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert len((seen + out).split()) >= 3 and "Traceback" not in err.decode()


def test_kv_cache_options(smollm2):
    # The first token of this answer is a 0.08-nat near-tie (The -1.883, L -1.965) that a cache
    # quantized from position 0 moves by up to 0.44 (8-bit): with the default start, a short
    # prompt keeps a float cache, so --kv-bits 8 gives the float answer.
    prompt = "What is the capital of France?"
    r = cli("--model", gguf_path(), "--prompt", prompt, "--kv-bits", "8", "--max-tokens", 8)
    assert r.returncode == 0, r.stderr
    assert "Paris" in assert_float_answer(smollm2, r.stdout, prompt)
    r = cli("--model", gguf_path(), "--prompt", prompt, "--kv-bits", "4", "--quantized-kv-start", 0,
            "--max-tokens", 2)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr  # runs; its answer may differ: not asserted
    r = cli("--model", gguf_path(), "--prompt", "Hi", "--kv-bits", "4", "--max-kv-size", 64)
    assert r.returncode == 1 and "cannot be quantized" in r.stderr


def test_kv_group_size_beyond_the_head_dim_is_one_line():
    # SmolLM2's head_dim is 64: groups of 128 cannot quantize a key, refused before any work.
    r = cli("--model", gguf_path(), "--prompt", "Hi", "--kv-bits", "8", "--kv-group-size", 128,
            "--quantized-kv-start", 0)
    assert r.returncode == 1 and "does not divide the model's head_dim of 64" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_text_only_chat_template(tiny, images, smollm2, tmp_path):
    # A fine-tune saved with SmolLM2's text-only template (`message['content'] + ...`).
    import shutil

    from mlx_smolvlm.processing import load_processor

    folder = tmp_path / "finetune"
    shutil.copytree(tiny, folder)
    template = smollm2[1].tokenizer.chat_template
    (folder / "chat_template.jinja").write_text(template)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}]
    rendered = load_processor(folder).apply_chat_template(parts)
    assert rendered == smollm2[1].tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    r = cli("--model", folder, "--prompt", "Hi", "--max-tokens", 2)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = cli("--model", folder, "--prompt", "Hi", "--image", images["wide.png"], "--max-tokens", 2)
    print(r.stderr)
    assert r.returncode == 1 and "chat template takes text only" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
