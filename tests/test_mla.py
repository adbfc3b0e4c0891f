"""Multi-head latent attention: parity with transformers' DeepseekV3Attention on the same weights
(full and low-rank queries, biases, YaRN with mscale_all_dim), naive == absorbed evaluation, and a
whole tiny MLA model whose latent-cache decode (ring buffer included) equals its full forward."""

from __future__ import annotations

import pytest
import torch

import llmparts
from llmparts.kv_cache import plan_without_cache
from llmparts.modules.mla import MLA

VOCAB, D_MODEL, H, Q_RANK, KV_RANK, NOPE, ROPE, V = 64, 64, 4, 16, 32, 16, 8, 12
TOL = 1e-5  # measured: HF parity 2.4e-7, naive vs absorbed 2.1e-7 (outputs) / 1.8e-6 (logits), cache 2.7e-6 (logits)
YARN = {"factor": 4.0, "original_max_seq_len": 32, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.707, "mscale_all_dim": 1.0}


def config(q_lora: int | None = Q_RANK, yarn: bool = False, bias: bool = False, window: int | None = None,
           n_layers: int = 2) -> dict:
    position = {"type": "rope", "theta": 10000.0, "layout": "interleaved"}
    if yarn:
        position["scaling"] = {"type": "yarn", **YARN}
    cfg = {
        "vocab_size": VOCAB, "d_model": D_MODEL, "n_layers": n_layers, "max_seq_len": 128, "init_std": 0.1,
        "attention": {"type": "mla", "n_heads": H, "q_lora_rank": q_lora, "kv_lora_rank": KV_RANK,
                      "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V, "bias": bias,
                      "latent_norm_eps": 1e-6},
        "position": position,
        "norm": {"type": "rmsnorm", "eps": 1e-5},  # the latent norms must use 1e-6, like transformers
        "mlp": {"type": "gated", "hidden_dim": 96, "activation": "silu"},
    }
    if window is not None:  # layer 0 slides, layer 1 attends to everything
        cfg["overrides"] = [{"layers": [0], "attention": {"window": window}}]
    return cfg


def tiny_model(**kw):
    model = llmparts.build_model(config(**kw), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm weights and biases (init makes them 1 / 0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def layer0(model):
    """The first layer's MLA module and its position module."""
    return model.layers[0].attn, model.positions[model._position_key[0]]


def run_attn(attn: MLA, position, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
    B, T, _ = x.shape
    pos = torch.arange(T).expand(B, T)
    plan = plan_without_cache(pos, window, contiguous=True)
    return attn(x, position, position.tables(pos, x.dtype), plan)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------ transformers parity
def hf_attention(q_lora: int | None, yarn: bool, bias: bool):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": YARN["factor"],
                "original_max_position_embeddings": YARN["original_max_seq_len"], "beta_fast": YARN["beta_fast"],
                "beta_slow": YARN["beta_slow"], "mscale": YARN["mscale"], "mscale_all_dim": YARN["mscale_all_dim"]}
    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora,
        kv_lora_rank=KV_RANK, qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=V, rope_interleave=True,
        attention_bias=bias, max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=rope,
        num_hidden_layers=1, attn_implementation="eager",
    )
    return DeepseekV3Attention(cfg, layer_idx=0).eval(), DeepseekV3RotaryEmbedding(cfg)


HF_NAMES = {"kv_a_proj_with_mqa": "kv_a_proj", "kv_a_layernorm": "kv_a_norm", "q_a_layernorm": "q_a_norm"}


@pytest.mark.parametrize("q_lora, yarn, bias", [(Q_RANK, False, False), (None, False, True), (Q_RANK, True, True),
                                                (None, True, False)])
def test_matches_transformers(q_lora, yarn, bias):
    model = tiny_model(q_lora=q_lora, yarn=yarn, bias=bias)
    attn, position = layer0(model)
    hf, hf_rope = hf_attention(q_lora, yarn, bias)
    ours = dict(attn.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            module, _, leaf = name.partition(".")
            p.copy_(ours[f"{HF_NAMES.get(module, module)}.{leaf}"])
    assert len(ours) == len(dict(hf.named_parameters()))
    assert attn.scale == pytest.approx(hf.scaling, rel=1e-12)  # YaRN: includes mscale(factor, mscale_all_dim)^2
    assert position.attention_factor == pytest.approx(hf_rope.attention_scaling, rel=1e-12)
    if yarn:
        assert attn.scale != pytest.approx((NOPE + ROPE) ** -0.5)  # the correction is really exercised
    assert attn.kv_a_norm.spec.eps == 1e-6 and model.layers[0].attn_norm.spec.eps == 1e-5

    B, T = 2, 11
    x = torch.randn(B, T, D_MODEL)
    pos = torch.arange(T).expand(B, T)
    cos, sin = hf_rope(x, pos)
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1).expand(B, 1, T, T)
    with torch.no_grad():
        ref = hf(x, (cos, sin), causal)[0]
        for absorb in (False, True):
            attn.absorb = absorb
            assert max_diff(run_attn(attn, position, x), ref) < TOL


# ------------------------------------------------------------------------ naive == absorbed
@pytest.mark.parametrize("q_lora", [Q_RANK, None])
@pytest.mark.parametrize("window", [None, 4])
def test_naive_equals_absorbed_without_cache(q_lora, window):
    attn, position = layer0(tiny_model(q_lora=q_lora))
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        attn.absorb = False
        naive = run_attn(attn, position, x, window)
        attn.absorb = True
        assert max_diff(run_attn(attn, position, x, window), naive) < TOL


@pytest.mark.parametrize("window", [None, 5])
def test_naive_equals_absorbed_with_cache(window):
    """Prefill + chunks through the latent cache, once with every step naive, once with every step absorbed."""
    model = tiny_model(window=window)
    ids = torch.randint(0, VOCAB, (2, 14))
    caches = {absorb: model.make_cache(2, 32) for absorb in (False, True)}
    with torch.no_grad():
        outs = {}
        for absorb, cache in caches.items():
            for block in model.layers:
                block.attn.absorb = absorb
            chunks = ((0, 6), (6, 7), (7, 10), (10, 14))
            outs[absorb] = torch.cat([model(ids[:, a:b], cache=cache) for a, b in chunks], 1)
    assert max_diff(outs[True], outs[False]) < TOL


def test_automatic_path_choice(monkeypatch):
    """absorb=None: naive without a cache or for long steps, absorbed for short cached steps."""
    model = tiny_model()
    attn = model.layers[0].attn
    calls: list[str] = []
    monkeypatch.setattr(attn, "_naive", lambda *a: calls.append("naive") or MLA._naive(attn, *a))
    monkeypatch.setattr(attn, "_absorbed", lambda *a: calls.append("absorbed") or MLA._absorbed(attn, *a))
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        model(ids[:, :3])
        cache = model.make_cache(1, 64)
        model(ids[:, :30], cache=cache)  # long prefill
        model(ids[:, 30:31], cache=cache)  # decode
    assert calls == ["naive", "naive", "absorbed"]


# ------------------------------------------------------------------------ latent cache, whole model
@pytest.mark.parametrize("q_lora", [Q_RANK, None])
@pytest.mark.parametrize("window", [None, 5])
def test_cache_decode_equals_full_forward(q_lora, window):
    model = tiny_model(q_lora=q_lora, window=window)
    B, T, P = 2, 16, 7  # prefill longer than the window, decode past twice the window
    ids = torch.randint(0, VOCAB, (B, T))
    cache = model.make_cache(B, 32)
    with torch.no_grad():
        full = model(ids)  # no cache: naive path
        steps = [model(ids[:, :P], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(P, T)]
    assert max_diff(torch.cat(steps, 1), full) < TOL
    # the cache holds the latent and the rotary key only: r + dr values per token per layer
    per_token = KV_RANK + ROPE
    assert model.cache_values_per_token() == 2 * per_token
    slots = [32 if window is None else window, 32]
    assert cache.nbytes() == B * per_token * sum(slots) * 4


def test_training_step_grads_every_parameter():
    model = tiny_model().train()
    ids = torch.randint(0, VOCAB, (2, 10))
    loss = model(ids, labels=ids)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(loss)


def test_parameter_names():
    full, low = tiny_model(q_lora=None).layers[0].attn, tiny_model(bias=True).layers[0].attn
    assert sorted(n for n, _ in full.named_parameters()) == [
        "kv_a_norm.weight", "kv_a_proj.weight", "kv_b_proj.weight", "o_proj.weight", "q_proj.weight"]
    assert sorted(n for n, _ in low.named_parameters()) == [
        "kv_a_norm.weight", "kv_a_proj.bias", "kv_a_proj.weight", "kv_b_proj.weight", "o_proj.bias", "o_proj.weight",
        "q_a_norm.weight", "q_a_proj.bias", "q_a_proj.weight", "q_b_proj.weight"]
    assert low.kv_b_proj.weight.shape == (H * (NOPE + V), KV_RANK)
    assert low.cache_dims() == (1, KV_RANK + ROPE, 0)
