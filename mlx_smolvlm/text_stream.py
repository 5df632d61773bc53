"""Generated tokens -> streamed text, with the end conditions every generation loop shares:
the end-of-sequence token, `max_tokens`, and stop strings (text that could still become one
is held back, so a stop string is never partly streamed). A stop string that is one token
(`</doctag>`, `<|end_of_text|>`) also stops on that token, so it stops when skipped special
tokens never reach the text."""

from .detokenizer import StreamingDetokenizer


def held_back(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    for k in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return k
    return 0


def single_token(tokenizer, s: str) -> int | None:
    """The id of the one token whose text is exactly `s`, else None."""
    i = tokenizer.convert_tokens_to_ids(s)
    return i if i is not None and tokenizer.encode(s) == [i] else None


class TextStream:
    def __init__(self, tokenizer, max_tokens: int, stop=None, skip_special_tokens: bool = True):
        self.detok = StreamingDetokenizer(tokenizer, skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        stop_ids = {single_token(tokenizer, s) for s in self.stop} - {None}
        self.eos = set(tokenizer.eos_token_ids) | stop_ids
        self.max_tokens = max_tokens
        self.n, self.held = 0, ""

    def add(self, token: int) -> tuple[str, str | None]:
        """The text this token releases, and the finish reason ("stop", "length") or None."""
        self.n += 1
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            self.detok.add_token(token)
            if self.n == self.max_tokens:
                finish = "length"
        if finish:
            self.detok.finalize()
        held = self.held + self.detok.last_segment
        cut = min((held.find(s) for s in self.stop if s in held), default=-1)
        if cut >= 0:
            self.held = ""
            return held[:cut], "stop"
        k = len(held) if finish or not self.stop else len(held) - held_back(held, self.stop)
        self.held = held[k:]
        return held[:k], finish
