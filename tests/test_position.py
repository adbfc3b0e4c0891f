"""RoPE frequencies against transformers' own init functions; rotation layouts against HF's
``apply_rotary_pos_emb`` and a naive complex rotation; partial rotary, relative-position property,
NoPE and the YaRN attention factor."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmparts.modules import build
from llmparts.modules.position import rope_inv_freq
from llmparts.specs import (
    DefaultRopeScaling,
    Llama3RopeScaling,
    LinearRopeScaling,
    NoPESpec,
    RopeSpec,
    YarnRopeScaling,
)

transformers.logging.set_verbosity_error()  # HF warns about factor/max_position mismatches; irrelevant here

HEAD_DIM = 16


def rope(head_dim: int = HEAD_DIM, max_seq_len: int = 128, **kw):
    return build(RopeSpec(**kw).resolve({"rope_head_dim": head_dim, "max_seq_len": max_seq_len}, "t"))


def hf_config(rope_parameters: dict, head_dim: int = HEAD_DIM, max_pos: int = 128) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_pos,
        rope_parameters=dict(rope_parameters),
    )


def hf_inv_freq(rope_parameters: dict, head_dim: int = HEAD_DIM, max_pos: int = 128) -> tuple[torch.Tensor, float]:
    cfg = hf_config(rope_parameters, head_dim, max_pos)
    kind = rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")


def ours(theta: float, scaling, head_dim: int = HEAD_DIM, max_pos: int = 128) -> tuple[torch.Tensor, float]:
    spec = RopeSpec(theta=theta, scaling=scaling).resolve({"rope_head_dim": head_dim, "max_seq_len": max_pos}, "t")
    return rope_inv_freq(spec.theta, spec.rotary_dim, spec.scaling)


def check_same(mine: tuple[torch.Tensor, float], theirs: tuple[torch.Tensor, float]) -> float:
    inv, attn = mine
    ref, ref_attn = theirs
    assert inv.dtype == torch.float32 and inv.shape == ref.shape
    diff = ((inv.double() - ref.double()).abs() / ref.double().abs()).max().item()
    assert diff <= 1e-6, diff  # same float32 arithmetic: equal to the last bit in practice
    assert attn == pytest.approx(ref_attn, rel=1e-12)
    return diff


# ------------------------------------------------------------------------ inverse frequencies
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [8, 16, 64])
def test_default_inv_freq_matches_transformers(theta, head_dim):
    mine = ours(theta, DefaultRopeScaling(), head_dim)
    check_same(mine, hf_inv_freq({"rope_type": "default", "rope_theta": theta}, head_dim))
    # and the textbook formula
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    assert torch.allclose(mine[0].double(), theta ** (-2 * i / head_dim), rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_linear_inv_freq_matches_transformers(factor):
    mine = ours(10000.0, LinearRopeScaling(factor=factor))
    check_same(mine, hf_inv_freq({"rope_type": "linear", "rope_theta": 10000.0, "factor": factor}))


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192),
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64),  # all three bands
        dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=128),
    ],
)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_llama3_inv_freq_matches_transformers(params, head_dim):
    theta = 500000.0
    mine = ours(theta, Llama3RopeScaling(**params), head_dim)
    hf = {
        "rope_type": "llama3", "rope_theta": theta, "factor": params["factor"],
        "low_freq_factor": params["low_freq_factor"], "high_freq_factor": params["high_freq_factor"],
        "original_max_position_embeddings": params["original_max_seq_len"],
    }
    check_same(mine, hf_inv_freq(hf, head_dim))


YARN_CASES = {
    "truncate": dict(factor=4.0, original_max_seq_len=64, truncate=True),
    "no-truncate": dict(factor=4.0, original_max_seq_len=64, truncate=False),
    "no-truncate-betas": dict(factor=8.0, original_max_seq_len=256, truncate=False, beta_fast=16.0, beta_slow=2.0),
    "mscale": dict(factor=40.0, original_max_seq_len=128, mscale=1.0, mscale_all_dim=0.707),
    "mscale-equal": dict(factor=40.0, original_max_seq_len=128, mscale=1.0, mscale_all_dim=1.0),
    "mscale-only": dict(factor=4.0, original_max_seq_len=64, mscale=0.707),  # ignored without mscale_all_dim
    "attention-factor": dict(factor=4.0, original_max_seq_len=64, attention_factor=1.3),
    "attention-factor-no-truncate": dict(factor=4.0, original_max_seq_len=64, attention_factor=0.8, truncate=False),
    "factor-below-one": dict(factor=1.0, original_max_seq_len=64),
}


@pytest.mark.parametrize("name", list(YARN_CASES))
@pytest.mark.parametrize("head_dim", [16, 64])
def test_yarn_inv_freq_matches_transformers(name, head_dim):
    p = YARN_CASES[name]
    theta = 10000.0
    mine = ours(theta, YarnRopeScaling(**p), head_dim, max_pos=4096)
    hf = {"rope_type": "yarn", "rope_theta": theta, "factor": p["factor"],
          "original_max_position_embeddings": p["original_max_seq_len"]}
    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
        if key in p:
            hf[key] = p[key]
    check_same(mine, hf_inv_freq(hf, head_dim, max_pos=4096))


def test_yarn_attention_factor_formulas():
    """0.1 ln(s) + 1 by default; mscale ratio with both mscale and mscale_all_dim (DeepSeek)."""
    s = YarnRopeScaling(factor=16.0, original_max_seq_len=64).resolve({"max_seq_len": 1024}, "t")
    assert s.attention_factor == pytest.approx(0.1 * math.log(16.0) + 1.0)
    d = YarnRopeScaling(factor=40.0, mscale=1.0, mscale_all_dim=0.5).resolve({"max_seq_len": 1024}, "t")
    expected = (0.1 * 1.0 * math.log(40.0) + 1.0) / (0.1 * 0.5 * math.log(40.0) + 1.0)
    assert d.attention_factor == pytest.approx(expected)


def test_yarn_factor_derived_from_max_seq_len():
    """factor: null is max_seq_len / original_max_seq_len, as transformers derives it."""
    spec = YarnRopeScaling(factor=None, original_max_seq_len=64).resolve({"max_seq_len": 512}, "t")
    assert spec.factor == 8.0
    mine = rope_inv_freq(10000.0, HEAD_DIM, spec)
    hf = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None, "original_max_position_embeddings": 64}
    check_same(mine, hf_inv_freq(hf, HEAD_DIM, max_pos=512))


# ----------------------------------------------------------------------------------- rotation
def hf_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, attention_scaling: float = 1.0):
    freqs = pos[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


@pytest.mark.parametrize("scaling", ["default", "llama3", "yarn"])
def test_rotate_half_matches_transformers(scaling):
    if scaling == "default":
        kw, hf = {}, {"rope_type": "default", "rope_theta": 10000.0}
    elif scaling == "llama3":
        kw = {"scaling": Llama3RopeScaling(factor=8.0, original_max_seq_len=32)}
        hf = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    else:
        kw = {"scaling": YarnRopeScaling(factor=4.0, original_max_seq_len=32)}
        hf = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    mod = rope(theta=10000.0, layout="half", **kw)
    B, H, T = 2, 3, 40
    pos = torch.stack([torch.arange(T), torch.arange(T) + 50])  # different positions per row
    q, k = torch.randn(B, H, T, HEAD_DIM), torch.randn(B, 1, T, HEAD_DIM)
    tables = mod.tables(pos, torch.float32)
    inv, attn = hf_inv_freq(hf)
    cos, sin = hf_cos_sin(inv, pos, attn)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    dq = (mod.rotate(q, tables) - q_ref).abs().max().item()
    dk = (mod.rotate(k, tables) - k_ref).abs().max().item()
    assert max(dq, dk) <= 1e-6, (dq, dk)


def naive_complex_rotation(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i+1) as complex numbers, multiplied by e^{i pos theta_i} (float64)."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    angle = pos.double()[:, None, :, None] * inv_freq.double()  # (B, 1, T, D/2)
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def test_rotate_interleaved_matches_complex_rotation():
    mod = rope(theta=10000.0, layout="interleaved")
    B, H, T = 2, 3, 20
    pos = torch.stack([torch.arange(T), torch.arange(T) * 3 + 7])
    x = torch.randn(B, H, T, HEAD_DIM)
    out = mod.rotate(x, mod.tables(pos, torch.float32))
    ref = naive_complex_rotation(x, pos, mod.inv_freq(torch.device("cpu")))
    diff = (out.double() - ref).abs().max().item()
    assert diff <= 1e-5, diff


def test_half_and_interleaved_are_permutations_of_each_other():
    """Half layout on x equals interleaved layout on x permuted (i, i+D/2) -> (2i, 2i+1)."""
    half, inter = rope(layout="half"), rope(layout="interleaved")
    pos = torch.arange(12)[None]
    x = torch.randn(1, 2, 12, HEAD_DIM)
    perm = torch.stack((torch.arange(HEAD_DIM // 2), torch.arange(HEAD_DIM // 2) + HEAD_DIM // 2), -1).flatten()
    a = half.rotate(x, half.tables(pos, torch.float32))[..., perm]
    b = inter.rotate(x[..., perm], inter.tables(pos, torch.float32))
    assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_partial_rotary_leaves_tail_unchanged(layout):
    rot = 6
    mod = rope(head_dim=HEAD_DIM, rotary_dim=rot, layout=layout, theta=100.0)
    pos = torch.arange(10)[None].expand(2, 10)
    x = torch.randn(2, 3, 10, HEAD_DIM)
    out = mod.rotate(x, mod.tables(pos, torch.float32))
    assert torch.equal(out[..., rot:], x[..., rot:])
    # the head is a full rotary embedding of width `rot` (frequencies 1 / theta^(2i / rot))
    inv = 1.0 / (100.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    assert torch.allclose(mod.inv_freq(torch.device("cpu")).double(), inv, rtol=1e-6)
    if layout == "interleaved":
        ref = naive_complex_rotation(x[..., :rot], pos, inv)
    else:
        perm = torch.stack((torch.arange(rot // 2), torch.arange(rot // 2) + rot // 2), -1).flatten()
        inverse = torch.argsort(perm)
        ref = naive_complex_rotation(x[..., :rot][..., perm], pos, inv)[..., inverse]
    assert (out[..., :rot].double() - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(out[..., :rot], x[..., :rot])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_dot_product_depends_only_on_relative_offset(layout, rotary_dim):
    mod = rope(layout=layout, rotary_dim=rotary_dim, theta=10000.0)
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)

    def score(m: int, n: int) -> float:
        pos = torch.tensor([[m, n]])
        x = torch.stack((q, k))[None, None]  # (1, 1, 2, D)
        r = mod.rotate(x, mod.tables(pos, torch.float32))[0, 0]
        return float(r[0] @ r[1])

    for m, n in [(3, 1), (10, 10), (5, 9), (0, 7)]:
        base = score(m, n)
        for shift in (1, 13, 40):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    assert abs(score(5, 1) - score(5, 3)) > 1e-3  # and it does depend on the offset


def test_nope_leaves_inputs_unchanged():
    mod = build(NoPESpec().resolve({"rope_head_dim": HEAD_DIM, "max_seq_len": 128}, "t"))
    pos = torch.arange(5)[None]
    x = torch.randn(1, 2, 5, HEAD_DIM)
    tables = mod.tables(pos, torch.float32)
    assert tables is None
    assert torch.equal(mod.rotate(x, tables), x)
    assert list(mod.parameters()) == []


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_yarn_attention_factor_scales_norm(layout):
    scaling = YarnRopeScaling(factor=16.0, original_max_seq_len=32)
    mod = rope(layout=layout, scaling=scaling)
    factor = 0.1 * math.log(16.0) + 1.0
    assert mod.attention_factor == pytest.approx(factor)
    pos = torch.arange(30)[None]
    x = torch.randn(1, 2, 30, HEAD_DIM)
    out = mod.rotate(x, mod.tables(pos, torch.float32))
    ratio = out.double().norm(dim=-1) / x.double().norm(dim=-1)
    assert (ratio - factor).abs().max().item() <= 1e-5
    plain = rope(layout=layout)  # no scaling: a rotation preserves the norm
    out = plain.rotate(x, plain.tables(pos, torch.float32))
    assert (out.norm(dim=-1) / x.norm(dim=-1) - 1).abs().max().item() <= 1e-5


def test_compute_dtype_in_bfloat16():
    """``model``: cos/sin cast to bf16 and the rotation done in bf16; ``float32``: rotate in float32, cast once."""
    pos = torch.arange(20)[None] + 100
    x = torch.randn(1, 2, 20, HEAD_DIM).to(torch.bfloat16)
    inv = rope().inv_freq(torch.device("cpu"))
    freqs = pos.float()[..., None] * inv
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    h = HEAD_DIM // 2

    def rot(x, cos, sin):
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    m = rope(compute_dtype="model")
    out = m.rotate(x, m.tables(pos, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rot(x, cos.to(torch.bfloat16), sin.to(torch.bfloat16)))
    f = rope(compute_dtype="float32")
    out = f.rotate(x, f.tables(pos, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rot(x.float(), cos, sin).to(torch.bfloat16))
