"""One-line architecture swaps: each is a single override on the tiny Qwen3 config, and the result
trains (gradients on every parameter) and decodes through the cache exactly like a full forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmparts

SWAPS = {
    "mha": "attention.n_kv_heads=4",
    "mqa": "attention.n_kv_heads=1",
    "sliding-window": "attention.window=8",
    "nope-every-4th": "layers[3::4].position.type=none",
    "qk-norm-off": "attention.qk_norm=none",
    "untied-head": "tie_embeddings=false",
    "mla": "attention={type: mla, n_heads: 4, q_lora_rank: 48, kv_lora_rank: 32, qk_nope_head_dim: 16, "
           "qk_rope_head_dim: 8, v_head_dim: 24}",
    "mla-top-half-null-q": "layers[2:].attention={type: mla, n_heads: 4, kv_lora_rank: 32, qk_nope_head_dim: 16, "
                           "qk_rope_head_dim: 16, v_head_dim: 16}",
    "moe": "mlp={type: moe, n_experts: 4, top_k: 2, hidden_dim: 48, normalize: true}",
    "moe-deepseek-style": "mlp={type: moe, n_experts: 8, top_k: 2, hidden_dim: 32, router: sigmoid, correction_bias: true, "
                          "n_groups: 4, topk_groups: 2, normalize: true, scaling_factor: 2.0, shared_hidden_dim: 32}",
}


def check_swapped(model, name):
    c = model.config
    if name == "mha":
        assert all(b.attn.n_kv_heads == 4 for b in model.layers)
    elif name == "mqa":
        assert all(b.attn.k_proj.out_features == b.attn.head_dim for b in model.layers)
    elif name == "sliding-window":
        assert all(layer.attention.window == 8 for layer in c.layers)
    elif name == "nope-every-4th":
        assert [layer.position.type for layer in c.layers] == ["rope", "rope", "rope", "none"]
    elif name == "qk-norm-off":
        assert not any(hasattr(b.attn, "q_norm") for b in model.layers)
    elif name == "untied-head":
        assert model.head.weight is not model.embed.weight
    elif name.startswith("mla"):
        types = [layer.attention.type for layer in c.layers]
        assert types == (["mla"] * 4 if name == "mla" else ["gqa", "gqa", "mla", "mla"])
        dims = model.layers[-1].attn.cache_dims()
        assert dims == (1, 32 + c.layers[-1].attention.qk_rope_head_dim, 0)  # the latent cache
    elif name.startswith("moe"):
        assert all(layer.mlp.type == "moe" for layer in c.layers)
        assert model.num_active_parameters() < model.num_parameters()


@pytest.mark.parametrize("name", list(SWAPS))
def test_swap_trains_one_step(name):
    model = llmparts.build_model("tiny/qwen3", overrides=[SWAPS[name]], seed=1)
    check_swapped(model, name)
    ids = torch.randint(0, 256, (2, 24))
    loss = model(ids, labels=ids)
    logits = model(ids)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:  # MoE selection-only correction bias: adjusted outside backprop
            assert n.endswith("router.correction_bias"), n
            continue
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"zero gradient for {n}"
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    opt.zero_grad()
    assert model(ids, labels=ids).item() < loss.item()


@pytest.mark.parametrize("name", list(SWAPS))
def test_swap_cache_matches_full_forward(name):
    model = llmparts.build_model("tiny/qwen3", overrides=[SWAPS[name]], seed=2).eval()
    ids = torch.randint(0, 256, (2, 21))  # > 2 windows of 8
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 32)
        steps = [model(ids[:, :11], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(11, 21)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_labels_ignore_index():
    model = llmparts.build_model("tiny/qwen3")
    ids = torch.randint(0, 256, (1, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    logits = model(ids)
    manual = F.cross_entropy(logits[0, 4:-1], ids[0, 5:])
    assert torch.allclose(model(ids, labels=labels), manual, atol=1e-6)


def test_meta_build_allocates_nothing():
    model = llmparts.build_model("tiny/qwen3", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == llmparts.build_model("tiny/qwen3").num_parameters()


def test_build_is_seeded_and_dtype_applies():
    a = llmparts.build_model("tiny/qwen3", seed=3)
    b = llmparts.build_model("tiny/qwen3", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    m = llmparts.build_model("tiny/qwen3", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters()) and m.head.weight is m.embed.weight
    assert m(torch.randint(0, 256, (1, 5))).dtype == torch.float32


def test_sequence_longer_than_context_fails():
    model = llmparts.build_model("tiny/qwen3", overrides=["max_seq_len=16"])
    with pytest.raises(llmparts.ContextLengthError, match="beyond the model's context"):
        model(torch.randint(0, 256, (1, 17)))
