"""Model-directory tokenizer: load and train Hugging Face style tokenizers without ``transformers``.

Training workers and the server must read the same ``tokenizer.json`` / ``tokenizer_config.json`` /
``chat_template.jinja`` files that ``transformers`` writes, but ``moe_core`` may not depend on
``transformers``. This module wraps ``tokenizers.Tokenizer`` and re-implements the small part of
``transformers`` that matters here: special-token lookup, stop ids, and chat-template rendering in the
same sandboxed Jinja environment (so prompts are byte-identical to what ``AutoTokenizer`` renders).

It also trains small Qwen2-style byte-level BPE tokenizers for the from-scratch demo and the tests,
writing a directory that ``AutoTokenizer.from_pretrained`` loads unchanged. The pipeline is exactly the one
of Qwen2's own ``tokenizer.json`` (NFC, the Qwen2 split regex with single digits, byte-level without regex),
because transformers 5 loads every ``qwen2`` directory with ``Qwen2Tokenizer``, which imposes that pipeline
whatever the file says: any other pre-tokenizer would give transformers and vLLM other ids than ours.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from moe_core.fileutil import write_text_atomic

__all__ = [
    "CHATML_TEMPLATE",
    "QWEN2_PRETOKENIZE_REGEX",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "train_bpe_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The pre-tokenization regex of Qwen2's tokenizer.json (and of transformers' Qwen2Tokenizer): GPT-4's (cl100k)
# regex, except that digits are split one by one (``\p{N}``, not ``\p{N}{1,3}``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2's byte-level steps: no prefix space, offsets untrimmed, no GPT-2 regex (the Split above does that).
_QWEN2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

# Qwen2-Instruct's template (without tool support): inserts a default system message when the
# conversation does not start with one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer directory, chat template or chat request is malformed; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# File reading helpers: every error names the file and what was expected.
# --------------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: could not read as JSON ({exc}); expected a JSON object") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_token(config: Mapping[str, Any], key: str, path: Path) -> str | None:
    """transformers stores special tokens either as plain strings or as serialized AddedToken dicts."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {key!r} must be a string, null or a dict with a string 'content', got {value!r}")


def _config_chat_templates(config: Mapping[str, Any], path: Path) -> dict[str, str]:
    """transformers v4 keeps ``chat_template`` as a string or as a list of ``{name, template}`` dicts."""
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        templates: dict[str, str] = {}
        for entry in value:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(
                    f"{path}: each 'chat_template' list entry must be a dict with string 'name' and "
                    f"'template', got {entry!r}"
                )
            templates[entry["name"]] = entry["template"]
        return templates
    raise TokenizerError(f"{path}: 'chat_template' must be a string or a list of {{name, template}} dicts")


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    """``generation_config.json`` may list several stop ids (Qwen2-Instruct: im_end and endoftext)."""
    value = _read_json_object(path).get("eos_token_id")
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: 'eos_token_id' must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _load_tokenizers_json(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise TokenizerError(f"{path}: {TOKENIZER_FILE} not found; expected a Hugging Face tokenizers JSON file")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: could not load as a Hugging Face tokenizers JSON file ({exc})") from exc
    # Saved files may carry padding/truncation settings that would silently alter encode_batch results.
    tok.no_padding()
    tok.no_truncation()
    return tok


# --------------------------------------------------------------------------------------------------
# Chat-template rendering, mirroring transformers' sandboxed environment.
# --------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers); render the body as-is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's builtin tojson HTML-escapes; templates expect plain ``json.dumps`` as transformers gives."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template string: compilation costs far more than rendering."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise TokenizerError(f"messages[{i}][{key!r}] must be a string, got {message.get(key)!r}")
        checked.append(dict(message))
    return checked


def _render_chatml(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """Fallback when a directory has no template: plain ChatML, no default system message."""
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the metadata a model directory keeps next to it."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_templates: Mapping[str, str] | None = None,
        template_source: str = "<memory>",
        config_source: str = "<memory>",
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        generation_eos_ids: Sequence[int] = (),
    ) -> None:
        self._tok = tokenizer
        self._chat_templates = dict(chat_templates or {})
        self._template_source = template_source
        self._bos_token = bos_token
        self._generation_eos_ids = tuple(generation_eos_ids)
        for name, token in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"{config_source}: {name} {token!r} is not in the tokenizer vocabulary")
        self._eos_token_id = self._resolve_eos_id(eos_token)
        self._eos_token = eos_token if eos_token is not None else self._id_to_token(self._eos_token_id)
        self._pad_token_id = tokenizer.token_to_id(pad_token) if pad_token is not None else self._eos_token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load a model directory as written by ``transformers`` v4 or v5 (or by ``train_bpe_tokenizer``)."""
        root = Path(model_dir)
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a directory; expected a model directory containing {TOKENIZER_FILE}")
        tok = _load_tokenizers_json(root / TOKENIZER_FILE)
        config_path = root / TOKENIZER_CONFIG_FILE
        config = _read_json_object(config_path) if config_path.is_file() else {}
        templates = _config_chat_templates(config, config_path)
        source = str(config_path)
        jinja_path = root / CHAT_TEMPLATE_FILE
        if jinja_path.is_file():  # transformers v5 layout; wins over tokenizer_config.json
            templates["default"] = _read_text(jinja_path)
            source = str(jinja_path)
        gen_path = root / GENERATION_CONFIG_FILE
        return cls(
            tok,
            chat_templates=templates,
            template_source=source,
            config_source=str(config_path),
            eos_token=_special_token(config, "eos_token", config_path),
            bos_token=_special_token(config, "bos_token", config_path),
            pad_token=_special_token(config, "pad_token", config_path),
            generation_eos_ids=_generation_eos_ids(gen_path) if gen_path.is_file() else (),
        )

    # ---- special tokens -------------------------------------------------------------------------

    def _resolve_eos_id(self, eos_token: str | None) -> int | None:
        """Configured eos, else generation_config's first stop id, else a conventional Qwen token."""
        if eos_token is not None:
            return self._tok.token_to_id(eos_token)
        if self._generation_eos_ids:
            return self._generation_eos_ids[0]
        for candidate in (ENDOFTEXT, IM_END):
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def _id_to_token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can emit, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def pad_token_id(self) -> int | None:
        """Padding id; models without a pad token pad with eos (padding is masked out anyway)."""
        return self._pad_token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, generation_config's eos ids, and ChatML end tokens if present."""
        ids = {i for i in (self._eos_token_id, *self._generation_eos_ids) if i is not None}
        for token in (IM_END, ENDOFTEXT):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    @property
    def chat_template(self) -> str | None:
        """The template ``apply_chat_template`` renders, or None when the ChatML fallback is used."""
        return self._chat_templates.get("default")

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (for offsets, batch options, etc.)."""
        return self._tok

    # ---- encoding ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` with no special tokens added (prompts already contain what they need)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust), no special tokens, no padding."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a sequence of str")
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` to a prompt string exactly as transformers' ``apply_chat_template`` would."""
        checked = _validate_messages(messages)
        if not self._chat_templates:
            return _render_chatml(checked, add_generation_prompt)
        source = self._chat_templates.get("default")
        if source is None:
            raise TokenizerError(
                f"{self._template_source}: no chat template named 'default' (found {sorted(self._chat_templates)})"
            )
        try:
            template = _compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(f"{self._template_source}: invalid chat template: {exc}") from exc
        context: dict[str, Any] = {"messages": checked, "add_generation_prompt": add_generation_prompt}
        # Like transformers, only tokens that are set are visible; unset ones stay jinja-undefined.
        for name, value in (("bos_token", self._bos_token), ("eos_token", self._eos_token)):
            if value is not None:
                context[name] = value
        try:
            return template.render(**context)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template from {self._template_source} rejected the messages: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: could not read as UTF-8 text ({exc})") from exc


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _added_token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _build_bpe(vocab_size: int) -> tuple[tokenizers.Tokenizer, trainers.BpeTrainer]:
    """Qwen2's pipeline: NFC, the Qwen2 split regex then byte-level, byte-level post-processing and decoding.

    Training pre-tokenizes with the same pipeline, so merges never cross a boundary the encoder keeps (no
    multi-digit tokens, no merges across a contraction).
    """
    # Empty (rather than unset) subword affixes: what Qwen2's file says; the same merges and ids either way.
    affixes = {"continuing_subword_prefix": "", "end_of_word_suffix": ""}
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False, **affixes))
    tok.normalizer = normalizers.NFC()
    byte_level = {k: v for k, v in _QWEN2_BYTE_LEVEL.items() if k != "type"}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(**byte_level),
        ]
    )
    tok.post_processor = processors.ByteLevel(**byte_level)
    tok.decoder = decoders.ByteLevel()  # options fixed in _qwen2_tokenizer_json (the binding ignores them)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        **affixes,
    )
    return tok, trainer


def _tokenizer_config(tok: tokenizers.Tokenizer, model_max_length: int) -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {**_added_token_entry(t), "special": True} for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": _added_token_entry(ENDOFTEXT),
        "pad_token": _added_token_entry(ENDOFTEXT),
    }


def _dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _qwen2_tokenizer_json(tok: tokenizers.Tokenizer) -> str:
    """The trained tokenizer as Qwen2's tokenizer.json spells it.

    ``decoders.ByteLevel`` takes no options in the Python binding and serializes GPT-2's defaults (prefix
    space, trimmed offsets, regex); byte-level decoding ignores them, but the file should say what Qwen2's says.
    """
    data = json.loads(tok.to_str())
    data["decoder"] = dict(_QWEN2_BYTE_LEVEL)
    return tokenizers.Tokenizer.from_str(json.dumps(data)).to_str(pretty=True) + "\n"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, model_max_length: int = 32768
) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on ``texts`` and write a transformers-loadable directory.

    ``vocab_size`` counts the three special tokens (ids 0-2: endoftext, im_start, im_end) and the 256
    byte symbols; with too little text the vocabulary may come out smaller. Output files are
    byte-identical for identical inputs, so cached tokenizers can be compared by hash.
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (3 special tokens + 256 bytes), got {vocab_size}")
    tok, trainer = _build_bpe(vocab_size)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / TOKENIZER_FILE, _qwen2_tokenizer_json(tok))
    write_text_atomic(out / TOKENIZER_CONFIG_FILE, _dump_json(_tokenizer_config(tok, model_max_length)))
    write_text_atomic(out / CHAT_TEMPLATE_FILE, CHATML_TEMPLATE)
    write_text_atomic(out / SPECIAL_TOKENS_MAP_FILE, _dump_json(_special_tokens_map()))
    return Tokenizer.from_dir(out)
