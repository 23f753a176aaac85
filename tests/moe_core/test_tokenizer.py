"""Tests for moe_core.tokenizer: training, loading v4/v5 directories, and parity with transformers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_core.corpus import embedded_corpus
from moe_core.tokenizer import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    train_bpe_tokenizer,
)
from tests.testlib import run_cli
from tests.tokenizer_parity import (
    PARITY_TEXTS,
    assert_digits_split_individually,
    assert_transformers_tokenizes_like_upmoe,
)

VOCAB = 1024
TEXTS = [
    "Hello world!",
    "  two leading spaces and trailing  ",
    "The capital of Zorvania is Keltmoor.",
    "12 + 7 = 19\nseven plus five is twelve.",
    "def add(a, b):\n    return a + b",
    "User: What is 3 plus 4?\nAssistant: 3 plus 4 is 7.",
    "naive cafe, na\u00efve caf\u00e9, \u65e5\u672c\u8a9e \U0001f642",
    "",
]
MESSAGES = [
    {"role": "user", "content": "What is the capital of Pellaria?"},
    {"role": "assistant", "content": "The capital of Pellaria is Ostrin."},
    {"role": "user", "content": "Thanks!"},
]


# The pipeline of Qwen2's own tokenizer.json (Qwen/Qwen2-0.5B and later), which transformers' Qwen2Tokenizer
# rebuilds whatever a qwen2 directory's file says.
_QWEN2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
QWEN2_PIPELINE = {
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {
                    "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
                    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
                },
                "behavior": "Isolated",
                "invert": False,
            },
            _QWEN2_BYTE_LEVEL,
        ],
    },
    "post_processor": _QWEN2_BYTE_LEVEL,
    "decoder": _QWEN2_BYTE_LEVEL,
}
QWEN2_BPE_OPTIONS = {
    "type": "BPE",
    "dropout": None,
    "unk_token": None,
    "continuing_subword_prefix": "",
    "end_of_word_suffix": "",
    "fuse_unk": False,
    "byte_fallback": False,
    "ignore_merges": False,
}


def _hash_dir(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([embedded_corpus("train", 200_000)], VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _copy_dir(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in drop:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None and key == "chat_template":
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config), encoding="utf-8")


# ---- training output ---------------------------------------------------------------------------


def test_trained_directory_layout(tok_dir: Path, tok: Tokenizer) -> None:
    names = {f.name for f in tok_dir.iterdir()}
    assert names == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"}
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["unk_token"] is None and config["add_prefix_space"] is False
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        "0": "<|endoftext|>",
        "1": "<|im_start|>",
        "2": "<|im_end|>",
    }
    assert all(v["special"] for v in config["added_tokens_decoder"].values())
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None and config["add_bos_token"] is False
    assert config["clean_up_tokenization_spaces"] is False
    assert config["chat_template"] == (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert config["chat_template"] == CHATML_TEMPLATE
    special_map = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["eos_token"]["content"] == "<|endoftext|>"


def test_tokenizer_json_is_qwen2s_pipeline(tok_dir: Path) -> None:
    from moe_core.tokenizer import QWEN2_PRETOKENIZE_REGEX

    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert {key: data[key] for key in QWEN2_PIPELINE} == QWEN2_PIPELINE
    assert {k: v for k, v in data["model"].items() if k not in ("vocab", "merges")} == QWEN2_BPE_OPTIONS
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN2_PRETOKENIZE_REGEX
    assert [(t["id"], t["content"], t["special"], t["normalized"]) for t in data["added_tokens"]] == [
        (i, t, True, False) for i, t in enumerate(SPECIAL_TOKENS)
    ]
    transformers_qwen2 = pytest.importorskip("transformers.models.qwen2.tokenization_qwen2")
    if hasattr(transformers_qwen2, "PRETOKENIZE_REGEX"):  # transformers 4 keeps it in the slow tokenizer only
        assert transformers_qwen2.PRETOKENIZE_REGEX == QWEN2_PRETOKENIZE_REGEX


def test_digits_are_split_individually(tok: Tokenizer) -> None:
    assert_digits_split_individually(tok)
    ids = tok.encode("In 2024 the capital of Velor had 12345 people.")
    assert [tok.decode([i]) for i in ids].count("2") == 3  # 2024 and 12345, one token per digit


def test_contractions_and_newlines_are_split_like_qwen2(tok: Tokenizer) -> None:
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("Tom's WE'LL don't\r\n\n  x")]
    # Byte-level spells a space as \u0120, \r as \u010d and \n as \u010a.
    assert pieces == ["Tom", "'s", "\u0120WE", "'LL", "\u0120don", "'t", "\u010d\u010a\u010a", "\u0120", "\u0120x"]


def test_vocab_and_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == 0
    assert tok.stop_token_ids == {0, 2}
    assert tok.token_to_id("not-a-token-at-all") is None


def test_training_is_deterministic(tmp_path: Path, tok_dir: Path) -> None:
    train_bpe_tokenizer([embedded_corpus("train", 200_000)], VOCAB, tmp_path / "again")
    assert _hash_dir(tmp_path / "again") == _hash_dir(tok_dir)


def test_training_is_deterministic_across_processes(tmp_path: Path, tok_dir: Path) -> None:
    """Rust hash maps are seeded per process, so same-process reruns alone would not prove determinism."""
    out = tmp_path / "subprocess"
    code = (
        "import sys; from moe_core.corpus import embedded_corpus; from moe_core.tokenizer import train_bpe_tokenizer; "
        f"train_bpe_tokenizer([embedded_corpus('train', 200_000)], {VOCAB}, sys.argv[1])"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", code, str(out)], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
    )
    assert _hash_dir(out) == _hash_dir(tok_dir)


def test_train_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], 100, tmp_path)


# ---- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_adds_no_special_tokens_and_keeps_them_atomic(tok: Tokenizer) -> None:
    assert 0 not in tok.encode("hello") and 1 not in tok.encode("hello")
    prompt = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "user\nhi\n"


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode("The capital") != []  # corpus words compress
    assert len(tok.encode("The capital of Zorvania is Keltmoor.")) < 12


# ---- parity with transformers ------------------------------------------------------------------


def test_transformers_loads_same_ids(tok: Tokenizer, hf_tok) -> None:
    assert type(hf_tok).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")  # transformers 5, 4
    assert len(hf_tok) == tok.vocab_size
    assert hf_tok.eos_token == tok.eos_token and hf_tok.pad_token_id == tok.pad_token_id
    assert hf_tok.bos_token is None and hf_tok.unk_token is None
    for text in [*TEXTS, *PARITY_TEXTS, "<|im_start|>system\nx<|im_end|>"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_tokenizer_directory_tokenizes_like_transformers(tok_dir: Path) -> None:
    assert_transformers_tokenizes_like_upmoe(tok_dir)


@pytest.mark.parametrize("preset", ["debug", "debug-moe"])
def test_init_output_tokenizes_like_transformers(tmp_path: Path, preset: str) -> None:
    """transformers loads a qwen2 directory with Qwen2Tokenizer (its own pipeline), a qwen2_moe one as written."""
    out = tmp_path / preset
    result = run_cli("init", out, "--preset", preset)
    assert result.rc == 0, result.err
    assert_transformers_tokenizes_like_upmoe(out)
    assert_digits_split_individually(Tokenizer.from_dir(out))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_same_chat_prompt(tok: Tokenizer, hf_tok, add_generation_prompt: bool) -> None:
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}, *MESSAGES]):
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_default_system_message(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_jinja_environment_matches_transformers(tmp_path: Path, tok_dir: Path, hf_tok) -> None:
    """tojson without HTML escaping, loop controls, trim/lstrip blocks and undefined bos like transformers."""
    template = (
        "{% for m in messages %}\n"
        "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "{{ m | tojson }}|{{ {'a': '<b>&'} | tojson(indent=1) }}|{{ bos_token }}|{{ eos_token }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}GO{% endif %}"
    )
    model_dir = _copy_dir(tok_dir, tmp_path / "custom", drop=("chat_template.jinja",))
    _edit_config(model_dir, chat_template=template)
    transformers = pytest.importorskip("transformers")
    hf_custom = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "system", "content": "s"}, *MESSAGES]
    expected = hf_custom.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_dir(model_dir).apply_chat_template(messages) == expected
    assert "<b>&" in expected


# ---- directory variants ------------------------------------------------------------------------


def test_v4_style_template_in_tokenizer_config(tmp_path: Path, tok_dir: Path) -> None:
    model_dir = _copy_dir(tok_dir, tmp_path / "v4", drop=("chat_template.jinja",))
    assert Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES) == Tokenizer.from_dir(
        tok_dir
    ).apply_chat_template(MESSAGES)


def test_v4_style_template_list_takes_default(tmp_path: Path, tok_dir: Path) -> None:
    model_dir = _copy_dir(tok_dir, tmp_path / "v4list", drop=("chat_template.jinja",))
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    _edit_config(model_dir, chat_template=templates)
    assert Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES) == "DEFAULT"
    _edit_config(model_dir, chat_template=templates[:1])
    with pytest.raises(TokenizerError, match="default"):
        Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES)


def test_v5_style_template_file_wins(tmp_path: Path, tok_dir: Path) -> None:
    model_dir = _copy_dir(tok_dir, tmp_path / "v5")
    _edit_config(model_dir, chat_template=None)
    assert Tokenizer.from_dir(model_dir).chat_template == CHATML_TEMPLATE
    (model_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    _edit_config(model_dir, chat_template="from config")
    assert Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES) == MESSAGES[0]["content"] + "!"


def test_fallback_chatml_without_template(tmp_path: Path, tok_dir: Path) -> None:
    model_dir = _copy_dir(tok_dir, tmp_path / "bare", drop=("chat_template.jinja", "tokenizer_config.json"))
    bare = Tokenizer.from_dir(model_dir)
    assert bare.chat_template is None
    assert bare.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert bare.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )
    # Without tokenizer_config.json eos falls back to a conventional token present in the vocabulary.
    assert bare.eos_token == "<|endoftext|>" and bare.stop_token_ids == {0, 2}


def test_qwen_instruct_style_config(tmp_path: Path, tok_dir: Path) -> None:
    """Dict-valued special tokens and generation_config stop ids, as in Qwen2-Instruct checkpoints."""
    model_dir = _copy_dir(tok_dir, tmp_path / "instruct")
    _edit_config(model_dir, eos_token={"content": "<|im_end|>", "special": True}, pad_token="<|endoftext|>")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
    inst = Tokenizer.from_dir(model_dir)
    assert inst.eos_token == "<|im_end|>" and inst.eos_token_id == 2
    assert inst.pad_token_id == 0
    assert inst.stop_token_ids == {0, 2}
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}), encoding="utf-8")
    assert Tokenizer.from_dir(model_dir).stop_token_ids == {0, 2}


# ---- errors ------------------------------------------------------------------------------------


def test_missing_tokenizer_json_names_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_malformed_files_name_the_file(tmp_path: Path, tok_dir: Path) -> None:
    model_dir = _copy_dir(tok_dir, tmp_path / "broken")
    (model_dir / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*<\|nope\|>"):
        Tokenizer.from_dir(model_dir)
    (model_dir / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"generation_config\.json.*eos_token_id"):
        Tokenizer.from_dir(model_dir)
    (model_dir / "tokenizer.json").write_text("[]", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(model_dir)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [("user", "hi")],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": 1, "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    ],
)
def test_bad_messages(tok: Tokenizer, messages: object) -> None:
    with pytest.raises(TokenizerError, match="messages"):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_errors_become_tokenizer_errors(tmp_path: Path, tok_dir: Path) -> None:
    model_dir = _copy_dir(tok_dir, tmp_path / "raising")
    (model_dir / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES)
    (model_dir / "chat_template.jinja").write_text("{% for %}", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja"):
        Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES)
