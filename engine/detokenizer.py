"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a UTF-8 character (a byte-level BPE token can
end inside one, which decodes to U+FFFD), and never the start of what may become a stop string.
"""

from __future__ import annotations

from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # released so far

    def update(self, output_token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Decode the output so far; returns (newly released text, whether a stop string was hit).
        `final` releases everything held back (the sequence ended for another reason)."""
        decoded = self.tokenizer.decode(output_token_ids)
        candidate = decoded if final else decoded.rstrip(REPLACEMENT)
        if self.stop:
            search_from = max(0, len(self.text) - self.longest_stop)
            hits = [i for i in (candidate.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                return self._release(candidate[: min(hits)]), True
            if not final:
                candidate = candidate[: len(candidate) - self._stop_prefix_length(candidate)]
        return self._release(candidate), False

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        for length in range(min(len(text), self.longest_stop - 1), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0

    def _release(self, candidate: str) -> str:
        if len(candidate) <= len(self.text):
            return ""
        new = candidate[len(self.text) :]
        self.text = candidate
        return new
