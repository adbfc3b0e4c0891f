"""The Attention module against a naive float64 per-head loop (explicit kv-head repeat, explicit mask
loops, softmax written out, sinks and soft-capping by their formulas), plus SDPA/eager agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmparts.kv_cache import plan_without_cache
from llmparts.modules import build
from llmparts.modules.attention import eager_attention
from llmparts.specs import AttentionSpec, NoPESpec, RMSNormSpec, RopeSpec

D_MODEL, HEAD_DIM, THETA, EPS = 32, 8, 10000.0, 1e-6
CTX = {"d_model": D_MODEL, "max_seq_len": 128}
TOL = 1e-6  # measured max ~2.3e-7 (float32 module vs float64 loops)


def make_attention(**kw):
    spec = AttentionSpec(**{"n_heads": 4, "n_kv_heads": 2, "head_dim": HEAD_DIM, **kw}).resolve(CTX, "t")
    attn = build(spec, d_model=D_MODEL, norm=RMSNormSpec(eps=EPS).resolve({}, "t"))
    with torch.no_grad():  # non-trivial biases, norm weights and sinks (init makes them 0 / 1 / 0)
        for name, p in attn.named_parameters():
            if name.endswith("bias") or name == "sinks":
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in name:
                p.copy_(1 + torch.randn_like(p) * 0.3)
    return attn


def make_position(nope: bool = False):
    spec = NoPESpec() if nope else RopeSpec(theta=THETA)
    return build(spec.resolve({"rope_head_dim": HEAD_DIM, "max_seq_len": 128}, "t"))


def run(attn, x, pos, window=None, contiguous=True, nope=False):
    position = make_position(nope)
    plan = plan_without_cache(pos, window, contiguous=contiguous)
    return attn(x, position, position.tables(pos, x.dtype), plan)


# --------------------------------------------------------------------------- naive reference
def naive_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def naive_rope(x: torch.Tensor, p: int) -> torch.Tensor:
    """Rotate one head vector (D,) at position p, half layout: pairs (i, i + D/2)."""
    out = x.clone()
    h = HEAD_DIM // 2
    for i in range(h):
        a = p * THETA ** (-2 * i / HEAD_DIM)
        c, s = math.cos(a), math.sin(a)
        out[i] = x[i] * c - x[i + h] * s
        out[i + h] = x[i + h] * c + x[i] * s
    return out


def naive_attention(attn, x: torch.Tensor, pos: torch.Tensor, window: int | None, nope: bool = False) -> torch.Tensor:
    """Per batch row, per head, per query: float64, no batching tricks."""
    spec = attn.spec
    H, K, D = spec.n_heads, spec.n_kv_heads, spec.head_dim
    P = {n: p.detach().double() for n, p in attn.named_parameters()}
    x = x.double()
    B, T, _ = x.shape

    def lin(name, inp):
        y = inp @ P[f"{name}.weight"].T
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    out = torch.zeros(B, T, D_MODEL, dtype=torch.float64)
    scale = spec.scale if spec.scale is not None else 1 / math.sqrt(D)
    for b in range(B):
        q = lin("q_proj", x[b])  # (T, H*D)
        k = lin("k_proj", x[b])  # (T, K*D)
        v = lin("v_proj", x[b]).view(T, K, D)

        def qk_norm(q, k):
            if spec.qk_norm == "full":
                return naive_rms(q, P["q_norm.weight"]), naive_rms(k, P["k_norm.weight"])
            if spec.qk_norm == "per_head":
                q = naive_rms(q.view(T, H, D), P["q_norm.weight"]).reshape(T, H * D)
                k = naive_rms(k.view(T, K, D), P["k_norm.weight"]).reshape(T, K * D)
            return q, k

        if spec.qk_norm_position == "before_rope":
            q, k = qk_norm(q, k)
        q, k = q.view(T, H, D).clone(), k.view(T, K, D).clone()
        if not nope:
            for t in range(T):
                for h in range(H):
                    q[t, h] = naive_rope(q[t, h], int(pos[b, t]))
                for h in range(K):
                    k[t, h] = naive_rope(k[t, h], int(pos[b, t]))
        if spec.qk_norm_position == "after_rope":
            q, k = qk_norm(q.reshape(T, H * D), k.reshape(T, K * D))
            q, k = q.view(T, H, D), k.view(T, K, D)
        # explicit repeat: query head h uses kv head h // (H / K)
        k_rep = torch.stack([k[:, h // (H // K)] for h in range(H)], 1)
        v_rep = torch.stack([v[:, h // (H // K)] for h in range(H)], 1)
        heads = torch.zeros(T, H, D, dtype=torch.float64)
        for h in range(H):
            for i in range(T):
                keys = []
                for j in range(T):
                    pi, pj = int(pos[b, i]), int(pos[b, j])
                    if pj <= pi and (window is None or pi - pj < window):
                        keys.append(j)
                s = torch.stack([q[i, h] @ k_rep[j, h] for j in keys]) * scale
                if spec.softcap is not None:
                    s = spec.softcap * torch.tanh(s / spec.softcap)
                m = s.max()
                if attn.sinks is not None:
                    m = torch.maximum(m, P["sinks"][h])
                e = torch.exp(s - m)
                denom = e.sum()
                if attn.sinks is not None:
                    denom = denom + torch.exp(P["sinks"][h] - m)
                heads[i, h] = sum(e[n] * v_rep[j, h] for n, j in enumerate(keys)) / denom
        out[b] = lin("o_proj", heads.reshape(T, H * D))
    return out


def check(attn, T=9, B=2, window=None, contiguous=True, nope=False, pos=None) -> float:
    x = torch.randn(B, T, D_MODEL)
    if pos is None:
        pos = torch.arange(T)[None].expand(B, T)
    with torch.no_grad():
        out = run(attn, x, pos, window, contiguous, nope)
    ref = naive_attention(attn, x, pos, window, nope)
    diff = (out.double() - ref).abs().max().item()
    assert diff <= TOL, diff
    return diff


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["causal-flag", "explicit-mask"])
def test_heads_layouts(n_kv_heads, contiguous):
    attn = make_attention(n_kv_heads=n_kv_heads)
    assert attn.k_proj.out_features == n_kv_heads * HEAD_DIM
    check(attn, contiguous=contiguous)


@pytest.mark.parametrize("qkv_bias,out_bias", [(True, False), (False, True), (True, True)])
def test_biases(qkv_bias, out_bias):
    attn = make_attention(qkv_bias=qkv_bias, out_bias=out_bias)
    assert (attn.q_proj.bias is not None) == qkv_bias and (attn.o_proj.bias is not None) == out_bias
    check(attn)


@pytest.mark.parametrize("qk_norm", ["per_head", "full"])
@pytest.mark.parametrize("where", ["before_rope", "after_rope"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_qk_norm(qk_norm, where, n_kv_heads):
    attn = make_attention(qk_norm=qk_norm, qk_norm_position=where, n_kv_heads=n_kv_heads)
    width = HEAD_DIM if qk_norm == "per_head" else None
    assert attn.q_norm.weight.shape[0] == (width or 4 * HEAD_DIM)
    assert attn.k_norm.weight.shape[0] == (width or n_kv_heads * HEAD_DIM)
    check(attn)


def test_qk_norm_position_matters():
    """Full-width norm before vs after RoPE gives different outputs (so the tests above discriminate)."""
    a = make_attention(qk_norm="full", qk_norm_position="before_rope")
    b = make_attention(qk_norm="full", qk_norm_position="after_rope")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 9, D_MODEL)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        assert (run(a, x, pos) - run(b, x, pos)).abs().max().item() > 1e-4


@pytest.mark.parametrize("T", [3, 4, 11])  # shorter than, equal to and longer than the window
@pytest.mark.parametrize("window", [1, 4])
def test_sliding_window(T, window):
    attn = make_attention(window=window)
    check(attn, T=T, window=window)


@pytest.mark.parametrize("window", [None, 3])
def test_sinks(window):
    attn = make_attention(sinks=True, window=window)
    assert attn.sinks.shape == (4,)
    check(attn, T=8, window=window)


def test_sinks_formula_single_head():
    """eager_attention with a sink: out_i = sum_j e^{s_ij} v_j / (sum_j e^{s_ij} + e^{sink})."""
    T, D = 5, 4
    q, k, v = torch.randn(1, 1, T, D), torch.randn(1, 1, T, D), torch.randn(1, 1, T, D)
    sink = torch.tensor([0.7])
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    out = eager_attention(q, k, v, mask, 0.5, sinks=sink)
    for i in range(T):
        s = [math.exp(0.5 * float(q[0, 0, i] @ k[0, 0, j])) for j in range(i + 1)]
        num = sum(s[j] * v[0, 0, j].double() for j in range(i + 1))
        ref = num / (sum(s) + math.exp(0.7))
        assert (out[0, 0, i].double() - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("softcap", [0.5, 5.0])
def test_softcap(softcap):
    attn = make_attention(softcap=softcap)
    check(attn)


def test_softcap_sinks_window_together():
    check(make_attention(softcap=2.0, sinks=True, window=3, n_kv_heads=1, qkv_bias=True), T=10, window=3)


@pytest.mark.parametrize("softcap,sinks", [(None, False), (3.0, False), (None, True)])
def test_scale_override(softcap, sinks):
    attn = make_attention(scale=0.9, softcap=softcap, sinks=sinks)
    assert attn.scale == 0.9
    check(attn)


@pytest.mark.parametrize("extras", [{}, {"qk_norm": "per_head"}, {"sinks": True}, {"softcap": 3.0, "window": 3}])
def test_nope_attention(extras):
    """Without RoPE q/k stay strided views of the projections (exercises both attention paths)."""
    check(make_attention(**extras), nope=True, window=extras.get("window"))


def test_positions_not_starting_at_zero():
    """Per-row offsets through an explicit mask (positions of a continued sequence)."""
    attn = make_attention(sinks=True)
    T = 6
    pos = torch.stack([torch.arange(T) + 5, torch.arange(T) + 17])
    check(attn, T=T, contiguous=False, pos=pos)


# ---------------------------------------------------------------------------------- properties
def test_n_kv_heads_default_is_mha():
    spec = AttentionSpec(n_heads=4, head_dim=HEAD_DIM).resolve(CTX, "t")
    assert spec.n_kv_heads == 4
    assert AttentionSpec(n_heads=4).resolve(CTX, "t").head_dim == D_MODEL // 4


@pytest.mark.parametrize("extras", [{}, {"sinks": True}, {"softcap": 4.0}, {"window": 3}])
@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv_heads, extras):
    """GQA == MHA whose k/v projections repeat each kv head for its H/K query heads."""
    gqa = make_attention(n_kv_heads=n_kv_heads, qkv_bias=True, qk_norm="per_head", **extras)
    mha = make_attention(n_kv_heads=4, qkv_bias=True, qk_norm="per_head", **extras)
    rep = 4 // n_kv_heads
    sd = {k: v.clone() for k, v in gqa.state_dict().items()}
    for name in ("k_proj", "v_proj"):
        w = sd[f"{name}.weight"].view(n_kv_heads, HEAD_DIM, D_MODEL)
        sd[f"{name}.weight"] = w.repeat_interleave(rep, 0).reshape(4 * HEAD_DIM, D_MODEL)
        sd[f"{name}.bias"] = sd[f"{name}.bias"].view(n_kv_heads, HEAD_DIM).repeat_interleave(rep, 0).flatten()
    mha.load_state_dict(sd)
    x = torch.randn(2, 8, D_MODEL)
    pos = torch.arange(8)[None].expand(2, 8)
    with torch.no_grad():
        a = run(gqa, x, pos, extras.get("window"))
        b = run(mha, x, pos, extras.get("window"))
    assert (a - b).abs().max().item() <= 1e-6


def test_explicit_n_kv_equal_n_heads_same_as_default():
    a = make_attention(n_kv_heads=4, qkv_bias=True)
    spec = AttentionSpec(n_heads=4, head_dim=HEAD_DIM, qkv_bias=True).resolve(CTX, "t")
    b = build(spec, d_model=D_MODEL, norm=RMSNormSpec().resolve({}, "t"))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, D_MODEL)
    pos = torch.arange(6)[None].expand(2, 6)
    with torch.no_grad():
        assert torch.equal(run(a, x, pos), run(b, x, pos))


@pytest.mark.parametrize("K", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random", "rect-causal"])
def test_eager_matches_sdpa(K, mask_kind):
    B, H, T, S, D = 2, 4, 6, 6, HEAD_DIM
    if mask_kind == "rect-causal":
        S = 9  # decode-like: T queries at the end of S keys
    q = torch.randn(B, H, T, D)
    k, v = torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "random":
        mask = torch.rand(B, 1, T, S) > 0.5
        mask[..., 0] = True  # at least one visible key per row
    else:
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(B, 1, T, S)
    scale = 0.37
    eager = eager_attention(q, k, v, mask, scale)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1), attn_mask=mask, scale=scale
    )
    assert (eager - ref).abs().max().item() <= 1e-6


def test_eager_fully_masked_row_is_finite():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    assert torch.isfinite(eager_attention(q, k, v, mask, 0.5)).all()
