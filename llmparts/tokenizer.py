"""Tokenizer and chat-template layer: text <-> ids, and conversations -> prompt text.

``Tokenizer.from_pretrained(source)`` reads one of

* a Hugging Face directory with ``tokenizer.json`` (run by the ``tokenizers`` library, exactly as
  serialized: its post-processor decides BOS/EOS, as in transformers 5, which ignores
  ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json when a tokenizer.json exists);
* a directory with only a SentencePiece ``tokenizer.model`` (run by ``sentencepiece``; BOS/EOS from
  ``add_bos_token`` / ``add_eos_token``; added and special tokens are matched whole in the text first);
* a ``.gguf`` file (tokenizer rebuilt from metadata, see ``loading/gguf_tokenizer.py``);
* a Hub repo id (resolved to a local snapshot by ``loading.hub.resolve_source``).

Ids and decoded text are meant to equal ``transformers.AutoTokenizer`` on the same files, and
``apply_chat_template`` renders with the same jinja2 environment as transformers'
``apply_chat_template`` (``utils/chat_template_utils.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, InputError, ModelNotFoundError

# Named special tokens transformers exposes to chat templates (``special_tokens_map``), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read ``reasoning_content`` (gpt-oss: ``thinking``).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # (also bytes that are not UTF-8, nesting past the parser's depth)
        raise ConfigError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None


def _content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# ------------------------------------------------------------------------------------ backends
class _HFBackend:
    """A ``tokenizers.Tokenizer`` (tokenizer.json or rebuilt from GGUF metadata)."""

    def __init__(self, tok: Any, cleanup: bool = False) -> None:
        self.tok = tok
        # transformers applies clean_up_tokenization_spaces only to non-BPE models (it corrupts BPE text)
        self.cleanup = cleanup and type(tok.model).__name__ != "BPE"

    def add_special(self, tokens: list[str]) -> None:
        from tokenizers import AddedToken

        present = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        new = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t not in present]
        if new:
            self.tok.add_special_tokens(new)

    def add_from_config(self, decoder: Mapping[str, Any]) -> None:
        """tokenizer_config.json ``added_tokens_decoder`` entries missing from tokenizer.json."""
        from tokenizers import AddedToken

        present = {t.content: t for t in self.tok.get_added_tokens_decoder().values()}
        for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if not isinstance(spec, Mapping) or not isinstance(spec.get("content"), str):
                continue
            flags = {k: bool(spec[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
            old = present.get(spec["content"])
            if old is None:
                self.tok.add_tokens([AddedToken(spec["content"], **flags)])
            elif flags.get("special") and not old.special:  # the config's flag wins, as in transformers
                self.tok.add_special_tokens([AddedToken(spec["content"], **{**flags, "normalized": old.normalized})])

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.cleanup else text

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def save(self, directory: Path) -> dict[str, Any]:
        self.tok.save(str(directory / "tokenizer.json"))
        return {"tokenizer_class": "PreTrainedTokenizerFast"}


def _clean_up_tokenization(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_fields(buf: bytes) -> list[tuple[int, int, bytes, int | None]]:
    """Top-level protobuf fields as (number, wire type, raw bytes incl. key, varint value or None)."""
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value = None
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ConfigError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        out.append((number, wire, buf[start:pos], value))
    return out


def _user_defined_ids(model: bytes) -> list[int]:
    """Ids of the USER_DEFINED pieces of a SentencePiece ModelProto (field 1: pieces, in id order; a
    piece's field 3 is its type, 4 = USER_DEFINED)."""
    ids = []
    for i, (_, _, raw, _) in enumerate(f for f in _proto_fields(model) if f[0] == 1 and f[1] == 2):
        _, body = _varint(raw, 0)
        n, body = _varint(raw, body)
        if any(number == 3 and value == 4 for number, _, _, value in _proto_fields(raw[body:body + n])):
            ids.append(i)
    return ids


def _without_dummy_prefix(model: bytes) -> tuple[bytes, bool]:
    """(the SentencePiece ModelProto with ``normalizer_spec.add_dummy_prefix = false``, the original flag).

    Text that follows an added token is encoded without the leading "▁" SentencePiece would add to the
    start of a text (transformers' Metaspace ``prepend_scheme="first"``). ModelProto field 3 is the
    NormalizerSpec, whose field 3 is add_dummy_prefix (default true); protobuf is not a dependency, so
    the two fields are rewritten here by hand.
    """
    out, had_spec, original = bytearray(), False, True
    for number, wire, raw, _ in _proto_fields(model):
        if number == 3 and wire == 2:
            had_spec = True
            _, body = _varint(raw, 0)
            n, body = _varint(raw, body)
            spec = bytearray()
            for sub_number, _, sub_raw, sub_value in _proto_fields(raw[body:body + n]):
                if sub_number == 3:
                    original = bool(sub_value)
                else:
                    spec += sub_raw
            spec += b"\x18\x00"  # field 3, varint 0
            raw = b"\x1a" + _encode_varint(len(spec)) + bytes(spec)
        out += raw
    if not had_spec:
        out += b"\x1a\x02\x18\x00"
    return bytes(out), original


class _SentencePieceBackend:
    """A SentencePiece ``tokenizer.model`` plus the added tokens transformers would match first."""

    def __init__(self, path: Path, added: list[dict[str, Any]], prepend: str = "first",
                 split_special: bool = False) -> None:
        import sentencepiece as spm

        self.prepend = prepend  # transformers' Metaspace prepend_scheme: "first", "always" or "never"
        self.split_special = split_special  # split_special_tokens: special tokens in text are plain text

        raw = path.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=raw)
            rest, self.dummy_prefix = _without_dummy_prefix(raw)
            self.sp_rest = spm.SentencePieceProcessor(model_proto=rest)
        except (RuntimeError, IndexError, OSError) as e:
            raise ConfigError(f"{path}: not a valid SentencePiece model ({e})") from None
        self.path = path
        n = self.sp.get_piece_size()
        # id -> {content, special, lstrip, rstrip}; pieces already in the model keep their ids.
        self.added: dict[int, dict[str, Any]] = {}
        for spec in added:
            content = spec["content"]
            i = spec.get("id")
            if i is None:
                i = self.sp.piece_to_id(content) if self._is_piece(content) else max([n - 1, *self.added]) + 1
            self.added[int(i)] = {"content": content, "special": bool(spec.get("special", True)),
                                  "lstrip": bool(spec.get("lstrip")), "rstrip": bool(spec.get("rstrip"))}
        for i in range(n):  # control pieces (<s>, </s>) are special added tokens in transformers too
            if self.sp.is_control(i) and i not in self.added:
                self.added[i] = {"content": self.sp.id_to_piece(i), "special": True, "lstrip": False, "rstrip": False}
        for i in _user_defined_ids(raw):  # matched whole before SentencePiece runs, as transformers does
            if i not in self.added:
                self.added[i] = {"content": self.sp.id_to_piece(i), "special": False, "lstrip": False, "rstrip": False}
        self._ids = {v["content"]: i for i, v in self.added.items()}
        self._compile()

    def _is_piece(self, content: str) -> bool:
        return self.sp.id_to_piece(self.sp.piece_to_id(content)) == content

    def _compile(self) -> None:
        """One regex over every added token, longest first (the leftmost-longest match of tokenizers'
        AddedVocabulary); ``lstrip`` / ``rstrip`` tokens also swallow the whitespace beside them."""
        order = sorted(((i, v) for i, v in self.added.items() if not (self.split_special and v["special"])),
                       key=lambda kv: -len(kv[1]["content"]))
        self._group_ids = [i for i, _ in order]
        alts = [("\\s*" if v["lstrip"] else "") + "(" + re.escape(v["content"]) + ")" + ("\\s*" if v["rstrip"] else "")
                for _, v in order]
        self._split = re.compile("|".join(alts)) if alts else None

    def add_special(self, tokens: list[str]) -> None:
        for t in dict.fromkeys(tokens):
            if t in self._ids:
                continue
            i = self.sp.piece_to_id(t) if self._is_piece(t) else self.vocab_size
            self.added[i] = {"content": t, "special": True, "lstrip": False, "rstrip": False}
            self._ids[t] = i
        self._compile()

    def _encode_piece(self, text: str, first: bool) -> list[int]:
        # transformers' Metaspace(prepend_scheme="first"): the "▁" SentencePiece adds in front goes only on
        # text at the very start, and not when that text already starts with a space. (Plain sentencepiece
        # would encode " the" as "▁▁the"; transformers, and so this, as "▁the".)
        # legacy=true in tokenizer_config.json: every piece between added tokens gets it ("always");
        # add_prefix_space=false: none does ("never")
        prefix = (self.prepend == "always" or (first and self.prepend == "first")) and not text.startswith((" ", "▁"))
        return (self.sp if prefix else self.sp_rest).encode(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self._split.finditer(text) if self._split else ():
            if m.start() > pos:
                ids += self._encode_piece(text[pos:m.start()], pos == 0)
            ids.append(self._group_ids[m.lastindex - 1])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_piece(text[pos:], pos == 0)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """transformers' decoder chain for SentencePiece BPE: "▁" -> " ", byte pieces fused as UTF-8
        (U+FFFD per byte when invalid), one leading space stripped when the model adds a dummy prefix."""
        parts: list[str] = []
        pending = bytearray()

        def flush() -> None:
            if pending:
                try:
                    parts.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * len(pending))
                pending.clear()

        n = self.sp.get_piece_size()
        for i in ids:
            if i in self.added or not 0 <= i < n or self.sp.is_control(i) or self.sp.is_unknown(i):
                spec = self.added.get(i)
                if spec is None and not 0 <= i < n:
                    continue  # an id the tokenizer does not have decodes to nothing
                special = spec["special"] if spec else True
                if skip_special_tokens and special:
                    continue
                flush()
                parts.append(spec["content"] if spec else self.sp.id_to_piece(i))
            elif self.sp.is_byte(i):
                pending.append(int(self.sp.id_to_piece(i)[3:5], 16))  # "<0xNN>"
            else:
                flush()
                parts.append(self.sp.id_to_piece(i).replace("▁", " "))
        flush()
        text = "".join(parts)
        return text[1:] if self.dummy_prefix and self.prepend != "never" and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if token in self._ids:
            return self._ids[token]
        return self.sp.piece_to_id(token) if self._is_piece(token) else None

    def id_to_token(self, i: int) -> str | None:
        if i in self.added:
            return self.added[i]["content"]
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    @property
    def vocab_size(self) -> int:
        return max([self.sp.get_piece_size() - 1, *self.added]) + 1

    @property
    def special_ids(self) -> set[int]:
        n = self.sp.get_piece_size()
        own = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        return own | {i for i, v in self.added.items() if v["special"]}

    def save(self, directory: Path) -> dict[str, Any]:
        (directory / "tokenizer.model").write_bytes(self.path.read_bytes())
        decoder = {str(i): {"content": v["content"], "lstrip": v["lstrip"], "normalized": False,
                            "rstrip": v["rstrip"], "single_word": False, "special": v["special"]}
                   for i, v in sorted(self.added.items())}
        return {"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": decoder}


# ------------------------------------------------------------------------------------ chat templates
@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> Any:
    """A jinja2 template compiled in transformers' chat-template environment.

    Sandboxed and immutable; ``trim_blocks`` and ``lstrip_blocks``; the ``{% generation %}`` tag (its
    AssistantTracker, here without the index tracking) and loop controls (``break``/``continue``);
    ``tojson`` that does not escape HTML (``ensure_ascii=False``); ``raise_exception`` and
    ``strftime_now`` globals; ``dict`` and ``namespace`` restricted as transformers restricts them.
    """
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation(self, context: Any, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(format)

    class TemplateDict:  # `dict(...)` without attribute access to the real type
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # rejects underscore attributes
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: {e} (line {e.lineno})") from None


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (as transformers does); anything else -> "<Type>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    for base in (str, int, float):  # subclasses (str enums) by their value, not their __str__
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, appended to the text to continue


def _mark_final_message(chat: list[dict[str, Any]], field: str, template: str) -> str:
    """Append :data:`_CONTINUE_TAG` to the final message's ``field`` (every alias of a reasoning field;
    the last text part of list content) so that the rendered text can be cut right after it, as
    transformers does for ``continue_final_message``; returns the text before marking."""
    what = f"continue_final_message={field!r}" if field != "content" else "continue_final_message=True"
    final = chat[-1].get(field)
    if final is None:
        raise InputError(f"{what}: the final message has no {field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:  # copied under several names: mark every copy, accept whichever the template reads
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise InputError(f"{what}: the chat template never reads the messages' {field!r}")
    last = dict(chat[-1])
    if isinstance(final, (list, tuple)):
        parts = [dict(p) if isinstance(p, Mapping) else p for p in final]
        for part in reversed(parts):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                final, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
                break
        else:
            raise InputError(f"{what}: the final message has no text part to continue")
        last[field] = parts
    elif isinstance(final, str):
        for f in fields:
            last[f] = last[f] + _CONTINUE_TAG
    else:
        raise InputError(f"{what}: the final message's {field!r} must be text, got {type(final).__name__}")
    chat[-1] = last
    return final


def _cut_at_mark(text: str, final: str) -> str:
    """``text`` up to where :func:`_mark_final_message`'s marker was rendered (spacing a template trims
    after the marker is trimmed before it too, as transformers does)."""
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise InputError("continue_final_message: the final message does not appear in the rendered chat "
                         "(the template changes or drops it)")
    at = text.rindex(_CONTINUE_TAG.strip())
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# ------------------------------------------------------------------------------------ Tokenizer
class Tokenizer:
    """Encode/decode text and render chat templates, matching transformers on the same files.

    Attributes: ``vocab_size`` (ids it can decode, added tokens included), ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``, ``eos_token_ids`` (every stop id: generation_config.json's
    ``eos_token_id`` and the tokenizer's eos), ``chat_template``, ``generation_config``, ``special_ids``.
    """

    def __init__(self, backend: Any, special_tokens: Mapping[str, str] | None = None,
                 chat_template: str | Mapping[str, str] | None = None,
                 generation_config: Mapping[str, Any] | None = None, name_or_path: str = "") -> None:
        self._backend = backend
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        backend.add_special(list(self.special_tokens.values()))  # named special tokens always exist
        self._templates: dict[str, str] = ({"default": chat_template} if isinstance(chat_template, str)
                                           else dict(chat_template or {}))
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        self.name_or_path = name_or_path

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, source: str | os.PathLike[str]) -> Tokenizer:
        """From a local HF directory, a ``.gguf`` file or a Hub repo id."""
        from .loading.hub import resolve_source

        path = resolve_source(source)
        if path.is_file():
            if path.suffix == ".gguf":
                return cls.from_gguf(path)
            raise ModelNotFoundError(f"{path}: expected a model directory or a .gguf file")
        return cls._from_directory(path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From the tokenizer metadata of a GGUF file."""
        from .loading.gguf_tokenizer import build_gguf_tokenizer

        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such GGUF file")
        spec = build_gguf_tokenizer(path)
        return cls(_HFBackend(spec.tokenizer), spec.special_tokens, spec.chat_template, spec.generation_config,
                   str(path))

    @classmethod
    def _from_directory(cls, path: Path) -> Tokenizer:
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        if not isinstance(config, dict):
            raise ConfigError(f"{path / 'tokenizer_config.json'}: expected a JSON object")
        legacy_map = path / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and legacy_map.is_file():
            config = {**config, **_read_json(legacy_map)}  # the map's named tokens win, as in transformers
        special = {}
        for key, value in config.items():  # bos/eos/... plus model-specific ones (Gemma3's boi_token)
            if key.endswith("_token") and _content(value) is not None:
                special[key] = _content(value)
        extra = config.get("extra_special_tokens") or {}  # transformers 5: named (dict) or anonymous (list)
        if isinstance(extra, Mapping):
            special.update({str(k): _content(v) for k, v in extra.items() if _content(v) is not None})
            extra = []
        extra_special = [_content(v) for v in extra if _content(v) is not None] if isinstance(extra, list) else []
        added_decoder = config.get("added_tokens_decoder") or {}

        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ConfigError(f"{path / 'tokenizer.json'}: cannot be loaded by tokenizers ({e})") from None
            backend: Any = _HFBackend(tok, cleanup=bool(config.get("clean_up_tokenization_spaces", False)))
            backend.add_from_config(added_decoder)
            tok.encode_special_tokens = config.get("split_special_tokens") is True  # special tokens as plain text
        elif (path / "tokenizer.model").is_file():
            added = [{"id": int(i), **v} for i, v in added_decoder.items() if isinstance(v, Mapping)]
            if not added and (path / "added_tokens.json").is_file():
                names = set(special.values())
                added = [{"id": i, "content": t, "special": t in names}
                         for t, i in _read_json(path / "added_tokens.json").items()]
            prepend = ("never" if config.get("add_prefix_space") is False
                       else "always" if config.get("legacy") is True else "first")  # (LlamaTokenizer's rule)
            backend = _SentencePieceBackend(path / "tokenizer.model", added, prepend,
                                            split_special=config.get("split_special_tokens") is True)
            sp = backend.sp  # like transformers, take bos/eos/unk from the model when the config has none
            for name, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
                if name not in special and i >= 0:
                    special[name] = sp.id_to_piece(i)
            backend = _WithBosEos(backend, config.get("add_bos_token", False), config.get("add_eos_token", False),
                                  special.get("bos_token"), special.get("eos_token"))
        else:
            extra = (" (vocab.json + merges.txt without tokenizer.json is not supported: save the tokenizer with "
                     "transformers' save_pretrained to get a tokenizer.json)") if (path / "vocab.json").is_file() else ""
            raise ModelNotFoundError(
                f"{path}: no tokenizer found; expected tokenizer.json (Hugging Face tokenizers) or tokenizer.model "
                f"(SentencePiece) in the directory, or pass a .gguf file{extra}")

        template: str | dict[str, str] | None = None
        raw = config.get("chat_template")
        if isinstance(raw, str):
            template = raw
        elif isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in raw if isinstance(t, Mapping)}
        if (path / "chat_template.jinja").is_file():  # template files take priority over the config
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        if (path / "chat_templates").is_dir():
            named = {p.stem: p.read_text(encoding="utf-8") for p in sorted((path / "chat_templates").glob("*.jinja"))}
            if named:
                base = {"default": template} if isinstance(template, str) else dict(template or {})
                template = {**base, **named}

        if extra_special:
            backend.add_special(extra_special)
        gen = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        if gen:
            from .loading import checked_token_ids

            checked_token_ids(gen, path / "generation_config.json")
        return cls(backend, special, template, gen, str(path))

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer adds (e.g. BOS)."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); ``skip_special_tokens`` drops control tokens."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise InputError(f"decode expects one sequence (a 1-D tensor), got shape {tuple(ids.shape)}")
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config.json's ``eos_token_id`` (int or list), then the tokenizer's eos if not in it."""
        raw = self.generation_config.get("eos_token_id")
        ids = [int(i) for i in (raw if isinstance(raw, (list, tuple)) else [raw]) if i is not None]
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        return ids

    @property
    def special_ids(self) -> set[int]:
        named = {self.token_to_id(t) for t in self.special_tokens.values()}
        return (self._backend.special_ids | named) - {None}

    # ---------------------------------------------------------------- chat
    @property
    def chat_template(self) -> str | None:
        """The default chat template (``"default"`` of several named ones), or None."""
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        return self._templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        return dict(self._templates)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **template_kwargs: Any) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        ``template_kwargs`` reach the template as variables (``enable_thinking=False`` for Qwen3); so do
        the special tokens (``bos_token``, ``eos_token``, ...), which kwargs override. ``tools`` and
        ``documents`` are passed as transformers passes them; ``chat_template=`` picks a named template or
        replaces the template. ``tokenize=True`` returns ids (no BOS added: templates write their own).
        ``continue_final_message=True`` (as in transformers) ends the text right after the last message's
        content (a field name instead, such as ``"reasoning_content"``: after that field), with no
        generation prompt, so that generation continues that message.
        """
        import jinja2

        continue_final = template_kwargs.pop("continue_final_message", False)
        if not isinstance(continue_final, (bool, str)) and continue_final is not None:
            raise InputError(f"continue_final_message must be true / false or a message field name, got "
                             f"{continue_final!r}")
        add_generation_prompt = add_generation_prompt and not continue_final
        tools = template_kwargs.pop("tools", None)
        documents = template_kwargs.pop("documents", None)
        template = self._pick_template(template_kwargs.pop("chat_template", None), tools)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("apply_chat_template needs a non-empty list of messages "
                             "([{'role': 'user', 'content': '...'}])")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise InputError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
            chat.append(_alias_reasoning(_plain({k: v for k, v in m.items() if v is not None})))
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise InputError("tools must be JSON-schema dicts")
        final = _mark_final_message(chat, continue_final if isinstance(continue_final, str) else "content",
                                    template) if continue_final else None
        context = {**self.special_tokens, **_plain(template_kwargs)}
        compiled = compile_chat_template(template)  # (a template that does not parse: ConfigError)
        try:
            text = compiled.render(
                messages=chat, tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **context)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as e:  # (data the template cannot use)
            raise InputError(f"chat template raised: {type(e).__name__}: {e}") from None
        if final is not None:
            text = _cut_at_mark(text, final)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _pick_template(self, choice: str | None, tools: Any) -> str:
        if choice is not None:
            return self._templates.get(choice, choice)
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        template = self.chat_template
        if template is None:
            where = ("GGUF metadata tokenizer.chat_template" if self.name_or_path.endswith(".gguf") else
                     "tokenizer_config.json 'chat_template', chat_template.jinja or chat_template.json")
            if self._templates:
                raise ConfigError(f"{self.name_or_path}: several chat templates {sorted(self._templates)} and no "
                                  "'default'; pass chat_template=<name>")
            raise ConfigError(
                f"{self.name_or_path or 'this tokenizer'}: no chat template (looked in {where}). Pass "
                "chat_template='<jinja template>' to apply_chat_template, add a chat_template.jinja file next to "
                "the tokenizer, or encode a raw prompt instead (llmparts generate --raw).")
        return template

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json (or tokenizer.model) and tokenizer_config.json that transformers loads."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        inner = self._backend.inner if isinstance(self._backend, _WithBosEos) else self._backend
        config: dict[str, Any] = inner.save(out)
        config.update(self.special_tokens)
        if isinstance(self._backend, _WithBosEos):
            config.update(add_bos_token=self._backend.add_bos, add_eos_token=self._backend.add_eos)
        config["clean_up_tokenization_spaces"] = False
        if len(self._templates) == 1:
            config["chat_template"] = next(iter(self._templates.values()))
        elif self._templates:  # several named templates: transformers' list form
            config["chat_template"] = [{"name": k, "template": v} for k, v in self._templates.items()]
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        return out

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_ids}, chat_template={'yes' if self.chat_template else 'no'})")


class _WithBosEos:
    """Adds BOS/EOS around a SentencePiece encoding when tokenizer_config.json asks for them."""

    def __init__(self, inner: _SentencePieceBackend, add_bos: bool, add_eos: bool, bos: str | None,
                 eos: str | None) -> None:
        self.inner = inner
        self.add_bos, self.add_eos = bool(add_bos and bos), bool(add_eos and eos)
        self.bos, self.eos = bos, eos

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.inner.encode(text)
        if add_special_tokens and self.add_bos:
            ids = [self.inner.token_to_id(self.bos), *ids]
        if add_special_tokens and self.add_eos:
            ids = [*ids, self.inner.token_to_id(self.eos)]
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
