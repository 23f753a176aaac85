"""Incremental detokenisation: the text a request has produced so far, released piece by piece.

Released text never has to be taken back: a piece is held while it could still be the start of a stop string
or while its last character is an incomplete UTF-8 sequence (the tokenizer shows those as U+FFFD). So the
streamed deltas always concatenate to exactly the non-streamed text, and a stop string never leaks out.
"""

from __future__ import annotations

from collections.abc import Sequence

from moe_core.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.released = 0  # characters of self.text already handed out
        # Decode a short window, not the whole sequence, per token: text of ids[window:] minus that of
        # ids[window:decoded] is what the newest ids add (a window keeps byte-level merges across the seam right).
        self._window = 0
        self._decoded = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (newly released text, whether a stop string was hit)."""
        self.ids.append(token_id)
        self.text += self._new_text()
        hit = self._first_stop()
        if hit is not None:
            delta = self.text[self.released : hit]
            self.released = hit
            self.text = self.text[:hit]
            return delta, True
        end = self._safe_end()
        delta = self.text[self.released : end]
        self.released = max(self.released, end)
        return delta, False

    def _new_text(self) -> str:
        before = self.tokenizer.decode(self.ids[self._window : self._decoded])
        after = self.tokenizer.decode(self.ids[self._window :])
        if after.endswith(INCOMPLETE) or not after.startswith(before):
            return ""  # an incomplete UTF-8 sequence: wait for the bytes that complete it
        self._window, self._decoded = self._decoded, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Release whatever is held (the request is over, so no stop string can complete any more)."""
        if self._decoded < len(self.ids):  # trailing bytes that never completed a character
            before = self.tokenizer.decode(self.ids[self._window : self._decoded])
            self.text += self.tokenizer.decode(self.ids[self._window :])[len(before) :]
            self._decoded = len(self.ids)
        delta = self.text[self.released :]
        self.released = len(self.text)
        return delta

    @property
    def final_text(self) -> str:
        return self.text[: self.released]

    def _first_stop(self) -> int | None:
        # A stop string can only end inside the unreleased part; search from where it could start.
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.released - longest + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self.text)
        for k in range(min(end - self.released, max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[end - k : end]
            if any(s.startswith(tail) for s in self.stop):
                return end - k
        return end
