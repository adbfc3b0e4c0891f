"""Logit parity against transformers for every supported family, both config.json layouts.

Tiny random models are created with transformers itself, saved with ``save_pretrained`` and loaded
through ``llmparts.load_pretrained``; logits are compared in float32 with eager attention.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import llmparts
from conftest import hf_reference, save_hf, to_legacy_layout

TOL = 1e-4  # float32; measured max abs diffs are ~1e-6 (see test output with -s)
SEQ = 96  # long enough to reach the llama3/yarn-scaled frequency bands of these tiny configs

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    # name: (config class, model class, kwargs)
    "llama-gqa-llama3-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-mqa-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama-mha-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "qwen3-headdim-tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3-headdim-untied-yarn": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
        rope_parameters=YARN_ROPE)),
    "qwen3-sliding": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=16,
        max_window_layers=1, num_hidden_layers=3)),
}


def make(name: str, tmp_path, layout: str = "v5"):
    cfg_cls, model_cls, kw = CASES[name]
    kw = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
          "max_position_embeddings": 256, **kw}
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # random non-trivial norm weights and biases (init sets them to 1 / 0)
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_hf(model, tmp_path)
    if layout != "v5":
        to_legacy_layout(tmp_path, rope_key="type" if layout == "v4-type" else "rope_type")
    return tmp_path


def batch(vocab: int = 320, T: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T))


@pytest.mark.parametrize("layout", ["v5", "v4-type", "v4-rope_type"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, layout, tmp_path):
    d = make(name, tmp_path, layout)
    ref = hf_reference(d)
    ours = llmparts.load_pretrained(d)
    assert ours.dtype == torch.float32
    x = batch()
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
    diff = (expected - got).abs().max().item()
    print(f"{name} [{layout}] max abs diff {diff:.2e}")
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert diff <= TOL


def test_sharded_checkpoint_matches(tmp_path):
    d = make("qwen3-headdim-untied-yarn", tmp_path)
    ref = hf_reference(d)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ours = llmparts.load_pretrained(sharded)
    x = batch()
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max().item() <= TOL


def test_cached_decode_matches_transformers_logits(tmp_path):
    """Prefill + token-by-token decode through llmparts' cache reproduces transformers' full forward."""
    d = make("qwen3-sliding", tmp_path)
    ref, ours = hf_reference(d), llmparts.load_pretrained(d)
    x = batch(T=56)
    with torch.no_grad():
        expected = ref(x).logits
        cache = ours.make_cache(2, 64)
        steps = [ours(x[:, :20], cache=cache)] + [ours(x[:, t : t + 1], cache=cache) for t in range(20, 56)]
    assert (torch.cat(steps, 1) - expected).abs().max().item() <= TOL


def test_loading_twice_is_identical(tmp_path):
    d = make("llama-gqa-llama3-tied", tmp_path)
    a, b = llmparts.load_pretrained(d), llmparts.load_pretrained(d)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a.head.weight is a.embed.weight


def test_dtype_and_device_arguments(tmp_path):
    d = make("llama-mqa-untied", tmp_path)
    m = llmparts.load_pretrained(d, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m(batch(T=8)).dtype == torch.float32  # logits always float32
