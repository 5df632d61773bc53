"""What the float and the quantized KV caches share: positions appended at `offset`."""


class AppendCache:
    offset: int

    def trim(self, n: int) -> int:
        """Drop the last `n` positions (used to roll a chat turn back)."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, N: int):
        # One new token attends to everything cached; a longer chunk needs causality.
        return "causal" if N > 1 else None
