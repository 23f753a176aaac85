"""Does transformers tokenize a model directory exactly as upmoe does? Shared by the init, upcycle and export tests.

transformers 5 loads every ``qwen2`` / ``qwen2_moe`` directory with ``Qwen2Tokenizer``, which rebuilds the
pipeline from its own code (Qwen2's regex, NFC, byte-level) around the file's vocabulary and merges. So a
directory whose ``tokenizer.json`` says anything else is scored and served on other ids by transformers and
vLLM than by upmoe; these checks catch that on text where pre-tokenizers differ.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from moe_core.tokenizer import Tokenizer

# Text where pre-tokenizers disagree: digit runs, contractions in any case, punctuation runs, newline and
# whitespace runs (\r\n, blank lines, tabs, several spaces), non-ASCII letters and digits, emoji (multi-byte,
# ZWJ sequences), a decomposed accent (NFC), and special tokens inside text.
PARITY_TEXTS: tuple[str, ...] = (
    "In 2024 the capital of Velor had 12345 people. Tom's 3 apples cost 17 coins.",
    "Tom's cat; don't stop, WE'LL see. They'd've said I'M here, you're late, we've gone, SHE'S OK, it'S odd",
    "Hello, world!!! (yes) -- 3.14159 / 2,000,000 = ?; a+b=c; x[0]->y... \"quoted\" 'single' #tag @user 50%",
    "line one\nline two\r\nline three\n\n\nafter blank lines\r\n\r\nend\n",
    "tab\there\t\tdouble  two   three    spaces   \t mixed \n  indented\n\t\tdeeper",
    "  leading and trailing spaces  ",
    "na\u00efve caf\u00e9 \u00c5ngstr\u00f6m, \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8, \u4e2d\u6587 123 "
    "\u0663\u0664\u0665 \u00bd, emoji \U0001f642\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 ok",
    "cafe\u0301 (decomposed accent)",
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n",
    "",
)


def assert_transformers_tokenizes_like_upmoe(model_dir: Path) -> None:
    """``AutoTokenizer.from_pretrained(model_dir)`` gives upmoe's ids and decodes them to the same text."""
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(model_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert len(hf) == ours.vocab_size, (len(hf), ours.vocab_size)
    for text in PARITY_TEXTS:
        ids = ours.encode(text)
        hf_ids = hf.encode(text, add_special_tokens=False)
        assert hf_ids == ids, f"{type(hf).__name__} of {model_dir} gives other ids for {text!r}:\n{hf_ids}\n{ids}"
        # The default call adds nothing either (no BOS for Qwen2), as eval harnesses and servers use it.
        assert hf(text)["input_ids"] == ids, text
        expected = unicodedata.normalize("NFC", text)  # both normalize to NFC before splitting
        assert ours.decode(ids, skip_special_tokens=False) == expected, text
        assert hf.decode(ids, skip_special_tokens=False) == expected, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text


def assert_digits_split_individually(tok: Tokenizer) -> None:
    """No vocabulary entry holds a digit next to anything else, and a digit run encodes digit by digit."""
    for token_id in range(tok.vocab_size):
        text = tok.decode([token_id], skip_special_tokens=False)
        if any(unicodedata.category(c) == "Nd" for c in text):
            assert len(text) == 1, f"token {token_id} {text!r} holds a digit and something else"
    for run in ("12345", "2024", "0", "9876543210"):
        ids = tok.encode(run)
        assert [tok.decode([i]) for i in ids] == list(run), (run, ids)
    # Digits of other scripts (\p{N}) too; the tiny vocabulary may spell each in several byte tokens.
    pieces = [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x\u0663\u0664\u0665 12")]
    assert len(pieces) == 7 and pieces[0] == "x" and pieces[4] == "\u0120", pieces
