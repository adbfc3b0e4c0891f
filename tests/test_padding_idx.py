"""The embedding's padding row against transformers, which builds every family's embedding as
``nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)``: the row is zero at random init and
the lookup gives it no gradient (a tied head still does). Logits do not depend on it; training does.

Tiny random models of each family (the cases of the family parity suites) are saved with a pad id, or
without one where the config class has a default (Gemma 3: 0, OLMo 2/3: 1), and trained one step in
both libraries on a batch that contains the pad id: the embedding gradients must be equal, pad row
included (before llmparts read ``pad_token_id``, that row's gradient differed).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmparts
from conftest import save_hf
from llmparts import ConfigError, build_model
from llmparts.loading.export import save_pretrained
from test_families import CASES as DENSE
from test_gguf import V as GGUF_VOCAB, tiny_llama, write_llama_gguf  # noqa: F401 (tiny_llama: a fixture)
from test_moe_families import CASES as MOE

PAD = 7
VOCAB = 320
LLAMA = (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2))
QWEN3 = (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
         dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True))
# name: (config class, model class, kwargs, pad id to write, or None: the class default)
CASES = {
    "llama": (*LLAMA, PAD),
    "qwen3-tied": (*QWEN3, PAD),
    "mistral": (*DENSE["mistral-window-headdim"][:3], PAD),
    "olmo2-default": (*DENSE["olmo2-gqa-untied"][:3], None),  # Olmo2Config: 1
    "olmo3-default": (*DENSE["olmo3-yarn"][:3], None),  # Olmo3Config: 1
    "smollm3-tied": (*DENSE["smollm3-nope-tied"][:3], PAD),
    "gemma3-default": (*DENSE["gemma3-5to1"][:3], None),  # Gemma3TextConfig: 0
    "qwen3_moe": (*MOE["qwen3_moe-norm"], PAD),
    "deepseek_v3": (*MOE["deepseek_v3-full-q-half-rope"], PAD),
    "gpt_oss": (*MOE["gpt_oss-sinks-window"], PAD),
}


def make(name: str, directory, **changes):
    cfg_cls, model_cls, kw, pad = CASES[name]
    kw = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "max_position_embeddings": 256, "bos_token_id": None, "eos_token_id": None, **kw, **changes}
    if pad is not None:
        kw.setdefault("pad_token_id", pad)
    model = model_cls(cfg_cls(**kw))
    save_hf(model, directory)
    return model.config.pad_token_id


def reference(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")


@pytest.mark.parametrize("name", list(CASES))
def test_embedding_gradient_matches_transformers(name, tmp_path):
    pad = make(name, tmp_path)
    ours, ref = llmparts.load_pretrained(tmp_path), reference(tmp_path)
    assert ours.config.embedding.padding_idx == pad == ref.model.embed_tokens.padding_idx is not None
    ids = torch.randint(0, VOCAB, (2, 24))
    ids[0, :6] = pad  # left padding, and the pad id inside a row
    ids[1, 10] = pad
    labels = ids.masked_fill(ids == pad, -100)
    ours.train(), ref.train()
    ours(ids, labels=labels).backward()
    ref(input_ids=ids, labels=labels).loss.backward()
    got, want = ours.embed.weight.grad, ref.model.embed_tokens.weight.grad
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    print(f"{name}: pad {pad}, embedding gradient max abs diff {err:.2e} (max {scale:.2e}); pad row "
          f"{got[pad].abs().max().item():.2e} vs {want[pad].abs().max().item():.2e}")
    assert err <= 1e-5 * scale
    assert (got[pad] - want[pad]).abs().max().item() <= 1e-5 * scale
    if not ours.config.tie_embeddings:  # the lookup gives the pad row nothing
        assert not got[pad].any()


def test_random_init_zeroes_the_padding_row():
    model = build_model("tiny/qwen3", ["embedding.padding_idx=3"])
    w = model.embed.weight
    assert not w[3].any() and bool(w[2].abs().sum() > 0) and model.head.weight is w
    assert build_model("tiny/qwen3").embed.weight[3].abs().sum() > 0  # no padding_idx: an ordinary row


def test_negative_pad_counts_from_the_end_and_defaults_that_do_not_fit_are_none(tmp_path):
    make("llama", tmp_path / "neg", pad_token_id=-1)
    assert llmparts.load_pretrained(tmp_path / "neg").config.embedding.padding_idx == VOCAB - 1
    assert reference(tmp_path / "neg").model.embed_tokens.padding_idx == VOCAB - 1
    cfg = json.loads((tmp_path / "neg" / "config.json").read_text())
    cfg["vocab_size"] = float(VOCAB)  # an integer written as a float: still counted from the end
    (tmp_path / "neg" / "config.json").write_text(json.dumps(cfg))
    assert llmparts.load_pretrained(tmp_path / "neg").config.embedding.padding_idx == VOCAB - 1
    # SmolLM3Config's default pad id 128004 does not fit a 320-token vocabulary (transformers fails to
    # build such a model): absent from config.json, it means no padding row
    make("smollm3-tied", tmp_path / "smol", pad_token_id=None)
    cfg = json.loads((tmp_path / "smol" / "config.json").read_text())
    cfg.pop("pad_token_id")
    (tmp_path / "smol" / "config.json").write_text(json.dumps(cfg))
    assert llmparts.load_pretrained(tmp_path / "smol").config.embedding.padding_idx is None


@pytest.mark.parametrize("value,match", [(VOCAB, "pad_token_id 320 is outside the vocabulary"),
                                         (-VOCAB - 1, "pad_token_id -321 is outside the vocabulary"),
                                         ("7", "pad_token_id must be a token id"),
                                         (True, "pad_token_id must be a token id")])
def test_bad_pad_token_id_is_named(value, match, tmp_path):
    make("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["pad_token_id"] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        llmparts.load_pretrained(tmp_path)


@pytest.mark.parametrize("value", [256, -1])
def test_bad_padding_idx_override_is_named(value):
    with pytest.raises(ConfigError, match=r"embedding\.padding_idx must be a token id in \[0, vocab_size 256\)"):
        build_model("tiny/qwen3", [f"embedding.padding_idx={value}"])


@pytest.mark.parametrize("family,config", [("llama", "tiny/qwen3"), ("gemma3_text", "gemma3-270m")])
def test_export_writes_the_padding_row(family, config, tmp_path):
    overrides = ["n_layers=6", "d_model=64", "attention.head_dim=16", "mlp.hidden_dim=64", "vocab_size=300",
                 "attention.n_heads=4", "attention.n_kv_heads=1"]
    if family == "llama":
        overrides = ["embedding.padding_idx=5", "attention.qk_norm=none"]
    else:
        overrides += ["max_seq_len=256", "attention.window=64"]
    model = build_model(config, overrides)
    pad = model.config.embedding.padding_idx
    assert pad == (5 if family == "llama" else 0)  # (the shipped Gemma 3 configs say 0, as released)
    out = save_pretrained(model, tmp_path, family)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == pad
    assert reference(out).model.embed_tokens.padding_idx == pad
    assert llmparts.load_pretrained(out).config.embedding == model.config.embedding


def test_shrinking_a_config_with_a_padding_row_says_what_to_override():
    with pytest.raises(ConfigError, match=r"got 199999; with a smaller vocab_size, also override embedding\.padding_idx"):
        llmparts.load_config("gpt-oss-20b", ["vocab_size=300"])
    assert llmparts.load_config("gpt-oss-20b", ["vocab_size=300", "embedding.padding_idx=null"]).embedding.padding_idx is None


def test_gguf_padding_token_is_the_padding_row_unless_outside_the_vocabulary(tiny_llama, tmp_path):
    inside = write_llama_gguf(tmp_path / "in.gguf", tiny_llama, extra={"tokenizer.ggml.padding_token_id": 5})
    assert llmparts.load_pretrained(inside).config.embedding.padding_idx == 5
    assert transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="in.gguf", dtype=torch.float32).model.embed_tokens.padding_idx == 5
    # transformers refuses this file (Padding_idx must be within num_embeddings); the padding token is tokenizer
    # metadata that generation never needs, so llmparts loads it without a padding row, with a warning
    outside = write_llama_gguf(tmp_path / "out.gguf", tiny_llama, extra={"tokenizer.ggml.padding_token_id": GGUF_VOCAB})
    with pytest.warns(UserWarning, match=f"padding_token_id {GGUF_VOCAB} is outside the vocabulary"):
        model = llmparts.load_pretrained(outside)
    assert model.config.embedding.padding_idx is None and "pad_token_id" not in model.generation_config


def test_export_refuses_an_extra_pad_token_id_that_is_not_the_padding_row(tmp_path):
    model = build_model("tiny/qwen3")
    with pytest.raises(ConfigError, match=r"extra_config changes the model .*embedding\.padding_idx: None -> 5\); "
                                          "drop those keys from extra_config"):
        save_pretrained(model, tmp_path, "qwen3", extra_config={"pad_token_id": 5})
    out = save_pretrained(build_model("tiny/qwen3", ["embedding.padding_idx=5"]), tmp_path, "qwen3",
                          extra_config={"pad_token_id": 5, "bos_token_id": 1})
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 5
