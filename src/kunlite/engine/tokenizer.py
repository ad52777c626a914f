"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) and its chat template,
without transformers: the `tokenizers` library encodes and decodes, jinja2 renders.

HF conventions that are kept on purpose:
- BOS/EOS at encode time: an explicit `add_bos_token` / `add_eos_token` in tokenizer_config
  wins (transformers 4's LlamaTokenizerFast); otherwise tokenizer.json's post_processor decides
  (Llama 3 adds <|begin_of_text|>, SmolLM2 and Qwen2 add nothing).
- The chat template runs in jinja2's ImmutableSandboxedEnvironment with trim_blocks and
  lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the
  loop controls and `{% generation %}` tags, and the special tokens (bos_token, eos_token, ...)
  as variables. Message keys whose value is None are dropped, as transformers does.
- `vocab_size` counts the added tokens too (HF's len(tokenizer)).
Not kept: `clean_up_tokenization_spaces` (vLLM ignores it as well), so that decode() is
exactly what incremental detokenization produces.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config is a string, an AddedToken dict, or null."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged (HF uses it to mark
    assistant tokens for training masks; serving only needs the text)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat template does not compile: {e}") from e


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages with None values dropped and list content joined into a string."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
        msg = {k: v for k, v in message.items() if v is not None}
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content: content parts of type {kind!r} are not supported")
                texts.append(part["text"])
            msg["content"] = "\n".join(texts)  # vLLM's "string" content format
        out.append(msg)
    return out


class Tokenizer:
    def __init__(self, backend: _Backend, *, special_tokens: Mapping[str, str] | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None,
                 chat_templates: Mapping[str, str] | None = None,
                 generation_eos_token_ids: Sequence[int] = ()) -> None:
        """`special_tokens`: bos_token, eos_token, ... as strings. `add_bos_token` /
        `add_eos_token`: None leaves it to the backend's post_processor. `chat_templates`:
        by name ("default", "tool_use", ...)."""
        self._tok = backend
        # without offsets, when the backend has it (tokenizers >= 0.21): a third faster
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._special_tokens = dict(special_tokens or {})
        self._add_bos, self._add_eos = add_bos_token, add_eos_token
        self._templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}
        self.bos_token_id = self._id_of(self._special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self._special_tokens.get("eos_token"))
        eos = set(generation_eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        named = {self._id_of(t) for t in self._special_tokens.values()} - {None}
        added = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids: frozenset[int] = frozenset(added | named)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise ValueError(f"{root} has no tokenizer.json")
        backend = _Backend.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        special: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key, special_map.get(key)))
            if content is not None:
                special[key] = content
        _add_missing_tokens(backend, config.get("added_tokens_decoder") or {})

        templates: dict[str, str] = {}
        configured = config.get("chat_template")
        if isinstance(configured, str):
            templates["default"] = configured
        elif isinstance(configured, list):  # [{"name": ..., "template": ...}]
            templates.update({t["name"]: t["template"] for t in configured
                              if isinstance(t, Mapping) and "name" in t and "template" in t})
        processor_template = _read_json(root / "chat_template.json").get("chat_template")
        if not templates and isinstance(processor_template, str):
            templates["default"] = processor_template
        # Separate template files take priority over tokenizer_config, as in transformers.
        if (root / "chat_template.jinja").is_file():
            templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
        for extra in sorted((root / "additional_chat_templates").glob("*.jinja")):
            templates[extra.stem] = extra.read_text(encoding="utf-8")

        generation_eos = _read_json(root / "generation_config.json").get("eos_token_id")
        eos_ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        return cls(backend, special_tokens=special, add_bos_token=_opt_bool(config.get("add_bos_token")),
                   add_eos_token=_opt_bool(config.get("add_eos_token")), chat_templates=templates,
                   generation_eos_token_ids=[i for i in eos_ids if isinstance(i, int)])

    # ------------------------------------------------------------------ tokens

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(text) starts with BOS (the model's own convention)."""
        ids = self.encode("x")
        return self.bos_token_id is not None and bool(ids) and ids[0] == self.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; ValueError for text that is not valid Unicode (lone surrogates).
        Releases the GIL while it runs: the backend's batch call does, its single one does not."""
        explicit = self._add_bos is not None or self._add_eos is not None
        try:
            if not add_special_tokens or not explicit:
                return self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            ids = self._encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError as e:  # the backend's answer to a str it cannot encode as UTF-8
            raise ValueError(f"text cannot be tokenized: {e}") from e
        if self._add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if self._add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        tokens = [self._tok.id_to_token(i) for i in ids]
        if any(t is None for t in tokens):
            raise ValueError(f"token ids must be below the vocabulary size {self.vocab_size}")
        return tokens  # type: ignore[return-value]

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ------------------------------------------------------------------ chat

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render the conversation to a prompt string. Any error the template raises, or that bad
        messages cause inside it, becomes a ValueError carrying the template's message.
        `kwargs` reach the template as variables (e.g. enable_thinking)."""
        template = self._template(tools)
        variables = {**self._special_tokens, **kwargs}
        try:
            return template.render(messages=_plain_messages(messages), tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            raise ValueError(e.message or str(e)) from e
        except ValueError:
            raise
        except Exception as e:  # the template did something the messages' types do not allow
            raise ValueError(f"chat template error: {type(e).__name__}: {e}") from e

    def _template(self, tools: list[dict[str, Any]] | None) -> jinja2.Template:
        if not self._templates:
            raise ValueError("this model has no chat template")
        if tools is not None and "tool_use" in self._templates:
            name = "tool_use"
        elif "default" in self._templates:
            name = "default"
        elif len(self._templates) == 1:
            name = next(iter(self._templates))
        else:
            raise ValueError(f"this model has several chat templates and no default: {sorted(self._templates)}")
        if name not in self._compiled:
            self._compiled[name] = _compile_template(self._templates[name])
        return self._compiled[name]


def _opt_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _add_missing_tokens(backend: _Backend, added_tokens_decoder: Mapping[str, Any]) -> None:
    """Add tokenizer_config's added tokens that tokenizer.json lacks, when their id is the next
    free one (so that ids agree with the config); others are left alone."""
    numbered = sorted(((int(k), v) for k, v in added_tokens_decoder.items()
                       if str(k).isdigit() and isinstance(v, Mapping)), key=lambda kv: kv[0])
    for token_id, entry in numbered:
        content = _token_content(entry)
        if content is None or backend.token_to_id(content) is not None:
            continue
        if token_id != backend.get_vocab_size(with_added_tokens=True):
            continue
        special = bool(entry.get("special", False))
        token = AddedToken(content, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
