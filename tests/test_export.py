"""Writing models back in Hugging Face format: transformers loads them with identical logits."""

from __future__ import annotations

import pytest
import torch
import transformers

import llmparts
from llmparts.loading.export import save_pretrained
from conftest import hf_reference


def tiny_gemma3():
    cfg = transformers.Gemma3TextConfig(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
        max_position_embeddings=128, sliding_window_pattern=2)
    return transformers.Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_build_export_load_in_transformers(model_type, tmp_path):
    overrides = {"llama": [], "qwen3": [], "gemma3_text": None}[model_type]
    if model_type == "gemma3_text":
        tiny_gemma3().save_pretrained(tmp_path / "src")
        ours = llmparts.load_pretrained(tmp_path / "src")
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:
        ours = llmparts.build_model("tiny/qwen3", overrides=overrides + (["attention.qk_norm=none"] if model_type == "llama" else []))
    out = save_pretrained(ours, tmp_path / "out", model_type)
    ref = hf_reference(out)
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4
    again = llmparts.load_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_export_keeps_token_ids_and_a_gemma3_without_sliding_layers_runs(tmp_path):
    """The model's generation_config (bos / eos / pad) is written to generation_config.json and its ids
    to config.json, so an exported model still stops at EOS in both libraries; a Gemma 3 with no
    sliding layer states a window anyway, as transformers' Gemma 3 builds its sliding mask regardless."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, max_position_embeddings=128,
        layer_types=["full_attention", "full_attention"], bos_token_id=5, eos_token_id=[7, 9], pad_token_id=0)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "src")
    ours = llmparts.load_pretrained(tmp_path / "src")
    out = save_pretrained(ours, tmp_path / "out")
    ref = hf_reference(out)
    assert (ref.generation_config.bos_token_id, ref.generation_config.eos_token_id) == (5, [7, 9])
    assert (ref.config.bos_token_id, ref.config.eos_token_id, ref.config.pad_token_id) == (5, [7, 9], 0)
    again = llmparts.load_pretrained(out)
    assert again.generation_config == ours.generation_config
    assert [layer.attention.window for layer in again.config.layers] == [None, None]
    x = torch.randint(0, 160, (2, 20))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_export_needs_a_family(tmp_path):
    with pytest.raises(llmparts.ConfigError, match="model_type"):
        save_pretrained(llmparts.build_model("tiny/qwen3"), tmp_path)


def test_export_refuses_features_the_family_cannot_express(tmp_path):
    model = llmparts.build_model("tiny/qwen3", overrides=["attention.qk_norm=none", "attention.window=8"])
    with pytest.raises(llmparts.ConfigError, match=r"cannot be written as model_type 'llama'.*"
                                                   r"layers\[0\]\.attention\.window: 8 -> None"):
        save_pretrained(model, tmp_path, "llama")
