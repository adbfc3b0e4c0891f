"""A ``tokenizers.Tokenizer`` rebuilt from a GGUF file's metadata.

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``),
per-token types and scores, the BPE merges where there are any, the special token ids and the chat
template as metadata. This module turns those back into the tokenizer the model was trained with, the
way transformers' GGUF loader does (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so
ids agree with ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (SmolLM2, Llama 3, Qwen). Tokens are spelled in
  GPT-2's byte alphabet; merges come from the file; the pre-tokenizer regex from ``tokenizer.ggml.pre``.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral,
  Gemma). The file lists no merges, so they are rebuilt from the vocabulary: every split of a token into
  two tokens is a merge, ranked by the merged token's score. Gemma differs in three ways (see
  ``_gemma``): spaces are ``▁`` by normalizer, not by a Metaspace prefix; runs of spaces are stored as
  real spaces; and the rank is the token's position in the file, not its score.

Token types (llama.cpp ``llama_token_type``): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte. Control tokens become special added tokens (skipped by ``decode(skip_special_tokens=True)``),
user-defined ones plain added tokens; both are matched whole in text before the model sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError

CONTROL, USER_DEFINED = 3, 4
SUPPORTED_MODELS = ("gpt2", "llama")

# Pre-tokenizer regexes by ``tokenizer.ggml.pre`` (the names llama.cpp's convert_hf_to_gguf.py writes).
# Same patterns as transformers' GGUF_PRE_TOKENIZER_SPLITS; each is applied with behaviour "isolated"
# followed by a regex-free ByteLevel step.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
# llama.cpp splits every digit on its own before the GPT-2 regex for these (llama-vocab.cpp: "\p{N}" then
# the GPT-2 pattern); the HF tokenizer.json of these models says the same with a Digits pre-tokenizer.
# transformers' GGUF loader (5.23) does not map them and falls back to plain GPT-2 splitting, which
# differs where whitespace precedes a digit ("x  1": "ĠĠ","1" here and in the original tokenizer,
# "Ġ","Ġ","1" there). We follow the model's own tokenizer.
DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})

# Turn-ending tokens llama.cpp also stops on (llama-vocab.cpp's end-of-generation heuristics), by text.
EOG_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "<|return|>", "<|call|>", "<end_of_utterance>")


@dataclass
class GGUFTokenizerSpec:
    """What a GGUF file says about its tokenizer, ready for ``llmparts.tokenizer.Tokenizer``."""

    tokenizer: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str]  # bos_token / eos_token / unk_token / pad_token (/ mask_token) -> text
    add_bos: bool
    add_eos: bool
    chat_template: str | dict[str, str] | None
    generation_config: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # tokenizer.ggml.model
    pre: str | None = None  # tokenizer.ggml.pre


def read_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The ``tokenizer.*`` and ``general.architecture`` metadata of a GGUF file as plain Python values."""
    try:  # the project's one-pass reader: ~0.3 s for a 262k vocabulary, against ~9 s for gguf.GGUFReader
        from .gguf_format import GGUFContainer
    except ImportError:  # pragma: no cover - fallback when that module is absent
        GGUFContainer = None
    try:
        if GGUFContainer is not None:
            fields = GGUFContainer(path).fields
        else:  # pragma: no cover
            from gguf import GGUFReader

            reader = GGUFReader(path)
            fields = {k: f.contents() for k, f in reader.fields.items()
                      if k.startswith("tokenizer.") or k == "general.architecture"}
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read GGUF metadata ({type(e).__name__}: {e})") from None
    return {k: v for k, v in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def merges_from_scores(tokens: list[str], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens.

    Ranked by the merged token's score (best first), then by longer left part; ties keep the order of
    ``scores`` (Python's sort is stable under ``reverse=True``). Same ranking as transformers'
    ``generate_merges(vocab, vocab_scores)``, which the reference tokenizer is built with.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, score in scores.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((score, k, len(piece) - k, left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(m[3], m[4]) for m in found]


def _byte_level(meta: dict[str, Any]):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (a few files store raw text) are respelled byte by byte.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError("GGUF byte-level BPE tokenizer (tokenizer.ggml.model = 'gpt2') has no "
                              "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre")
    if pre in PRE_TOKENIZER_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:  # "gpt2", "default" and names without a known regex: GPT-2's own (as transformers does)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(meta: dict[str, Any]):
    """Llama-2 / Mistral style: Metaspace adds ``▁`` to the start of the text; byte fallback."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError("GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor "
                                  "tokenizer.ggml.scores to rebuild merges from")
        merges = merges_from_scores(tokens, dict(zip(tokens, scores)))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return tok, None


def _gemma(meta: dict[str, Any]):
    """Gemma 1/2/3: spaces become ``▁`` by a normalizer (no prefix space, nothing stripped on decode).

    Two quirks of Gemma GGUF files: a token of two or more spaces is stored as real spaces ("  ") while
    the text it matches is spelled "▁▁" after normalization, so such tokens are respelled; and the scores
    do not follow the merge order while the file order does, so merges are ranked by position.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = merges_from_scores(tokens, {t: -i for i, t in enumerate(tokens)})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
                        byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, None


GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def build_gguf_tokenizer(path: str | Path) -> GGUFTokenizerSpec:
    """Read ``path``'s tokenizer metadata and build the tokenizer it describes."""
    from tokenizers import AddedToken, processors

    meta = read_tokenizer_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model / tokens metadata)")
    arch = meta.get("general.architecture", "")
    for key, kinds in (("tokens", (str,)), ("merges", (str,)), ("token_type", (int,)), ("scores", (int, float))):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is None:
            continue
        bad = values if not isinstance(values, list) else next(
            (v for v in values if not isinstance(v, kinds) or isinstance(v, bool)), None)
        if bad is not None:
            raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.{key} must be an array of "
                                  f"{' or '.join(k.__name__ for k in kinds)} values, got {bad!r}"[:300])
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id",
                "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
            raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.{key} must be an integer, got {i!r}")
    builders = {"gpt2": _byte_level, "llama": _gemma if arch in GEMMA_ARCHITECTURES else _sentencepiece}
    if not isinstance(model, str) or model not in builders:
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer.ggml.model = {model!r} is not supported; supported: {list(SUPPORTED_MODELS)} "
            "(convert the model with its Hugging Face tokenizer files instead)")
    try:
        tok, alphabet = builders[model](meta)
    except BaseException as e:  # (the tokenizers library raises a bare Exception, or a Rust panic, which is a
        if isinstance(e, (KeyboardInterrupt, SystemExit)):  # BaseException, for an inconsistent vocabulary)
            raise
        raise CheckpointError(f"{path}: the GGUF tokenizer metadata does not make a {model!r} tokenizer "
                              f"({type(e).__name__}: {e})") from None

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    # Control tokens -> special added tokens. In a byte-level vocabulary a "control" token written outside
    # the byte alphabet is a converter mislabel and is left alone (as transformers does).
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    # User-defined tokens (Gemma's "\n\n", "<table>", ...) are matched whole but are not special.
    known = tok.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in known]
    if user:
        tok.add_tokens(user)

    def token_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {name: token_at(key) for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                      ("unk_token", "unknown_token_id"),
                                                      ("pad_token", "padding_token_id"))}
    if arch in GEMMA_ARCHITECTURES and "<mask>" in known:
        special["mask_token"] = "<mask>"  # GemmaTokenizer's default; chat templates see it as `mask_token`
    special = {k: v for k, v in special.items() if v is not None}
    present = {a.content for a in tok.get_added_tokens_decoder().values()}
    missing = [AddedToken(v, special=True, normalized=False) for v in dict.fromkeys(special.values())
               if v not in present]
    if missing:  # e.g. an <unk> typed "unknown", not "control": named special tokens are always special
        tok.add_special_tokens(missing)

    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    add_bos = add_bos and "bos_token" in special
    add_eos = add_eos and "eos_token" in special
    if add_bos or add_eos:
        bos, eos = special.get("bos_token"), special.get("eos_token")
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        pairs = ([(bos, tok.token_to_id(bos))] if add_bos else []) + (
            [(eos, tok.token_to_id(eos))] if add_eos and eos != bos else [])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)

    chat_template: str | dict[str, str] | None = meta.get("tokenizer.chat_template")
    named = {k.removeprefix("tokenizer.chat_template."): v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    if named:
        chat_template = {**({"default": chat_template} if chat_template else {}), **named}

    stop = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and i not in stop:
            stop.append(int(i))
    for text in EOG_TOKENS:
        i = tok.token_to_id(text)
        if i is not None and i not in stop and (not types or i < len(types) and types[i] == CONTROL):
            stop.append(i)
    gen: dict[str, Any] = {}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        gen["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if stop:
        gen["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        gen["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return GGUFTokenizerSpec(tok, special, add_bos, add_eos, chat_template, gen, model,
                             meta.get("tokenizer.ggml.pre"))
