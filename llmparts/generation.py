"""Text generation: prefill + one cached decode step per token, samplers, stops, streaming, batches.

``generate(model, tokenizer, prompt)`` runs the prompt through the model once (the prefill, in
chunks of :data:`PREFILL_CHUNK` tokens to bound activation memory on long prompts; only the last
position's logits are computed), then feeds one token per step on a KV cache sized
``prompt_len + max_new_tokens``.

Batches of prompts of different lengths are left-padded: the pads get position -1 (never visible)
and every row counts its own positions, so a padded row decodes exactly as it would alone. Rows
that stop early keep producing the pad id and no longer take part in stopping, as in transformers.

Logit processors follow transformers' order (``GenerationMixin._get_logits_processor``):
repetition penalty (also when greedy), then — only when sampling — temperature, top-k, top-p,
min-p. Each is a small function here, tested against transformers' processor of the same name.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ContextLengthError, InputError
from .model import attention_mask_values, check_seed, check_token_ids

DEFAULT_MAX_NEW_TOKENS = 256
# generation_config.json fields generate() does not apply, with the values that mean "off" (transformers'
# defaults); any other value is reported in a warning rather than dropped without a word
UNAPPLIED_GENERATION_FIELDS = {
    "min_new_tokens": (None, 0), "min_length": (None, 0), "no_repeat_ngram_size": (None, 0),
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "bad_words_ids": (None,), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "encoder_repetition_penalty": (None, 1.0),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "sequence_bias": (None,), "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,), "penalty_alpha": (None,), "top_h": (None,),
    "num_return_sequences": (None, 1),
}
PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds activations (attention scores, MLP)


# ------------------------------------------------------------------------------- logit processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) as transformers applies it: for every token already in
    the prompt or the output (``seen``, (B, V) bool), positive logits are divided by ``penalty`` and
    negative ones multiplied, once per token however often it occurred. Left padding is not seen."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and every logit tied with the k-th); k = 0 keeps all."""
    if k <= 0:
        return logits
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most probable tokens whose cumulative
    probability reaches ``p``, at least one. Computed as transformers does, from the bottom: drop the
    least probable tokens while their cumulative probability stays <= 1 - p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1:] = False  # the most probable token always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below ``p`` times the top
    token's probability. Applied after temperature, as transformers and llama.cpp do."""
    probs = logits.softmax(dim=-1)
    drop = probs < p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling settings. ``temperature == 0`` means greedy (argmax).

    ``top_k`` 0, ``top_p`` 1.0, ``min_p`` None/0 and ``repetition_penalty`` 1.0 are no-ops.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid parameter, its value and the valid range."""
        def num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        checks = [
            ("temperature", self.temperature, num(self.temperature) and 0 <= self.temperature < math.inf,
             "a finite number >= 0 (0 or None = greedy)"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "an integer >= 0 (0 = off)"),
            ("top_p", self.top_p, num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("min_p", self.min_p, self.min_p is None or (num(self.min_p) and 0 <= self.min_p <= 1),
             "a number in [0, 1] (0 = off)"),
            ("repetition_penalty", self.repetition_penalty, num(self.repetition_penalty)
             and 0 < self.repetition_penalty < math.inf, "a finite number > 0 (1 = off)"),
        ]
        for name, value, ok, valid in checks:
            if not ok:
                raise InputError(f"{name}={value!r} is invalid: expected {valid}")

    def process(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """(B, V) float32 logits -> processed logits, in transformers' order."""
        if self.repetition_penalty != 1.0 and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if self.greedy:
            return logits  # warpers only matter when sampling (transformers skips them too)
        if self.temperature != 1.0:
            logits = apply_temperature(logits, self.temperature)
        logits = apply_top_k(logits, self.top_k)
        logits = apply_top_p(logits, self.top_p)
        if self.min_p is not None:
            logits = apply_min_p(logits, self.min_p)
        return logits

    def choose(self, logits: torch.Tensor, seen: torch.Tensor | None,
               generator: torch.Generator | None) -> torch.Tensor:
        """(B, V) logits -> (B,) next token ids."""
        logits = self.process(logits, seen)
        if self.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------- incremental text
class IncrementalDecoder:
    """Token ids in, finished text out, never splitting a character.

    Each push decodes a short window of recent ids twice (with and without the new one) and emits
    the difference, so the cost per token is constant and tokenizers that strip or merge across
    tokens (SentencePiece's leading space) still produce the right text. Text that ends in U+FFFD is
    an incomplete UTF-8 sequence (a multi-byte character split over byte tokens): it is held back
    until a later token completes it; :meth:`flush` releases whatever is left.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window (context for the next delta)
        self.read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def _delta(self, before: str, after: str) -> str:
        """The text the ids after ``read`` add. Where the decode of the window no longer begins with
        the text already emitted, the decoder rewrote it (byte fallback replaces a whole run of byte
        tokens by U+FFFD when one of them is invalid, completed characters included): then the new ids
        decoded alone, so that nothing emitted is repeated and each invalid byte gives one U+FFFD."""
        return after[len(before) :] if after.startswith(before) else self._decode(self.ids[self.read :])

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        delta = "" if after.endswith("\ufffd") else self._delta(before, after)
        if delta:
            self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        delta = self._delta(before, after)
        self.prefix = self.read = len(self.ids)
        return delta


class TextTracker:
    """Incremental text of one row, cut before the first stop string.

    ``push`` returns the text that is safe to show: complete characters, no stop string, and no
    tail that could still grow into one (that tail is held back until it can no longer match).
    The concatenation of everything returned is the row's final text.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False  # a stop string appeared
        self.closed = False  # no more text: stopped, or finish() was called

    def push(self, token_id: int) -> str:
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """End of the row (stop id or length): release the rest. Idempotent."""
        if self.closed:
            return ""
        self.closed = True
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:  # a stop string can only start at or after `emitted`: its prefix was held back
            end, self.stopped, self.closed = min(hits), True, True
        elif final:
            end = len(self.text)
        else:  # hold back the longest tail that is a proper prefix of some stop string
            end, tail = len(self.text), self.text[self.emitted :]
            for s in self.stops:
                for k in range(min(len(s) - 1, len(tail)), 0, -1):
                    if tail.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece, self.emitted = self.text[self.emitted : end], end
        return piece

    @property
    def result(self) -> str:
        return self.text[: self.emitted]


# ------------------------------------------------------------------------------------- decoding
def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if dev is None:
        dev = next(model.parameters()).device
    return torch.device(dev)


def decode_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 params: SamplingParams, stop_ids: torch.Tensor, pad_id: int, vocab_limit: int,
                 generator: torch.Generator | None, finished: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the (B,) next tokens, one step at a time; the last yield is the last token.

    ``finished`` ((B,) bool) is updated in place when a row emits a stop id; the caller may also
    set it (stop strings) between yields. Finished rows get ``pad_id``. Stops when all rows finish.
    """
    B, T = input_ids.shape
    dev = input_ids.device
    padded = not bool(attention_mask.all())
    cache = model.make_cache(B, min(T + max_new_tokens, model.config.max_seq_len))
    q_pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, -1)  # (B, T), -1 = pad
    seen = None
    if params.repetition_penalty != 1.0:  # tokens in the prompt (not its padding) and the output
        W = model.config.vocab_size
        seen = torch.zeros(B, W + 1, dtype=torch.bool, device=dev)  # column W absorbs the pads
        seen.scatter_(1, input_ids.masked_fill(attention_mask == 0, W), True)
        seen = seen[:, :W]
    with torch.no_grad():  # the prefill, in chunks
        for s in range(0, T, PREFILL_CHUNK):
            chunk = input_ids[:, s : s + PREFILL_CHUNK]
            logits = model(chunk, cache=cache, pos=q_pos[:, s : s + PREFILL_CHUNK] if padded else s,
                           last_only=True)[:, -1]
    next_pos = attention_mask.sum(-1, keepdim=True)  # (B, 1): every row's own next position
    V = logits.shape[-1]
    banned = None
    if vocab_limit < V:  # padded embedding (Qwen: 151936 vs ~151669): never emit ids the tokenizer lacks
        banned = torch.zeros(V, dtype=torch.bool, device=dev)
        banned[vocab_limit:] = True
        banned[stop_ids[stop_ids < V]] = False  # an EOS id is always allowed
    for step in range(max_new_tokens):
        logits = logits.float()
        if banned is not None:
            logits = logits.masked_fill(banned, -math.inf)
        token = params.choose(logits, seen, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        finished |= torch.isin(token, stop_ids)
        if seen is not None:
            seen[torch.arange(B, device=dev), token] = True
        yield token
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        with torch.no_grad():
            logits = model(token[:, None], cache=cache, pos=next_pos if padded else None, last_only=True)[:, -1]
        next_pos = next_pos + 1


# ------------------------------------------------------------------------------------- generate
def _as_list(x: Any) -> list:
    return [] if x is None else ([x] if isinstance(x, (numbers.Integral, str)) else list(x))


def _encode_prompts(tokenizer: Any, prompt: Any, messages: Any, chat: bool | None,
                    template_kwargs: dict | None) -> tuple[list[list[int]], str]:
    """-> (token id lists, kind) with kind 'text' (one str), 'texts' (list of str)."""
    if prompt is not None and messages is not None:
        raise InputError("pass either prompt or messages, not both")
    if prompt is None and messages is None:
        raise InputError("nothing to generate from: pass a prompt or messages")
    if tokenizer is None:
        raise InputError("a text prompt or messages need a tokenizer (or pass token ids as a LongTensor)")
    if not all(callable(getattr(tokenizer, f, None)) for f in ("encode", "decode")):
        raise InputError(f"tokenizer must be a tokenizer (llmparts.Tokenizer.from_pretrained), got {type(tokenizer).__name__}")
    if messages is not None:
        if not isinstance(messages, (list, tuple)):
            raise InputError(f"messages must be a list of {{'role', 'content'}} dicts (or a list of such lists), "
                             f"got {type(messages).__name__}")
        if chat is False:
            raise InputError("messages are always rendered with the chat template; chat=False contradicts that")
        if not messages:
            raise InputError("messages is empty")
        kind = "text" if isinstance(messages[0], dict) else "texts"
        conversations = [messages] if kind == "text" else list(messages)
    else:
        kind = "text" if isinstance(prompt, str) else "texts"
        texts = [prompt] if kind == "text" else list(prompt)
        if not texts:
            raise InputError("prompt is an empty list")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"prompt[{i}] is a {type(t).__name__}; expected str")
            if not t:
                raise InputError(f"prompt{'' if kind == 'text' else f'[{i}]'} is an empty string")
        if not chat:  # raw text: the tokenizer adds its BOS etc.
            return [tokenizer.encode(t, add_special_tokens=True) for t in texts], kind
        conversations = [[{"role": "user", "content": t}] for t in texts]
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise InputError(f"template_kwargs must be a dict of template variables, got {template_kwargs!r}")
    kwargs = dict(template_kwargs or {})
    if "tokenize" in kwargs:
        raise InputError("template_kwargs cannot set tokenize: generate renders the template to text and encodes it")
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)
    ids = []
    for i, conv in enumerate(conversations):
        if not conv:
            raise InputError(f"messages[{i}] is an empty conversation")
        rendered = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False,
                                                 **kwargs)
        ids.append(tokenizer.encode(rendered, add_special_tokens=False))  # the template has its BOS
    return ids, kind


def check_arguments(params: SamplingParams, max_new_tokens: Any, stop: Any, seed: Any) -> list[str]:
    """The checks of :func:`generate`'s arguments that need no model or tokenizer (the CLI runs them
    before loading one); -> the stop strings as a list."""
    params.validate()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 1")
    stops = _as_list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise InputError(f"stop={stop!r} is invalid: expected non-empty strings")
    check_seed(seed)
    return stops


def _id_list(row: Any, what: str) -> list[int]:
    """A token-id list as Python ints; floats and bools are refused (numpy integers are ids)."""
    for x in row:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise InputError(f"{what} holds {x!r} ({type(x).__name__}); token ids must be integers")
    return [int(x) for x in row]


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), T), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, T - len(r) :] = 1
    return ids, mask


def generate(model: Any, tokenizer: Any = None,
             prompt: str | list[str] | torch.Tensor | list[list[int]] | list[int] | None = None, *,
             messages: list[dict] | list[list[dict]] | None = None, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None, stream: bool = False,
             chat: bool | None = None, template_kwargs: dict | None = None,
             attention_mask: torch.Tensor | None = None) -> Any:
    """Generate a continuation of one prompt or a batch.

    Inputs and what comes back:

    * ``prompt`` str -> str of new text; list[str] -> list[str]. A str is used raw (encoded with the
      tokenizer's special tokens); ``chat=True`` wraps it as one user message.
    * ``messages`` (one conversation, or a list of them) -> rendered with the tokenizer's chat
      template (``add_generation_prompt=True``, plus ``template_kwargs``) -> the assistant's text.
    * ``prompt`` LongTensor (B, T) (left-padded with ``attention_mask`` when ragged) -> (B, T + n)
      LongTensor like transformers: prompt, then new ids, rows finished early padded with the pad id
      (generation_config's ``pad_token_id``, else the tokenizer's, else the first EOS, else 0; it must
      be a token of the model); n is the number of steps run. A 1-D tensor -> 1-D.
    * ``prompt`` list[list[int]] -> list[list[int]] of the new ids per row (up to and including the
      stop id, no padding); list[int] -> list[int].
    * ``stream=True`` (one prompt, needs a tokenizer) -> an iterator of text pieces that never split
      a character and never contain (part of) a stop string; they concatenate to the non-streamed text.

    Sampling: ``temperature`` 0/None is greedy. Unset arguments come from
    ``tokenizer.generation_config`` (generation_config.json; without a tokenizer, the model's own
    ``generation_config``, read at load); its sampling values are used only when
    it says ``do_sample: true`` — unlike transformers no hidden ``top_k=50`` is added. Explicit
    arguments always win. ``repetition_penalty`` applies when greedy too. ``seed`` seeds a local
    generator (None: nondeterministic).

    Stops: every id in ``tokenizer.eos_token_ids`` and generation_config's ``eos_token_id``, plus
    ``stop_token_ids``; ``stop`` strings (may span tokens; text is cut before them; token outputs
    keep the ids that completed them, as transformers does; a stop string must lie wholly in the
    new text: transformers' ``stop_strings`` also fire on one that begins in the prompt). Never
    emits an id >= the tokenizer's ``vocab_size`` (or the model's, without a tokenizer), even when
    the embedding is padded wider.

    Context: a prompt of ``max_seq_len`` tokens or more raises :class:`ContextLengthError`; otherwise
    ``max_new_tokens`` (default: generation_config's ``max_new_tokens``, else its ``max_length`` minus
    the prompt, else 256) is clamped to ``max_seq_len - prompt_len`` (the padded length for a batch),
    so prompt plus output never exceeds the context. generation_config fields that llmparts does not
    apply (beams, ``min_new_tokens``, ``no_repeat_ngram_size``, ...) are named in a warning.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"generate: model must be a llmparts model (load_pretrained / build_model), got "
                         f"{type(model).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a (B, T) tensor of 0 / 1, got {type(attention_mask).__name__}")
    dev = _device(model)
    sampling_only = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": seed}  # as passed
    # generation_config.json (eos ids, sampling defaults): the tokenizer's, else the model's own
    gc = dict(getattr(tokenizer, "generation_config", None) or getattr(model, "generation_config", None) or {})
    sampled = {k: gc.get(k) for k in ("temperature", "top_k", "top_p", "min_p")} if gc.get("do_sample") else {}
    if gc.get("do_sample") and sampled["temperature"] is None:
        sampled["temperature"] = 1.0
    pick = lambda value, default: value if value is not None else default  # noqa: E731
    passed = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
              "repetition_penalty": repetition_penalty, "max_new_tokens": max_new_tokens}
    from_file = {k: v for k, v in {**sampled, "repetition_penalty": gc.get("repetition_penalty"),
                                   "max_new_tokens": gc.get("max_new_tokens")}.items()
                 if v is not None and passed[k] is None}  # (named in errors about them)
    temperature = pick(temperature, sampled.get("temperature"))
    top_k, top_p = pick(top_k, sampled.get("top_k")), pick(top_p, sampled.get("top_p"))
    min_p = pick(min_p, sampled.get("min_p"))
    repetition_penalty = pick(repetition_penalty, gc.get("repetition_penalty"))
    # transformers' order: max_new_tokens, else max_length (prompt included; applied below), else a default
    max_length = gc.get("max_length") if max_new_tokens is None and gc.get("max_new_tokens") is None else None
    max_new_tokens = pick(max_new_tokens, pick(gc.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS))
    unapplied = [f"{k}={v!r}" for k, v in gc.items() if k in UNAPPLIED_GENERATION_FIELDS
                 and v not in UNAPPLIED_GENERATION_FIELDS[k]]
    if unapplied:
        warnings.warn(f"generate: generation_config.json sets {', '.join(unapplied)}, which llmparts does not "
                      "apply (greedy or sampled decoding, top_k / top_p / min_p, repetition_penalty only)",
                      stacklevel=2)
    params = SamplingParams(pick(temperature, 0.0), pick(top_k, 0), pick(top_p, 1.0), min_p,
                            pick(repetition_penalty, 1.0))
    try:
        stops = check_arguments(params, max_new_tokens, stop, seed)
    except InputError as e:
        named = [f"{k}={v!r}" for k, v in from_file.items() if f"{k}=" in str(e)]
        if named:
            raise InputError(f"{e} (generation_config.json sets {', '.join(named)}; pass the argument to override it)") from None
        raise
    unused = [f"{k}={v!r}" for k, v in sampling_only.items() if v is not None] if params.greedy else []
    if unused:
        warnings.warn(f"generate: {', '.join(unused)} only apply when sampling, and temperature is "
                      f"{params.temperature} (greedy); set temperature > 0 to sample", stacklevel=2)
    if stops and tokenizer is None:
        raise InputError("stop strings need a tokenizer to decode the output")
    extra_stops = _as_list(stop_token_ids)
    bad_stops = [i for i in extra_stops if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad_stops:
        raise InputError(f"stop_token_ids={stop_token_ids!r} is invalid: expected token ids (ints >= 0), "
                         f"got {bad_stops[0]!r}")
    extra_stops = [int(i) for i in extra_stops]
    vocab_limit = getattr(tokenizer, "vocab_size", None) or model.config.vocab_size
    never = [i for i in extra_stops if i >= vocab_limit]
    if never:
        raise InputError(f"stop_token_ids={stop_token_ids!r}: {never[0]} is not a token id (the vocabulary has "
                         f"{vocab_limit}); it could never stop generation")
    if stops:  # special tokens never appear in the decoded text: a stop string that is one stops on its id
        special = {tokenizer.id_to_token(i): i for i in getattr(tokenizer, "special_ids", ())}
        special.pop(None, None)
        for s in list(stops):
            if s in special:
                stops.remove(s)
                extra_stops.append(special[s])
            elif any(t and t in s for t in special):
                t = next(t for t in special if t and t in s)
                raise InputError(f"stop string {s!r} contains the special token {t!r}, which the decoded text "
                                 f"never shows; stop on it with stop_token_ids=[{special[t]}] instead")

    if dev.type == "meta":
        raise InputError("the model is on the meta device: it has shapes but no weights to generate with "
                         "(build or load it on 'cpu' or 'cuda')")
    # ---- prompts -> left-padded ids (B, T) and mask
    eos_ids = [int(i) for i in _as_list(getattr(tokenizer, "eos_token_ids", None))]
    eos_ids += [int(i) for i in _as_list(gc.get("eos_token_id")) if int(i) not in eos_ids]
    # the pad id of finished rows and of left padding: generation_config's (what transformers pads
    # with), the tokenizer's, the first EOS, else 0; it is fed to the model, so it must be a token
    pad_from = [(gc.get("pad_token_id"), "generation_config's pad_token_id"),
                (getattr(tokenizer, "pad_token_id", None), "the tokenizer's pad_token_id"),
                (eos_ids[0] if eos_ids else None, "the first EOS id (no pad id is set)"), (0, "")]
    pad_id, pad_source = next((i, src) for i, src in pad_from if i is not None)
    if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral) or not 0 <= pad_id < model.config.vocab_size:
        raise InputError(f"the pad id {pad_id} ({pad_source}) is not a token of this model (vocab_size "
                         f"{model.config.vocab_size}); finished and padded rows are fed it: set a valid "
                         "pad_token_id in generation_config.json")
    pad_id = int(pad_id)
    one_d = False
    if isinstance(prompt, torch.Tensor):
        kind = "tensor"
        one_d = prompt.dim() == 1
        check_token_ids(prompt, "prompt tensor")
        input_ids = (prompt[None] if one_d else prompt).to(dev, torch.long)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise InputError(f"prompt tensor must be a non-empty (B, T), got shape {tuple(prompt.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(input_ids)
        else:
            mask = attention_mask_values(attention_mask[None] if attention_mask.dim() == 1 else attention_mask).to(dev)
            if mask.shape != input_ids.shape:
                raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt {tuple(prompt.shape)}")
            if not bool(mask[:, -1].all()):
                raise InputError("attention_mask must be left-padded: the last column must be all ones")
    elif attention_mask is not None:
        raise InputError("attention_mask is only for token-id tensor prompts; list prompts are padded here")
    elif isinstance(prompt, list) and prompt and all(isinstance(x, numbers.Number) for x in prompt):
        kind, input_ids, mask = "ids", *_left_pad([_id_list(prompt, "prompt")], pad_id, dev)
    elif isinstance(prompt, list) and prompt and all(isinstance(x, (list, tuple)) for x in prompt):
        for i, r in enumerate(prompt):
            if not r:
                raise InputError(f"prompt[{i}] is an empty token list")
        kind, (input_ids, mask) = "id_lists", _left_pad([_id_list(r, f"prompt[{i}]") for i, r in enumerate(prompt)],
                                                        pad_id, dev)
    else:
        rows, kind = _encode_prompts(tokenizer, prompt, messages, chat, template_kwargs)
        for i, r in enumerate(rows):
            if not r:
                raise InputError(f"prompt {i} encodes to no tokens")
        input_ids, mask = _left_pad(rows, pad_id, dev)
    if kind in ("tensor", "ids", "id_lists") and messages is not None:
        raise InputError("pass either prompt or messages, not both")
    if kind in ("tensor", "ids", "id_lists") and (chat or template_kwargs):
        raise InputError("chat and template_kwargs apply to text prompts and messages, not to token ids")
    B, T = input_ids.shape
    if stream and (B != 1 or tokenizer is None):
        raise InputError(f"stream=True needs a tokenizer and exactly one prompt, got {B} prompts"
                         + ("" if tokenizer is not None else " and no tokenizer"))

    # ---- context
    ctx = model.config.max_seq_len
    if T >= ctx:
        raise ContextLengthError(f"the prompt has {T} tokens but the model's context is {ctx} "
                                 f"(max_seq_len); it leaves no room for a new token")
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= T:
            raise InputError(f"generation_config.json's max_length={max_length!r} (prompt included) leaves no "
                             f"room after the {T}-token prompt; pass max_new_tokens")
        max_new_tokens = max_length - T
    max_new_tokens = min(max_new_tokens, ctx - T)

    stop_ids = sorted(set(eos_ids + extra_stops))
    stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=dev)
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=dev)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = decode_steps(model, input_ids, mask, max_new_tokens, params, stop_ids, pad_id, vocab_limit,
                         generator, finished)
    text_out = kind in ("text", "texts") or stream
    trackers = [TextTracker(tokenizer, stops) for _ in range(B)] if text_out or stops else None
    stop_set = set(stop_ids.tolist())

    def advance(token: torch.Tensor) -> list[str]:
        """Feed one step's tokens to the text trackers; finish rows whose stop string appeared."""
        pieces = [""] * B
        for i, t in enumerate(token.tolist() if trackers is not None else []):
            tr = trackers[i]
            if tr.closed:  # finished earlier: this is a pad
                continue
            pieces[i] = tr.finish() if t in stop_set else tr.push(t)
            if tr.stopped:
                finished[i] = True
        return pieces

    if stream:
        def pieces() -> Iterator[str]:
            for token in steps:
                piece = advance(token)[0]
                if piece:
                    yield piece
                if trackers[0].closed:
                    return
            tail = trackers[0].finish()
            if tail:
                yield tail

        return pieces()

    out, lengths, alive = [], torch.zeros(B, dtype=torch.long, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
    for token in steps:
        out.append(token)
        lengths += alive  # rows that were still running produced a real token (maybe their stop id)
        advance(token)
        alive = ~finished
    new = torch.stack(out, dim=1)  # (B, n)
    if kind in ("text", "texts"):
        for tr in trackers:
            tr.finish()
        texts = [tr.result for tr in trackers]
        return texts[0] if kind == "text" else texts
    if kind == "tensor":
        full = torch.cat((input_ids, new), dim=1)
        return full[0] if one_d else full
    rows = [new[i, : int(lengths[i])].tolist() for i in range(B)]
    return rows[0] if kind == "ids" else rows
