"""Streaming detokenization that never splits a multi-byte character.

Byte-level BPE tokens are byte strings: one character may span several tokens, and
decoding a prefix of them ends in U+FFFD. Such text is held back until the character
is complete. Each step decodes only the new tokens behind a few already-emitted ones, so
decoders that look at neighbouring tokens (a leading-space rule) see their context, and a step
costs the same however long the line is (re-decoding the whole line cost 0.1 -> 2.1 ms/token
from 250 to 4000 tokens on one line; this stays at ~0.04).
Special tokens (`<row_1_col_2>`, `<image>`...) are not text for the reader: skipped by default.
"""

CONTEXT = 4  # emitted tokens decoded again in front of the new ones


class StreamingDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self):
        self.text = ""
        self.tokens = []
        self._context, self._context_text = [], ""  # the last emitted tokens, decoded
        self._pending = []  # tokens not emitted yet (an incomplete character)
        self._segment = ""

    def add_token(self, token: int):
        self.tokens.append(token)
        self._pending.append(token)
        text = self._decode(self._context + self._pending)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finalize(self):
        """Emit whatever is held back (an incomplete character at the very end)."""
        if self._pending:
            self._emit(self._decode(self._context + self._pending))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, text: str):
        # The context decodes to the same text in front of new tokens, for byte-level BPE and
        # SentencePiece alike; only the part after it is new.
        new = text[len(self._context_text) :]
        self.text += new
        self._segment += new
        self._context = (self._context + self._pending)[-CONTEXT:]
        self._context_text = self._decode(self._context)
        self._pending = []

    @property
    def last_segment(self) -> str:
        """The text emitted since the last read of this property."""
        s, self._segment = self._segment, ""
        return s
