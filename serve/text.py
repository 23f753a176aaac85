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


def _byte_level_alphabet() -> dict[str, int]:
    """The character a byte-level BPE vocabulary (GPT-2's, Qwen2's) writes for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


class TokenTexts:
    """What a token shows in a logprobs answer, cached per id.

    ``text``: the token decoded on its own, special tokens included (vLLM's ``decode([id])``), so a token that
    holds part of a multi-byte character shows U+FFFD. ``bytes``: the token's own bytes (OpenAI's ``bytes``
    field, which exists so that a client can join such tokens back into characters): read from the byte-level
    vocabulary, a special token's its text in UTF-8.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._alphabet = _byte_level_alphabet()
        self._cache: dict[int, tuple[str, bytes, bool]] = {}

    def _entry(self, token_id: int) -> tuple[str, bytes, bool]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            special = bool(text) and not self.tokenizer.decode([token_id])
            piece = self.tokenizer.id_to_token(token_id) or ""
            if not special and piece and all(c in self._alphabet for c in piece):
                raw = bytes(self._alphabet[c] for c in piece)
            else:
                raw = text.encode("utf-8")
            entry = self._cache[token_id] = (text, raw, special)
        return entry

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> bytes:
        return self._entry(token_id)[1]

    def special(self, token_id: int) -> bool:
        return self._entry(token_id)[2]


class TextOffsets:
    """Each token's character offset in a text made of the tokens' bytes (OpenAI's ``text_offset``).

    Counted from the bytes, one character per UTF-8 lead byte, so a token that continues a character started
    by the one before it has that character's offset; a token the text does not show (a special token in
    generated text, which is decoded without them) adds nothing. Fed token by token, so a stream's chunks and
    the whole answer give the same offsets.
    """

    def __init__(self, names: TokenTexts) -> None:
        self.names = names
        self.chars = 0

    def push(self, token_id: int, shown: bool = True) -> int:
        raw = self.names.bytes(token_id) if shown else b""
        continues = bool(raw) and raw[0] & 0xC0 == 0x80
        offset = max(0, self.chars - continues)
        self.chars += sum(1 for b in raw if b & 0xC0 != 0x80)
        return offset
