"""Streaming detokenization that never splits a multi-byte character.

Byte-level BPE tokens are byte strings: one character may span several tokens, and
decoding a prefix of them ends in U+FFFD. Such text is held back until the character
is complete. The tokens of the current line are decoded together, so decoders that
look at neighbouring tokens (spaces, cleanup) see the same context as a full decode.
Special tokens (`<row_1_col_2>`, `<image>`...) are not text for the reader: skipped by default.
"""


class StreamingDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self):
        self.text = ""
        self.tokens = []
        self._line = []  # tokens since the last emitted newline
        self._line_text = ""  # emitted text of those tokens
        self._segment = ""

    def add_token(self, token: int):
        self.tokens.append(token)
        self._line.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def finalize(self):
        """Emit whatever is held back (an incomplete character at the very end)."""
        if self._line:
            self._emit(self._decode())

    def _decode(self) -> str:
        return self.tokenizer.decode(self._line, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, text: str):
        new = text[len(self._line_text) :]
        self.text += new
        self._segment += new
        self._line_text = text
        if text.endswith("\n"):
            self._line, self._line_text = [], ""

    @property
    def last_segment(self) -> str:
        """The text emitted since the last read of this property."""
        s, self._segment = self._segment, ""
        return s
