"""The part of mlx-vlm's API that docling's MLX engine calls, backed by mlx_smolvlm.

Checked against docling 2.143.0's source. `docling/models/inference_engines/vlm/mlx_engine.py`
(VlmConvertOptions with MlxVlmEngineOptions) and `docling/models/vlm_pipeline_models/mlx_model.py`
(the legacy InlineVlmOptions route) import from mlx-vlm

    from mlx_vlm import generate, load, stream_generate     # generate: imported, not called
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import load_config

and call

    model, processor = load(path, strict=not tied_word_embeddings); config = load_config(path)
    prompt = apply_chat_template(processor, config, text, num_images=1)
    for r in stream_generate(model, processor, prompt, [image], max_tokens=8192, verbose=False,
                             temperature=0.0):   # older docling: temp=
        text += r.text            # the legacy route also reads r.token and r.logprobs[r.token]

`install()` makes those imports resolve here (see the README's docling section). As in mlx-vlm,
special tokens stay in the text (DocTags are added special tokens).
"""

import sys
from dataclasses import replace

from .errors import InvalidRequestError
from .generate import format_stats
from .generate import load as _load
from .generate import stream_generate as _stream_generate
from .loading import get_model_path
from .loading import load_config as _load_config
from .sample_utils import make_sampler

__all__ = ["apply_chat_template", "generate", "install", "load", "load_config", "stream_generate",
           "uninstall"]
MODULES = ("mlx_vlm", "mlx_vlm.prompt_utils", "mlx_vlm.utils")


def load(path_or_hf_repo, adapter_path=None, lazy: bool = False, revision=None, strict: bool = True,
         **kwargs):
    """(model, processor). `strict` is accepted for docling: the weights are always checked
    against the config here, and a tied head (no lm_head weight) follows the config."""
    if adapter_path is not None:
        raise InvalidRequestError("adapters are not supported by mlx_smolvlm.vlm_compat.load")
    return _load(path_or_hf_repo, lazy=lazy)


def load_config(path_or_repo, **kwargs) -> dict:
    """config.json of a folder or Hub repo, as a dict."""
    return _load_config(get_model_path(str(path_or_repo)))


def apply_chat_template(processor, config, prompt: str, num_images: int = 0,
                        add_generation_prompt: bool = True, **kwargs) -> str:
    """One user turn: `num_images` images, then `prompt`, rendered with the model's chat template."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def stream_generate(model, processor, prompt: str, image=None, *, max_tokens: int = 256,
                    verbose: bool = False, temp: float | None = None, temperature: float | None = None,
                    top_p: float = 1.0, skip_special_tokens: bool = False, **kwargs):
    """mlx-vlm's stream_generate: a formatted prompt and images (paths, URLs or PIL images) in,
    responses with `.text`, `.token` and `.logprobs` (log-probabilities over the vocabulary) out.

    docling asks for up to 8192 new tokens whatever the prompt's length; the answer stops
    where the context ends (finish_reason "length") instead of refusing the request.
    """
    images = [image] if isinstance(image, str) or hasattr(image, "size") else list(image or [])
    t = temperature if temperature is not None else temp or 0.0
    r = None
    for r in _stream_generate(model, processor, prompt, images, max_tokens=max_tokens,
                              sampler=make_sampler(t, top_p), skip_special_tokens=skip_special_tokens,
                              clip_to_context=True, **kwargs):
        if verbose:
            print(r.text, end="", flush=True)
        yield r
    if verbose and r is not None:
        print()
        print(format_stats(r))


def generate(model, processor, prompt: str, image=None, verbose: bool = False, **kwargs):
    """The whole answer: the last response of `stream_generate` with the full `.text`
    (mlx-vlm's GenerationResult fields: text, token, logprobs, prompt_tokens, generation_tokens...)."""
    text, r = "", None
    for r in stream_generate(model, processor, prompt, image, verbose=verbose, **kwargs):
        text += r.text
    return replace(r, text=text)


def install():
    """Make `import mlx_vlm` (and `mlx_vlm.prompt_utils`, `mlx_vlm.utils`) resolve to this module,
    for code such as docling's MLX engine that imports mlx-vlm by name. Call it before that code
    imports mlx-vlm; it refuses if the real mlx-vlm is imported already."""
    me = sys.modules[__name__]
    for name in MODULES:
        if sys.modules.get(name, me) is not me:
            raise RuntimeError(f"{name} is already imported (the real mlx-vlm): call install() before "
                               "anything imports it")
    for name in MODULES:
        sys.modules[name] = me


def uninstall():
    """Undo `install()`."""
    for name in MODULES:
        if sys.modules.get(name) is sys.modules[__name__]:
            del sys.modules[name]
