"""The part of mlx-vlm's API that docling's MLX engine calls, backed by mlx_smolvlm.

docling (`docling/models/inference_engines/vlm/mlx_engine.py`) imports `load`,
`stream_generate`, `apply_chat_template` and `load_config` from mlx-vlm and calls

    model, processor = load(path); config = load_config(path)
    prompt = apply_chat_template(processor, config, text, num_images=1)
    for r in stream_generate(model, processor, prompt, [image], max_tokens=n, verbose=False, temp=t):
        text += r.text

One import line switches it:

    from mlx_smolvlm.vlm_compat import apply_chat_template, load, load_config, stream_generate

As in mlx-vlm, special tokens stay in the text (DocTags are added special tokens).
"""

from .generate import format_stats, load, stream_generate as _stream_generate
from .loading import get_model_path
from .loading import load_config as _load_config
from .sample_utils import make_sampler

__all__ = ["apply_chat_template", "load", "load_config", "stream_generate"]


def load_config(path_or_repo) -> dict:
    """config.json of a folder or Hub repo, as a dict."""
    return _load_config(get_model_path(str(path_or_repo)))


def apply_chat_template(processor, config, prompt: str, num_images: int = 0, add_generation_prompt: bool = True,
                        **kwargs) -> str:
    """One user turn: `num_images` images, then `prompt`, rendered with the model's chat template."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def stream_generate(model, processor, prompt: str, image=None, *, max_tokens: int = 256, verbose: bool = False,
                    temp: float | None = None, temperature: float | None = None, top_p: float = 1.0,
                    skip_special_tokens: bool = False, **kwargs):
    """mlx-vlm's stream_generate: a formatted prompt and images (paths, URLs or PIL images) in,
    responses with `.text` out.

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
