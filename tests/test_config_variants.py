"""config.json forms that leave fields out or carry both rope layouts, against transformers.

transformers fills an absent field with its config class's default and, when a config.json has both
``rope_parameters`` and a legacy ``rope_scaling``, lets ``rope_scaling`` win (Gemma 3: merged into the
full-attention layers). Each case saves a tiny random transformers model, edits its config.json, and
compares transformers' logits (reading the edited file) with llmparts'. Before these were handled,
every case differed by 0.5-4 in the logits (so the tolerance below cannot pass by accident).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmparts
from conftest import save_hf
from llmparts.loading import config_of

TOL = 1e-4
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
             pad_token_id=None, bos_token_id=None, eos_token_id=None)
MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_attention_heads=4,
           num_key_value_heads=4, q_lora_rank=24, moe_intermediate_size=16)


def _drop(*keys):
    return lambda c: [c.pop(k, None) for k in keys]


def _set(**items):
    return lambda c: c.update(items)


def _both(*edits):
    return lambda c: [e(c) for e in edits]


# name: (config class, model class, kwargs, edit of the saved config.json)
CASES = {
    # rope_parameters without rope_theta: transformers takes the top-level rope_theta
    "llama-top-level-theta": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        lambda c: (c["rope_parameters"].pop("rope_theta"), c.update(rope_theta=50.0))),
    "qwen3-top-level-theta": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16),
        lambda c: (c["rope_parameters"].pop("rope_theta"), c.update(rope_theta=50.0))),
    # both layouts: the legacy rope_scaling replaces rope_parameters
    "llama-rope_scaling-wins": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
        _set(rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0})),
    # Gemma 3: top-level thetas fill the nested dicts; rope_scaling merges into the full-attention layers
    "gemma3-top-level-thetas-and-scaling": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        num_hidden_layers=2, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
        lambda c: ([d.pop("rope_theta") for d in c["rope_parameters"].values()],
                   c.update(rope_theta=70.0, rope_local_base_freq=30.0,
                            rope_scaling={"rope_type": "linear", "factor": 4.0}))),
    # Gemma 3 without layer_types: only sliding_window_pattern counts (default 6), not the private attribute
    "gemma3-private-pattern-ignored": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        num_hidden_layers=4, head_dim=16, sliding_window=8),
        _both(_drop("layer_types", "sliding_window_pattern"), _set(_sliding_window_pattern=2))),
    # DeepSeek-V3 without the router's group sizes and scaling: DeepseekV3Config's 8 / 4 / 2.5
    "deepseek_v3-router-defaults": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, n_shared_experts=1, **MLA),
        _drop("n_group", "topk_group", "routed_scaling_factor")),
    # GPT-OSS without any rope key: GptOssConfig's YaRN (factor 32 over 4096 positions)
    "gpt_oss-default-yarn": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=8),
        _drop("rope_parameters", "rope_scaling", "rope_theta")),
    # ... and with only a top-level rope_theta: that YaRN with the file's base (not the class's 150000)
    "gpt_oss-default-yarn-top-level-theta": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=8),
        _both(_drop("rope_parameters"), _set(rope_theta=1000.0, rope_scaling=None))),
    # DeepSeek-V3's flags typed `bool | None`: a null is kept and tested as false (half-split RoPE, no
    # renormalisation of the routing weights), not the class defaults (true)
    "deepseek_v3-null-flags": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, **MLA), _set(rope_interleave=None, norm_topk_prob=None)),
    # no shared expert: transformers saves empty shared-expert tensors
    "deepseek_v3-no-shared-expert": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=0, **MLA), lambda c: None),
    # first_k_dense_replace past the last layer (the class default 3, two layers): every layer dense;
    # the router's fields describe experts no layer has, null group sizes included
    "deepseek_v3-all-dense": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        first_k_dense_replace=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, **MLA),
        _set(n_group=None, topk_group=None)),
    # Qwen3-MoE with every layer in mlp_only_layers: all dense; transformers never reads the experts'
    # fields, so a top_k above the expert count does not matter
    "qwen3_moe-all-dense": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=4, num_experts_per_tok=8, moe_intermediate_size=16, mlp_only_layers=[0, 1]),
        lambda c: None),
    # SmolLM3: an explicit layer_types windows its sliding layers whatever use_sliding_window says
    # (transformers' masks do; only its flash-attention path reads the flag)
    "smollm3-layer_types-without-flag": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, dict(
        num_hidden_layers=4, sliding_window=8, use_sliding_window=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]), lambda c: None),
}


def _make(name, tmp_path):
    cfg_cls, model_cls, kw, edit = CASES[name]
    model = model_cls(cfg_cls(**{**SMALL, **kw})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, 0.5)  # well-separated router scores
            elif "norm" in n or n.endswith("bias") or "sinks" in n:
                p.add_(torch.randn_like(p) * 0.1)
    save_hf(model, tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    return ref, llmparts.load_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CASES))
def test_edited_config_matches_transformers(name, tmp_path):
    ref, ours = _make(name, tmp_path)
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
        cache = ours.make_cache(2, 64)
        steps = [ours(x[:, :30], cache=cache)] + [ours(x[:, t : t + 1], cache=cache) for t in range(30, 40)]
    diff = (expected - got).abs().max().item()
    print(f"{name} max abs diff {diff:.2e}")
    assert diff <= TOL
    assert (torch.cat(steps, 1) - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_qwen3_window_default_and_null(tmp_path, model_type):
    """use_sliding_window without sliding_window: the config class's 4096; an explicit null: no window."""
    base = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 8192, "use_sliding_window": True, "max_window_layers": 0}
    if model_type == "qwen3_moe":
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert {spec.attention.window for spec in config_of(tmp_path).layers} == {4096}
    (tmp_path / "config.json").write_text(json.dumps({**base, "sliding_window": None}))
    assert {spec.attention.window for spec in config_of(tmp_path).layers} == {None}
