"""Tests for the embedded corpus: determinism, sizes, split separation and internal consistency."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest

from moe_core.corpus import (
    COUNTRIES,
    DEFAULT_NUM_CHARS,
    embedded_corpus,
    number_to_words,
    write_embedded_corpus,
)

WORD_TO_NUMBER = {number_to_words(n): n for n in range(1000)}
NUM = r"(\d+|[a-z]+(?:-[a-z]+)?)"


def _value(token: str) -> int:
    return int(token) if token.isdigit() else WORD_TO_NUMBER[token.lower()]


@pytest.fixture(scope="module")
def train() -> str:
    return embedded_corpus("train")


@pytest.fixture(scope="module")
def eval_text() -> str:
    return embedded_corpus("eval")


def test_deterministic() -> None:
    assert embedded_corpus("train", 300_000) == embedded_corpus("train", 300_000)
    assert embedded_corpus("eval") == embedded_corpus("eval")


def test_pinned_digest() -> None:
    """Guards byte-identity across machines/Python versions; update deliberately if templates change."""
    digest = hashlib.sha256(embedded_corpus("train", 50_000).encode("ascii")).hexdigest()
    assert digest == PINNED_TRAIN_50K_SHA256


def test_default_sizes(train: str, eval_text: str) -> None:
    for text, split in ((train, "train"), (eval_text, "eval"), (embedded_corpus("valid"), "valid")):
        target = DEFAULT_NUM_CHARS[split]
        assert 0.99 * target <= len(text) <= target
    assert DEFAULT_NUM_CHARS == {"train": 2_000_000, "eval": 200_000, "valid": 200_000}


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    embedded_corpus("train")
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("num_chars", [1, 10, 500, 12_345, 100_000])
def test_num_chars_bound_and_prefix(train: str, num_chars: int) -> None:
    text = embedded_corpus("train", num_chars)
    assert 0 < len(text) <= num_chars
    assert train.startswith(text) or num_chars < 500  # tiny requests cut the first document
    if num_chars >= 500:
        assert text.endswith("\n") and not text.endswith("\n\n\n")


def test_zero_and_bad_args() -> None:
    assert embedded_corpus("train", 0) == ""
    with pytest.raises(ValueError, match="split"):
        embedded_corpus("test")
    with pytest.raises(ValueError):
        embedded_corpus("train", -1)


def test_plain_ascii_and_document_structure(train: str) -> None:
    assert train.isascii()
    docs = train.rstrip("\n").split("\n\n")
    assert len(docs) > 1000
    assert all(doc.strip() == doc and doc for doc in docs)
    assert "\n\n\n" not in train


def test_splits_differ(train: str, eval_text: str) -> None:
    assert not train.startswith(eval_text[:1000])
    train_docs = set(train.split("\n\n"))
    for held_out in (eval_text, embedded_corpus("valid")):
        docs = held_out.split("\n\n")
        assert sum(doc in train_docs for doc in docs) / len(docs) < 0.05
    assert embedded_corpus("valid") != eval_text  # tuning on valid leaves eval held out


def test_variety(train: str) -> None:
    for marker in ("Once upon a time", "The capital of", " plus ", " = ", "User: ", "Assistant: ", "def ", "- "):
        assert marker in train
    assert len(set(re.findall(r"[A-Za-z]+", train))) > 250


def test_word_arithmetic_is_correct(train: str) -> None:
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    pattern = re.compile(rf"\b{NUM} (plus|minus|times) {NUM} is {NUM}\.", re.IGNORECASE)
    matches = pattern.findall(train)
    assert len(matches) > 1000
    for a, op, b, c in matches:
        assert ops[op](_value(a), _value(b)) == _value(c), (a, op, b, c)


def test_digit_arithmetic_is_correct(train: str) -> None:
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    matches = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", train, flags=re.MULTILINE)
    assert len(matches) > 1000
    for a, op, b, c in matches:
        assert ops[op](int(a), int(b)) == int(c)


def test_word_problems_are_correct(train: str) -> None:
    pattern = re.compile(
        rf"(\w+) has {NUM} \w+\. (?:She|He) (buys|gives) {NUM} (?:more|to \w+)\. Now \1 has {NUM} \w+\."
    )
    matches = pattern.findall(train)
    assert len(matches) > 100
    for _name, a, verb, b, c in matches:
        expected = _value(a) + _value(b) if verb == "buys" else _value(a) - _value(b)
        assert expected == _value(c)


def test_code_comments_are_correct(train: str) -> None:
    adds = re.findall(r"print\(add\((\d+), (\d+)\)\)  # (\d+)", train)
    muls = re.findall(r"print\(mul\((\d+), (\d+)\)\)  # (\d+)", train)
    assert adds and muls
    assert all(int(a) + int(b) == int(c) for a, b, c in adds)
    assert all(int(a) * int(b) == int(c) for a, b, c in muls)


def test_facts_are_consistent(train: str, eval_text: str) -> None:
    table = {c[0]: c[1] for c in COUNTRIES}
    seen: dict[str, set[str]] = {}
    for text in (train, eval_text):
        for country, capital in re.findall(r"The capital of (\w+) is (\w+)\.", text):
            seen.setdefault(country, set()).add(capital)
        for capital, country in re.findall(r"(\w+) is the capital of (\w+)\.", text):
            seen.setdefault(country, set()).add(capital)
    assert set(seen) == set(table)
    assert all(capitals == {table[country]} for country, capitals in seen.items())


def test_counting_sequences_are_correct(train: str) -> None:
    for start, seq in re.findall(r"Count down from (\d+): ([\d, ]+)\.", train):
        assert [int(x) for x in seq.split(", ")] == list(range(int(start), 0, -1))
    for n, seq in re.findall(r"Let us count to ([a-z-]+): ([a-z, -]+)\.", train):
        assert seq.split(", ") == [number_to_words(i) for i in range(1, _value(n) + 1)]


def test_write_embedded_corpus(tmp_path: Path) -> None:
    out = tmp_path / "data" / "corpus"
    paths = write_embedded_corpus(out)
    assert set(paths) == {"train", "eval", "valid"}
    assert paths["train"] == out / "train.txt" and paths["eval"] == out / "eval.txt"
    assert paths["eval"].read_text(encoding="utf-8") == embedded_corpus("eval")
    assert paths["train"].stat().st_size == len(embedded_corpus("train"))
    # Overwrites in place and leaves no temp files behind.
    paths["eval"].write_text("stale", encoding="utf-8")
    write_embedded_corpus(out)
    assert paths["eval"].read_text(encoding="utf-8") == embedded_corpus("eval")
    assert sorted(p.name for p in out.iterdir()) == ["eval.txt", "train.txt", "valid.txt"]


PINNED_TRAIN_50K_SHA256 = "3522d69ae56efe7e48d9390bf2bbdb7cf6cd7638011d79610c3bb000658fc1bb"
