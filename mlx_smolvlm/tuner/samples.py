"""One conversation -> token ids, assistant-token mask and pixels, as inference builds them.

The loss covers the assistant turns only: each turn's span is where the model's own chat template
renders it, read by rendering the conversation up to the turn with and without it, so no
template needs token ids written down (SmolVLM's, SmolVLM2's and the docling models' alike).
"""

import re
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import InvalidRequestError, TokenizerError
from ..processing import VIDEO_TOKEN, message_images
from ..video import CHAT_TEMPLATE as VIDEO_CHAT_TEMPLATE


@dataclass
class Sample:
    input_ids: np.ndarray  # (L,) int32
    mask: np.ndarray  # (L,) bool: the token is a loss target (an assistant token)
    pixel_values: np.ndarray | None = None  # (N, C, H, W)
    pixel_attention_mask: np.ndarray | None = None  # (N, H, W)
    features: mx.array | None = None  # (N, tokens, D): a frozen vision tower's output, kept

    def has_media(self) -> bool:
        return self.pixel_values is not None or self.features is not None

    def __len__(self):
        return len(self.input_ids)


def assistant_spans(processor, messages, full: str, **kw) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`, the rendered conversation: the text
    that rendering messages[: i + 1] adds to rendering messages[:i] with the generation prompt,
    trailing whitespace off (the model stops at its end-of-turn token)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:i], add_generation_prompt=True, **kw)
        upto = processor.apply_chat_template(messages[: i + 1], add_generation_prompt=False, **kw)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise InvalidRequestError("the chat template does not render this conversation turn by turn "
                                      "(a turn changes the text before it), so the assistant tokens "
                                      "cannot be located")
        spans.append((len(prompt), len(upto.rstrip())))
    return spans


def _expanded_spans(spans, rendered_pieces, pieces):
    """Map spans of the rendered prompt onto the prompt with each placeholder expanded."""
    out, start, shift = [], 0, 0
    bounds = []  # (rendered start, rendered end, shift) per text piece
    for k, piece in enumerate(rendered_pieces):
        if k % 2 == 0:
            bounds.append((start, start + len(piece), shift))
        shift += len(pieces[k]) - len(piece)
        start += len(piece)
    for a, b in spans:
        inside = [s for lo, hi, s in bounds if lo <= a and b <= hi]
        if not inside:
            raise InvalidRequestError("an assistant turn holds an image or video: only their text is learned")
        out.append((a + inside[0], b + inside[0]))
    return out


def encode(processor, messages, **controls) -> Sample:
    """Token ids, assistant-token mask and pixels of one conversation, as inference builds them."""
    kw = {}
    if message_images(messages, "video"):
        kw["chat_template"] = VIDEO_CHAT_TEMPLATE  # every prefix with the template the video uses
    rendered = processor.apply_chat_template(messages, add_generation_prompt=False, **kw)
    spans = assistant_spans(processor, messages, rendered, **kw)
    out = processor(messages, add_generation_prompt=False, return_pieces=True, **controls)
    pattern = f"({re.escape(processor.image_token)}|{re.escape(VIDEO_TOKEN)})"
    pieces = out["prompt_pieces"]
    rendered_pieces = re.split(pattern, rendered) if len(pieces) > 1 else [rendered]
    spans = _expanded_spans(spans, rendered_pieces, pieces)
    enc = processor.tokenizer.backend.encode("".join(pieces), add_special_tokens=False)
    ids = np.array(enc.ids, dtype=np.int32)
    if not np.array_equal(ids, out["input_ids"][0]):
        raise TokenizerError("tokenizer offsets disagree with the processor's tokens")
    starts = np.array([o[0] for o in enc.offsets])
    mask = np.zeros(len(ids), bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    pv, pam = out.get("pixel_values"), out.get("pixel_attention_mask")
    return Sample(ids, mask, None if pv is None else pv[0], None if pam is None else pam[0])


def fit_length(sample: Sample, max_len: int, image_token_id: int) -> Sample | None:
    """`sample` if it fits; else cut in text after its last image (never inside an image run,
    whose closing marker is kept), or None when no assistant token would remain."""
    if max_len is None or len(sample) <= max_len:
        return sample
    media = np.flatnonzero(sample.input_ids == image_token_id)
    keep_from = media[-1] + 2 if len(media) else 0  # the run and its closing marker
    if keep_from > max_len or not sample.mask[1:max_len].any():
        return None
    return Sample(sample.input_ids[:max_len], sample.mask[:max_len], sample.pixel_values,
                  sample.pixel_attention_mask)
