"""Generation: greedy parity with transformers' ``generate``, logit processors against transformers'
processors, sampling properties, stops, streaming, padded vocabularies and input validation.

Text-level tests use a byte-level fake tokenizer (ids 0..255 are bytes) and a scripted model that
emits given ids, so multi-byte characters and stop strings can be split over tokens on purpose.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llmparts
from llmparts import generation
from llmparts.errors import ContextLengthError, InputError
from llmparts.generation import IncrementalDecoder, SamplingParams, TextTracker, generate
from conftest import hf_reference, save_hf

NEW = 40  # new tokens per parity run


# ------------------------------------------------------------------------------------ fakes
class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are bytes; 256 BOS, 257 EOS, 258 PAD, 259 <end_of_turn>."""

    BOS, EOS, PAD, EOT = 256, 257, 258, 259
    SPECIAL = {256: "<s>", 257: "</s>", 258: "<pad>", 259: "<eot>"}
    vocab_size = 260
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    chat_template = "fake"

    def __init__(self, generation_config: dict | None = None, eos_token_ids: list[int] | None = None) -> None:
        self.generation_config = generation_config or {}
        self.eos_token_ids = [self.EOS] if eos_token_ids is None else eos_token_ids
        self.template_calls: list[dict] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self.SPECIAL[i])
        return "".join(out) + buf.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kw) -> str:
        self.template_calls.append(kw)
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return text + ("<no-think>" if kw.get("enable_thinking") is False else "")


class ScriptedLM(torch.nn.Module):
    """Duck-typed model whose k-th decode step predicts ``scripts[row][k]`` (then EOS).

    Records every forward's input shape so tests can check the prefill/decode pattern."""

    def __init__(self, scripts: list[list[int]], vocab_size: int = 260, max_seq_len: int = 512) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.scripts = scripts
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[torch.Tensor] = []

    def make_cache(self, batch_size: int, max_seq_len: int) -> dict:
        assert max_seq_len <= self.config.max_seq_len
        return {"step": 0}

    def forward(self, input_ids, cache=None, pos=None, attention_mask=None, last_only=False):
        self.calls.append(input_ids.clone())
        B, T = input_ids.shape
        k = cache["step"]
        cache["step"] += 1
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            script = self.scripts[b % len(self.scripts)]
            logits[b, -1, script[k] if k < len(script) else ByteTokenizer.EOS] = 10.0
        return logits


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ------------------------------------------------------------------------ transformers parity
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3-sliding": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, use_sliding_window=True, sliding_window=16,
        max_window_layers=1, num_hidden_layers=3)),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, llmparts model) with the same random weights; large init so greedy varies."""
    cfg_cls, model_cls, kw = CASES[request.param]
    torch.manual_seed(0)
    kw = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
          "max_position_embeddings": 256, "initializer_range": 0.3, **kw}
    d = save_hf(model_cls(cfg_cls(**kw)).eval(), tmp_path_factory.mktemp(request.param))
    return hf_reference(d), llmparts.load_pretrained(d)


def hf_greedy(hf, ids, mask=None, **kw):
    cfg = transformers.GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, **kw)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, generation_config=cfg)


def padded_batch(lengths=(6, 14), vocab=320):
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T))
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : T - n], mask[i, : T - n] = 0, 0
    return ids, mask


def test_greedy_single_prompt_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 320, (1, 9))
    expected, got = hf_greedy(hf, ids), generate(ours, None, ids, max_new_tokens=NEW)
    assert got.shape == (1, 9 + NEW) and got.dtype == torch.long
    assert len(set(got[0, 9:].tolist())) > 8  # the output varies: the test has teeth
    assert torch.equal(got, expected)


def test_greedy_left_padded_batch_matches_transformers(pair):
    hf, ours = pair
    ids, mask = padded_batch()
    expected = hf_greedy(hf, ids, mask)
    got = generate(ours, None, ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(got, expected)
    # each padded row decodes as it does alone
    alone = generate(ours, None, ids[:1, mask[0].bool()], max_new_tokens=NEW)
    assert torch.equal(alone[0, -NEW:], got[0, -NEW:])


def test_greedy_repetition_penalty_matches_transformers(pair):
    hf, ours = pair
    ids, mask = padded_batch((5, 11))
    expected = hf_greedy(hf, ids, mask, repetition_penalty=1.5)
    got = generate(ours, None, ids, attention_mask=mask, max_new_tokens=NEW, repetition_penalty=1.5)
    assert torch.equal(got, expected)


def test_repetition_penalty_ignores_left_padding(pair):
    """transformers skips the left padding (prompt_ignore_length): pad with the token row 0 wants next."""
    hf, ours = pair
    ids, mask = padded_batch((5, 11))
    want = int(generate(ours, None, ids[:1, mask[0].bool()], max_new_tokens=1)[0, -1])
    assert want not in ids[0, mask[0].bool()].tolist()
    ids = ids.masked_fill(mask == 0, want)
    expected = hf_greedy(hf, ids, mask, repetition_penalty=50.0)
    got = generate(ours, None, ids, attention_mask=mask, max_new_tokens=NEW, repetition_penalty=50.0)
    assert int(got[0, 11]) == want
    assert torch.equal(got, expected)


def test_token_list_prompts_and_chunked_prefill(pair, monkeypatch):
    _, ours = pair
    ids, mask = padded_batch((7, 19))
    full = generate(ours, None, ids, attention_mask=mask, max_new_tokens=12)
    rows = [ids[i, mask[i].bool()].tolist() for i in range(2)]
    assert generate(ours, None, rows, max_new_tokens=12) == full[:, -12:].tolist()
    assert generate(ours, None, rows[1], max_new_tokens=12) == full[1, -12:].tolist()
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)  # several prefill forwards, ragged last chunk
    assert torch.equal(generate(ours, None, ids, attention_mask=mask, max_new_tokens=12), full)


def test_prefill_once_then_one_token_per_step(pair):
    _, ours = pair
    shapes = []
    handle = ours.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(args[0].shape)),
                                            with_kwargs=True)
    try:
        generate(ours, None, torch.randint(0, 320, (2, 10)), max_new_tokens=8)
    finally:
        handle.remove()
    assert shapes == [(2, 10)] + [(2, 1)] * 7  # the last token needs no forward


# --------------------------------------------------------------------- processors vs transformers
def random_logits(B=4, V=64):
    x = torch.randn(B, V) * 3
    x[0, :5] = x[0, 5]  # ties at the threshold
    return x


def assert_same_filter(got, expected):
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    keep = ~torch.isinf(expected)
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=0)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits, ids = random_logits(), torch.randint(0, 64, (4, 30))
    seen = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(generation.apply_repetition_penalty(logits, seen, penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(t):
    logits = random_logits()
    torch.testing.assert_close(generation.apply_temperature(logits, t), TemperatureLogitsWarper(t)(None, logits))


@pytest.mark.parametrize("k", [1, 3, 10, 64, 100])
def test_top_k_matches_transformers(k):
    logits = random_logits()
    assert_same_filter(generation.apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    logits = random_logits()
    assert_same_filter(generation.apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_transformers(p):
    logits = random_logits()
    assert_same_filter(generation.apply_min_p(logits, p), MinPLogitsWarper(p)(None, logits))


def test_processor_chain_matches_transformers_order():
    logits, ids = random_logits(), torch.randint(0, 64, (4, 20))
    seen = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, ids, True)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    hf = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        hf = proc(ids, hf)
    assert_same_filter(params.process(logits, seen), hf)


# ------------------------------------------------------------------------- sampling properties
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(temperature=1.0), {0, 1, 2, 3}),
    (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
    (SamplingParams(temperature=1.0, top_k=1), {0}),
    (SamplingParams(temperature=1.0, top_p=0.75), {0, 1}),
    (SamplingParams(temperature=1.0, top_p=0.9), {0, 1, 2}),
    (SamplingParams(temperature=1.0, top_p=0.1), {0}),
    (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),
    (SamplingParams(temperature=1.0, min_p=0.2), {0, 1, 2}),
    (SamplingParams(temperature=1.0, min_p=1.0), {0}),
    (SamplingParams(temperature=0.0), {0}),
])
def test_filters_never_pick_filtered_tokens(params, allowed):
    gen = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(4000, 4).contiguous()
    picks = params.choose(logits, None, gen)
    counts = torch.bincount(picks, minlength=4)
    assert set(picks.unique().tolist()) == allowed
    if params.top_k == 2:  # renormalised over the kept set: 0.5 / 0.8
        assert abs(counts[0].item() / 4000 - 0.625) < 0.03


def test_temperature_sharpens():
    gen = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(4000, 4).contiguous()
    cold = SamplingParams(temperature=0.25).choose(logits, None, gen)
    assert (cold == 0).float().mean() > 0.85  # 0.5^4 / sum p^4 = 0.88


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    ids = torch.randint(0, 320, (2, 6))
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(ours, None, ids, seed=123, **kw)
    b = generate(ours, None, ids, seed=123, **kw)
    c = generate(ours, None, ids, seed=124, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert generate(ours, None, ids, seed=None, **kw).shape == a.shape


# --------------------------------------------------------------------------- text, stops, stream
def test_text_prompt_returns_new_text_and_stops_at_eos():
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids("hi there") + [tok.EOS] + byte_ids("junk")])
    assert generate(model, tok, "hello", max_new_tokens=50) == "hi there"
    assert model.calls[0].tolist() == [tok.encode("hello")]  # raw: BOS + bytes, no template
    assert len(model.calls) == len("hi there") + 1  # stopped right after the EOS


def test_every_eos_id_and_stop_token_ids_stop():
    tok = ByteTokenizer(eos_token_ids=[ByteTokenizer.EOS, ByteTokenizer.EOT])
    model = ScriptedLM([byte_ids("ab") + [tok.EOT] + byte_ids("cd")])
    assert generate(model, tok, "x") == "ab"
    tok = ByteTokenizer(generation_config={"eos_token_id": [ByteTokenizer.EOS, ByteTokenizer.EOT]})
    assert generate(model, tok, "x") == "ab"
    assert generate(model, ByteTokenizer(), "x", stop_token_ids=[ord("b")]) == "a"


def test_batch_rows_finished_early_are_padded():
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids("ab") + [tok.EOS], byte_ids("abcdef")])
    out = generate(model, tok, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=10)
    assert out[0, 2:].tolist() == byte_ids("ab") + [tok.EOS] + [tok.PAD] * 4
    assert out[1, 2:].tolist() == byte_ids("abcdef") + [tok.EOS]
    assert generate(model, tok, ["p", "longer prompt"], max_new_tokens=10) == ["ab", "abcdef"]


def test_pad_id_is_generation_configs_and_must_be_a_token():
    """Finished rows are padded with generation_config's pad_token_id, as transformers does (then the
    tokenizer's, then the first EOS); a pad id the model has no embedding for fails before the prefill."""
    tok = ByteTokenizer(generation_config={"pad_token_id": 3})
    model = ScriptedLM([byte_ids("ab") + [tok.EOS], byte_ids("abcdef")])
    out = generate(model, tok, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=10)
    assert out[0, 2:].tolist() == byte_ids("ab") + [tok.EOS] + [3] * 4
    for gc, source in (({"pad_token_id": 300}, "generation_config's pad_token_id"),
                       ({"eos_token_id": 999}, "the first EOS id")):
        model = ScriptedLM([byte_ids("ab")])
        model.generation_config = gc
        with pytest.raises(InputError, match=rf"the pad id \d+ \({source}.*is not a token of this model"):
            generate(model, None, [[1, 2], [3]], max_new_tokens=4)
        assert model.calls == []


def test_generation_config_max_length_and_unapplied_fields():
    """max_length (prompt included) bounds the output when no max_new_tokens is set, as in transformers;
    generation_config fields llmparts does not apply are named in a warning, "off" values are not."""
    model = ScriptedLM([byte_ids("abcdefgh")])
    assert generate(model, ByteTokenizer({"max_length": 5}), "x") == "abc"  # BOS + "x" + 3 new
    assert generate(model, ByteTokenizer({"max_length": 5, "max_new_tokens": 4}), "x") == "abcd"
    assert generate(model, ByteTokenizer({"max_length": 5}), "x", max_new_tokens=6) == "abcdef"
    with pytest.raises(InputError, match=r"generation_config.json sets max_new_tokens=0; pass the argument"):
        generate(model, ByteTokenizer({"max_new_tokens": 0}), "x")
    with pytest.raises(InputError, match=r"generation_config.json sets temperature=-1"):
        generate(model, ByteTokenizer({"do_sample": True, "temperature": -1}), "x")
    with pytest.raises(InputError, match=r"max_length=2 .prompt included. leaves no room after the 2-token prompt"):
        generate(model, ByteTokenizer({"max_length": 2}), "x")
    with pytest.warns(UserWarning, match=r"sets no_repeat_ngram_size=3, which llmparts does not apply") as record:
        generate(model, ByteTokenizer({"no_repeat_ngram_size": 3, "num_beams": 1, "min_length": 0}), "x")
    assert "num_beams" not in str(record[0].message) and "min_length" not in str(record[0].message)


def test_arguments_that_would_be_ignored_are_refused():
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids("ab")])
    cases = [
        (dict(prompt=[5, 6], attention_mask=torch.ones(1, 2, dtype=torch.long)), "attention_mask is only for token-id tensor"),
        (dict(prompt=torch.tensor([[5, 6]]), attention_mask=[[1, 1]]), "attention_mask must be a .B, T. tensor"),
        (dict(prompt=[5, 6], chat=True), "chat and template_kwargs apply to text prompts"),
        (dict(prompt=torch.tensor([[5, 6]]), template_kwargs={"enable_thinking": False}), "chat and template_kwargs"),
        (dict(prompt="x", stop_token_ids=[260]), r"260 is not a token id .the vocabulary has 260."),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            generate(model, tok, **kwargs)
    with pytest.raises(InputError, match="model must be a llmparts model"):
        generate(None, tok, "x")
    with pytest.raises(InputError, match="tokenizer must be a tokenizer .* got str"):
        generate(model, "gpt2", "x")
    with pytest.raises(InputError, match="messages must be a list of"):
        generate(model, tok, messages={"role": "user", "content": "x"})
    with pytest.raises(InputError, match="template_kwargs cannot set tokenize"):
        generate(model, tok, messages=[{"role": "user", "content": "x"}], template_kwargs={"tokenize": True})
    assert model.calls == []


def test_stop_strings_spanning_tokens():
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids("one two\n\nUser: three"), byte_ids("no stop here")])
    assert generate(model, tok, "q", stop="\n\nUser:") == "one two"
    model.calls.clear()
    assert generate(model, tok, ["q", "q"], stop=["User:", "\n\n"]) == ["one two", "no stop here"]
    assert len(model.calls) == len("no stop here") + 1
    ids = generate(model, tok, torch.tensor([[1]]), stop="two")  # tokens keep the completing ids
    assert ids[0, 1:].tolist() == byte_ids("one two")
    rows = generate(model, tok, [[1], [2, 3]], stop="two")  # id lists: new ids, no trailing pads
    assert rows == [byte_ids("one two"), byte_ids("no stop here") + [tok.EOS]]


@pytest.mark.parametrize("text", ["a€b😀c", "€€€", "😀", "ab\n\nUser: x€"])
@pytest.mark.parametrize("stop", [None, "€b", "\n\nUser:", "😀c"])
def test_stream_pieces_concatenate_and_never_split_characters(text, stop):
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids(text)])
    full = generate(model, tok, "p", stop=stop)
    expected = text.split(stop)[0] if stop else text
    assert full == expected
    pieces = list(generate(model, tok, "p", stop=stop, stream=True))
    assert "".join(pieces) == full
    for piece in pieces:
        assert piece and "\ufffd" not in piece
        assert piece.encode("utf-8").decode("utf-8") == piece
        assert not stop or stop not in piece


def test_incremental_decoder_holds_partial_characters():
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    out = [dec.push(b) for b in "€x".encode()]
    assert out == ["", "", "€", "x"]
    dec = IncrementalDecoder(tok)
    assert [dec.push(b) for b in "😀".encode()[:3]] == ["", "", ""]
    assert dec.flush() == "\ufffd"  # an unfinished character is released as-is at the end
    tracker = TextTracker(tok, ["STOP"])
    got = [tracker.push(b) for b in b"aST"] + [tracker.push(b) for b in b"x"]
    assert "".join(got) == "aSTx" and got[:3] == ["a", "", ""]


class RunFallbackTokenizer(ByteTokenizer):
    """Decodes like byte fallback in `tokenizers`: a run of byte tokens with an invalid UTF-8 sequence
    becomes one U+FFFD per byte, completed characters of the run included."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        data = bytes(i for i in ids if i < 256)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(data)


def test_incremental_decoder_never_repeats_text_a_decoder_rewrites():
    """A later invalid byte makes such a decoder rewrite text already emitted; the stream then adds the
    new bytes' own text: the emitted characters stay, each invalid byte gives one U+FFFD."""
    tok = RunFallbackTokenizer()
    for data, want in ((b"A\xb3", "A\ufffd"), ("\U0002000b\U0002000b".encode()[:-1], "\U0002000b" + "\ufffd" * 3),
                       (b"ab\xffcd", "ab" + "\ufffd" * 3), ("é€".encode(), "é€")):
        dec = IncrementalDecoder(tok)
        assert "".join(dec.push(b) for b in data) + dec.flush() == want, data


def test_stream_yields_before_the_end():
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids("abc")])
    it = generate(model, tok, "p", stream=True)
    assert next(it) == "a" and len(model.calls) == 1  # lazily, one token at a time


def test_chat_template_messages_and_chat_flag():
    tok = ByteTokenizer()
    model = ScriptedLM([byte_ids("ok")])
    msgs = [{"role": "user", "content": "hi"}]
    assert generate(model, tok, messages=msgs, template_kwargs={"enable_thinking": False}) == "ok"
    assert model.calls[-3].tolist() == [byte_ids("<user>hi\n<assistant><no-think>")]  # no extra BOS
    assert tok.template_calls[-1] == {"enable_thinking": False}
    assert generate(model, tok, messages=[msgs, msgs]) == ["ok", "ok"]
    generate(model, tok, "hi", chat=True)
    assert model.calls[-3].tolist() == [byte_ids("<user>hi\n<assistant>")]


def test_generation_config_defaults():
    model = ScriptedLM([byte_ids("abcdefghijklmnopqrstuvwxyz")])
    assert generate(model, ByteTokenizer({"max_new_tokens": 3}), "p") == "abc"
    assert generate(model, ByteTokenizer({"max_new_tokens": 3}), "p", max_new_tokens=5) == "abcde"
    # do_sample false: its temperature is ignored (greedy); scripted logits are peaked, so compare params
    seen = {}
    real = SamplingParams.validate

    def spy(self):
        seen["p"] = self
        return real(self)

    SamplingParams.validate = spy
    try:
        generate(model, ByteTokenizer({"do_sample": False, "temperature": 0.6, "top_k": 5}), "p", max_new_tokens=1)
        assert seen["p"].greedy
        generate(model, ByteTokenizer({"do_sample": True, "temperature": 0.6, "top_k": 5, "top_p": 0.9}), "p",
                 max_new_tokens=1)
        assert seen["p"] == SamplingParams(0.6, 5, 0.9, None, 1.0)
        with pytest.warns(UserWarning, match="top_k=3 only apply when sampling"):
            generate(model, ByteTokenizer({"do_sample": True, "temperature": 0.6}), "p", max_new_tokens=1,
                     temperature=0.0, top_k=3)
        assert seen["p"].greedy and seen["p"].top_k == 3  # explicit arguments win
    finally:
        SamplingParams.validate = real
    assert generate(ScriptedLM([[ord("a")] * 300]), ByteTokenizer(), "p") == "a" * generation.DEFAULT_MAX_NEW_TOKENS


# ------------------------------------------------------------------------------- padded vocab
def test_never_emits_ids_beyond_the_tokenizer_vocab(pair):
    _, ours = pair
    tok = ByteTokenizer()  # 260 ids; the model's head is 320 wide
    with torch.no_grad():
        saved = ours.head.weight.clone()
        ours.head.weight[tok.vocab_size :] *= 50  # make the padding rows win
    try:
        ids = torch.randint(0, 256, (2, 5))
        raw = generate(ours, None, ids, max_new_tokens=20)
        assert (raw[:, 5:] >= tok.vocab_size).any()  # without a tokenizer: the model's full width
        masked = generate(ours, tok, ids, max_new_tokens=20, stop_token_ids=[])
        assert (masked[:, 5:] < tok.vocab_size).all()
        sampled = generate(ours, tok, ids, max_new_tokens=20, temperature=5.0, seed=0)
        assert (sampled[:, 5:] < tok.vocab_size).all()
    finally:
        with torch.no_grad():
            ours.head.weight.copy_(saved)


def test_padded_vocab_mask_scripted():
    tok = ByteTokenizer()
    model = ScriptedLM([[300, 301]], vocab_size=320)  # the script wants ids the tokenizer lacks
    out = generate(model, tok, torch.tensor([[1]]), max_new_tokens=2)
    assert (out < tok.vocab_size).all()


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(stop=""), "stop"),
])
def test_invalid_parameters_raise(kw, name):
    model = ScriptedLM([byte_ids("a")])
    with pytest.raises(InputError, match=name) as e:
        generate(model, ByteTokenizer(), "p", **kw)
    assert repr(next(iter(kw.values())))[:3] in str(e.value)
    assert model.calls == []  # validated before any forward


@pytest.mark.parametrize("prompt, kw", [
    ("", {}), ([], {}), (["a", ""], {}), (torch.zeros(1, 0, dtype=torch.long), {}), ([[1], []], {}),
    (None, {}), (None, dict(messages=[])), ("a", dict(messages=[{"role": "user", "content": "x"}])),
    (["a", "b"], dict(stream=True)), (torch.zeros(2, 3, dtype=torch.long), dict(stream=True)),
])
def test_invalid_prompts_raise(prompt, kw):
    with pytest.raises(InputError):
        generate(ScriptedLM([byte_ids("a")]), ByteTokenizer(), prompt, **kw)


def test_text_prompt_without_tokenizer_raises():
    with pytest.raises(InputError, match="tokenizer"):
        generate(ScriptedLM([byte_ids("a")]), None, "hello")
    with pytest.raises(InputError, match="tokenizer"):
        generate(ScriptedLM([byte_ids("a")]), None, torch.tensor([[1]]), stop="x")


def test_right_padding_is_rejected():
    with pytest.raises(InputError, match="left-padded"):
        generate(ScriptedLM([byte_ids("a")]), None, torch.tensor([[1, 0]]), attention_mask=torch.tensor([[1, 0]]))


def test_context_length():
    model = ScriptedLM([[ord("a")] * 100], max_seq_len=16)
    with pytest.raises(ContextLengthError, match="16"):
        generate(model, None, torch.ones(1, 16, dtype=torch.long))
    out = generate(model, None, torch.ones(1, 10, dtype=torch.long), max_new_tokens=50)
    assert out.shape == (1, 16)  # clamped to max_seq_len - prompt_len


def test_context_length_real_model(pair):
    _, ours = pair
    ctx = ours.config.max_seq_len
    with pytest.raises(ContextLengthError, match=str(ctx)):
        generate(ours, None, torch.zeros(1, ctx, dtype=torch.long), max_new_tokens=1)
    out = generate(ours, None, torch.zeros(1, ctx - 3, dtype=torch.long), max_new_tokens=10)
    assert out.shape == (1, ctx)


def test_stop_string_that_is_a_special_token_stops_on_its_id():
    """Decoded text never shows special tokens, so such a stop string could never match as text."""

    class Tok(ByteTokenizer):
        special_ids = {256, 257, 258, 259}

        def id_to_token(self, i):
            return self.SPECIAL.get(i)

    model = ScriptedLM([byte_ids("ab") + [259] + byte_ids("cd")])
    assert generate(model, Tok(), "q", stop="<eot>") == "ab"
    assert generate(model, Tok(), "q") == "abcd"
    with pytest.raises(InputError, match=r"stop_token_ids=\[259\]"):
        generate(model, Tok(), "q", stop="b<eot>")


def test_sampling_arguments_with_greedy_decoding_warn():
    import warnings

    model = ScriptedLM([byte_ids("ab")])
    with pytest.warns(UserWarning, match=r"top_p=0.5, seed=3 only apply when sampling"):
        generate(model, ByteTokenizer(), "q", top_p=0.5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, ByteTokenizer(), "q", temperature=0.7, top_p=0.5, seed=3)
        generate(model, ByteTokenizer(), "q")


def test_template_kwargs_may_set_add_generation_prompt():
    model, tok = ScriptedLM([byte_ids("ok")]), ByteTokenizer()
    msgs = [{"role": "user", "content": "q"}]
    assert generate(model, tok, messages=msgs, template_kwargs={"add_generation_prompt": False}) == "ok"
    assert bytes(model.calls[0][0].tolist()).decode() == "<user>q\n"  # the prompt: no assistant header
    with pytest.raises(InputError, match="template_kwargs must be a dict"):
        generate(model, tok, messages=msgs, template_kwargs=5)


def test_without_a_tokenizer_generation_stops_on_the_checkpoints_eos(tmp_path):
    """A loaded model keeps its checkpoint's generation config: generate(model, None, ids) stops on the
    EOS id config.json / generation_config.json names, as transformers' model.generate does."""
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(3))
    save_hf(hf, tmp_path / "free")
    free = generate(llmparts.load_pretrained(tmp_path / "free"), None, ids, max_new_tokens=8)[:, 7:]
    eos = int(free[0, 2])  # a token row 0 emits third
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    for layout in ("generation_config", "config_only"):
        d = save_hf(hf, tmp_path / layout)
        if layout == "config_only":
            (d / "generation_config.json").unlink()
        model = llmparts.load_pretrained(d)
        got = generate(model, None, ids, max_new_tokens=8)
        with torch.no_grad():
            expected = hf_reference(d).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                                do_sample=False, pad_token_id=eos)
        assert int(got[0, 7 + 2]) == eos
        assert torch.equal(got, expected), (layout, got, expected)
    assert generate(llmparts.build_model("tiny/qwen3", seed=0), None, ids % 256, max_new_tokens=4).shape == (2, 11)


def test_token_id_lists_must_hold_integers():
    import numpy as np

    model = llmparts.build_model("tiny/qwen3", seed=0)
    for bad in ([[1.5, 2]], [True, 3], [[1, False]], [2.0]):
        with pytest.raises(InputError, match="token ids must be integers"):
            generate(model, None, bad, max_new_tokens=2)
    row = list(np.array([5, 6, 7]))  # numpy integers are ids
    assert generate(model, None, row, max_new_tokens=2) == generate(model, None, [5, 6, 7], max_new_tokens=2)
    assert generate(model, None, [5, 6, 7], max_new_tokens=2, stop_token_ids=np.array([5, 6])) is not None


def test_meta_device_models_are_refused_with_a_reason(tmp_path):
    from llmparts.errors import ConfigError
    from llmparts.loading.export import save_pretrained

    with pytest.raises(InputError, match="meta device"):
        generate(llmparts.build_model("tiny/qwen3", device="meta"), None, torch.tensor([[1, 2]]), max_new_tokens=2)
    save_pretrained(llmparts.build_model("tiny/qwen3", seed=0), tmp_path, model_type="qwen3")
    with pytest.raises(ConfigError, match="holds no data"):
        llmparts.load_pretrained(tmp_path, device="meta")
