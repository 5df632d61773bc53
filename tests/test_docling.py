"""docling 2.143.0, unmodified, on mlx_smolvlm: its stock presets through our server process on
127.0.0.1 (only the URL changed) and its MLX engine through `vlm_compat.install()`, as the
README documents them, converting a generated 3-page PDF to Markdown.

The model is tests/fixtures/tiny-granite-docling (scripts/make_doctags_fixture.py): granite-
docling's tokenizer and config at reduced width, overfitted to answer the page with DocTags
(a heading and a table), so docling has something to parse.
"""

import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from docling.datamodel.base_models import ConversionStatus, InputFormat
from docling.datamodel.pipeline_options import VlmConvertOptions, VlmPipelineOptions
from docling.datamodel.vlm_engine_options import ApiVlmEngineOptions
from docling.datamodel.vlm_model_specs import GRANITEDOCLING_VLLM_API
from docling.document_converter import DocumentConverter, PdfFormatOption
from docling.pipeline.vlm_pipeline import VlmPipeline
from make_doctags_fixture import DOCTAGS, HEADING, PROMPT, TABLE, page_pdf, rendered, write_processor
from serving import serve

from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-granite-docling"
PAGES = 3
MIN_MARGIN = 2.0  # nats between the answer token and the runner-up, at every step


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The fixture weights in a folder named as docling's MLX engine looks it up."""
    dest = tmp_path_factory.mktemp("artifacts") / "ibm-granite--granite-docling-258M-mlx"
    write_processor(dest)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    return page_pdf(tmp_path_factory.mktemp("pdf") / "doc.pdf", PAGES)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    # docling asks max_tokens 8192 (4096 in its vLLM preset): cut to 64 here, past the answer
    with serve(checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--max-tokens-limit", "64") as url:
        yield url


@contextmanager
def in_flight(url):
    """Polls /health; yields a list whose max is the most requests the server held at once."""
    seen, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            h = httpx.get(f"{url}/health", timeout=5).json()
            seen.append(h["active"] + h["waiting"])
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        done.set()
        t.join()


def convert(pdf, vlm_options, **pipeline):
    options = VlmPipelineOptions(vlm_options=vlm_options, **pipeline)
    converter = DocumentConverter(format_options={
        InputFormat.PDF: PdfFormatOption(pipeline_cls=VlmPipeline, pipeline_options=options)})
    return converter.convert(pdf)


def table_rows(md: str, row) -> int:
    """How many Markdown table rows hold exactly the cells of `row`."""
    return len(re.findall(r"^\|" + r"\|".join(rf"\s*{re.escape(c)}\s*" for c in row) + r"\|$", md, re.M))


def check_markdown(md: str):
    print(md)
    assert md.count(f"## {HEADING}") == PAGES
    for row in TABLE:
        assert table_rows(md, row) == PAGES, row


def test_the_fixture_answers_the_page_with_doctags_by_a_margin(checkpoint, pdf):
    """Greedy output for the page as docling renders it is DOCTAGS, each token ahead of the
    runner-up by MIN_MARGIN nats (no near-tie another BLAS could flip)."""
    model, processor = load(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image", "image": rendered(pdf)},
                                             {"type": "text", "text": PROMPT}]}]
    text, gaps = "", []
    for r in stream_generate(model, processor, messages, max_tokens=64, skip_special_tokens=False):
        top2 = mx.topk(r.logprobs.reshape(-1), 2)
        gaps.append(float(top2.max() - top2.min()))
        text += r.text
    print(f"greedy margins: min {min(gaps):.2f} nats over {len(gaps)} tokens (need {MIN_MARGIN})")
    assert text == DOCTAGS and r.finish_reason == "stop"
    assert min(gaps) > MIN_MARGIN


def test_skip_special_tokens_drops_the_named_special_tokens_only(checkpoint):
    """On granite-docling's tokenizer_config (every DocTag an added token flagged special, two
    additional_special_tokens): we drop what transformers' all_special_ids names, so DocTags
    survive; transformers 5.24's own decode(skip_special_tokens=True) drops them all."""
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    assert ours.skip_ids == set(theirs.all_special_ids)
    s = "<|start_of_role|>x<image><doctag><title>Hi</title><otsl><fcel>a<nl></otsl></doctag><|end_of_text|>"
    ids = ours.encode(s)
    assert ids == theirs.encode(s, add_special_tokens=False)
    kept = "x<doctag><title>Hi</title><otsl><fcel>a<nl></otsl></doctag>"
    assert ours.decode(ids, skip_special_tokens=True) == kept
    assert theirs.decode([i for i in ids if i not in theirs.all_special_ids]) == kept
    assert theirs.decode(ids, skip_special_tokens=True) == "xHia"
    assert ours.decode(ids) == theirs.decode(ids) == s


def test_granite_docling_preset_through_the_api_engine(server, pdf):
    """`VlmConvertOptions.from_preset("granite_docling")` with `ApiVlmEngineOptions(url=...)`:
    max_tokens 8192 is cut to --max-tokens-limit, the answer stops on `</doctag>`, DocTags kept."""
    vlm = VlmConvertOptions.from_preset(
        "granite_docling", engine_options=ApiVlmEngineOptions(url=f"{server}/v1/chat/completions"))
    result = convert(pdf, vlm, enable_remote_services=True)
    assert result.status == ConversionStatus.SUCCESS, result.errors
    check_markdown(result.document.export_to_markdown())


def test_vllm_api_preset_runs_pages_concurrently(server, pdf):
    """docling's GRANITEDOCLING_VLLM_API (skip_special_tokens: true, concurrency 4), URL changed:
    DocTags survive (only the named special tokens are skipped) and the pages overlap."""
    vlm = GRANITEDOCLING_VLLM_API.model_copy(deep=True)
    vlm.url = f"{server}/v1/chat/completions"
    assert vlm.params["skip_special_tokens"] is True and vlm.concurrency == 4
    with in_flight(server) as seen:
        result = convert(pdf, vlm, enable_remote_services=True)
    assert result.status == ConversionStatus.SUCCESS, result.errors
    check_markdown(result.document.export_to_markdown())
    print(f"most requests in flight at once: {max(seen)}")
    assert max(seen) >= 2


def readme_block(after: str) -> str:
    """The first ```python block of the README after the line `after`."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return text.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_mlx_engine_route_as_the_readme_documents_it(checkpoint, pdf, tmp_path):
    """The README's MLX-engine recipe, its two paths filled in, in a fresh interpreter."""
    code = readme_block("**In process**")
    assert 'artifacts_path="models"' in code and '"doc.pdf"' in code
    code = code.replace('"models"', repr(str(checkpoint.parent))).replace('"doc.pdf"', repr(str(pdf)))
    script = tmp_path / "route.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check_markdown(out.stdout.strip())


def test_vlm_compat_install_and_the_legacy_route_calls(checkpoint, monkeypatch):
    """install() refuses to shadow an imported mlx-vlm; what docling's legacy InlineVlmOptions
    route reads (r.token, r.logprobs[r.token]) and `generate` (imported there) work."""
    import types

    from mlx_smolvlm import vlm_compat

    for name in vlm_compat.MODULES:  # the real mlx-vlm, if an earlier test imported it, comes back after
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "mlx_vlm", types.ModuleType("mlx_vlm"))
    with pytest.raises(RuntimeError, match="already imported"):
        vlm_compat.install()
    monkeypatch.delitem(sys.modules, "mlx_vlm")
    vlm_compat.install()
    try:
        from mlx_vlm import generate, load
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import load_config

        model, processor = load(checkpoint, strict=True)
        prompt = apply_chat_template(processor, load_config(checkpoint), PROMPT, num_images=0)
        rs = list(vlm_compat.stream_generate(model, processor, prompt, max_tokens=6, temp=0.0))
        for r in rs:
            assert float(r.logprobs[r.token]) == float(r.logprobs.max())  # greedy
        whole = generate(model, processor, prompt, max_tokens=6, temperature=0.0)
        assert whole.text == "".join(r.text for r in rs) and whole.token == rs[-1].token
    finally:
        vlm_compat.uninstall()
    assert not any(name in sys.modules for name in vlm_compat.MODULES)
