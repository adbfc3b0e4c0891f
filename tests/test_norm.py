"""RMSNorm and LayerNorm against hand-written formulas (float64 references, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmparts.modules import build
from llmparts.specs import LayerNormSpec, RMSNormSpec

DIM = 16


def rmsnorm(spec: RMSNormSpec, weight: torch.Tensor | None = None):
    norm = build(spec.resolve({}, "t"), dim=DIM)
    if weight is not None:
        with torch.no_grad():
            norm.weight.copy_(weight)
    return norm


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |v| (8 significant bits)."""
    v = v.double().abs().clamp_min(2.0**-120)
    return torch.exp2(torch.floor(torch.log2(v)) - 7)


def rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + w), everything in float64."""
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (offset + w.double())


# ------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_float32_matches_formula(offset):
    w = torch.randn(DIM)
    norm = rmsnorm(RMSNormSpec(eps=1e-6, offset=offset), w)
    x = torch.randn(2, 5, DIM) * 3
    out = norm(x)
    assert out.dtype == torch.float32
    diff = (out.double() - rms_reference(x, w, 1e-6, offset)).abs().max().item()
    assert diff <= 1e-5, diff


def test_rmsnorm_init_is_identity_scale():
    """The stored weight is initialised so that the effective scale (offset + w) is one."""
    for offset in (0.0, 1.0):
        norm = rmsnorm(RMSNormSpec(offset=offset))
        assert torch.equal(norm.weight + offset, torch.ones(DIM))
        x = torch.randn(3, DIM)
        ref = rms_reference(x, torch.zeros(DIM), 1e-6, 1.0)
        assert (norm(x).double() - ref).abs().max().item() <= 1e-6


def test_rmsnorm_eps_inside_sqrt():
    """With small inputs eps dominates: x / sqrt(ms + eps) differs a lot from x / (sqrt(ms) + eps)."""
    eps = 1e-2
    w = torch.ones(DIM)
    norm = rmsnorm(RMSNormSpec(eps=eps), w)
    x = torch.randn(4, DIM) * 1e-2
    out = norm(x).double()
    inside = rms_reference(x, w, eps, 0.0)
    xd = x.double()
    outside = xd / (torch.sqrt((xd * xd).mean(-1, keepdim=True)) + eps)
    assert (inside - outside).abs().max().item() > 0.1  # the two conventions really differ here
    assert (out - inside).abs().max().item() <= 1e-6


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("cast", ["before_weight", "after_weight"])
def test_rmsnorm_bfloat16_cast_placement(cast, offset):
    """bf16 module and input: before_weight = (offset + w) * y.to(bf16) (a bf16 multiply);
    after_weight = (y * (offset + w.float())).to(bf16). y is computed in float32."""
    eps = 1e-6
    w = torch.randn(DIM) * 0.5 + (0.0 if offset else 1.0)
    norm = rmsnorm(RMSNormSpec(eps=eps, offset=offset, cast=cast), w).to(torch.bfloat16)
    wb = norm.weight.detach()  # bf16 weight as stored
    x = (torch.randn(3, 7, DIM) * 2).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    x32 = x.float()
    y = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "before_weight":
        scale = wb + offset if offset else wb  # bf16 arithmetic, like HF Llama/Qwen
        ref = scale * y.to(torch.bfloat16)
    else:
        ref = (y * (wb.float() + offset)).to(torch.bfloat16)
    assert ref.dtype == torch.bfloat16
    # rsqrt vs 1/sqrt may differ by one float32 ulp, which can flip a bf16 rounding: allow one bf16 ulp
    diff = (out.float() - ref.float()).abs()
    assert (diff <= bf16_ulp(ref)).all(), diff.max().item()
    assert (out == ref).float().mean().item() > 0.95


def test_rmsnorm_bfloat16_before_and_after_weight_differ():
    """The cast position is observable in bf16 (so the test above can tell them apart)."""
    w = torch.randn(DIM) * 0.7 + 1.3
    before = rmsnorm(RMSNormSpec(cast="before_weight"), w).to(torch.bfloat16)
    after = rmsnorm(RMSNormSpec(cast="after_weight"), w).to(torch.bfloat16)
    x = torch.randn(8, 32, DIM).to(torch.bfloat16)
    assert not torch.equal(before(x), after(x))


def test_rmsnorm_statistics_in_float32_for_large_bf16():
    """Large bf16 inputs: the result is the float64 value rounded once to bf16 (<= half a bf16 ulp,
    plus float32 noise). Computing mean(x^2)/rsqrt in bf16 would add several bf16 roundings."""
    norm = rmsnorm(RMSNormSpec(eps=1e-6)).to(torch.bfloat16)
    x = (torch.randn(64, DIM) * 3000 + 5000).to(torch.bfloat16)
    out = norm(x).float().double()
    ref = rms_reference(x.float(), torch.ones(DIM), 1e-6, 0.0)
    bound = 0.5 * bf16_ulp(ref) * (1 + 1e-4)  # one rounding to bf16 (+ float32 noise)
    assert ((out - ref).abs() <= bound).all(), ((out - ref).abs() / bound).max().item()
    # a bf16-statistics implementation is measurably worse on the same data
    xb = x
    naive = (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-6)).double()
    assert ((naive - ref).abs() > bound).any()


def test_rmsnorm_rejects_bad_eps():
    from llmparts.errors import ConfigError

    with pytest.raises(ConfigError):
        RMSNormSpec(eps=0.0).resolve({}, "t")


# ---------------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch_and_formula(bias):
    eps = 1e-5
    norm = build(LayerNormSpec(eps=eps, bias=bias).resolve({}, "t"), dim=DIM)
    assert (norm.bias is not None) == bias
    with torch.no_grad():
        norm.weight.copy_(torch.randn(DIM))
        if bias:
            norm.bias.copy_(torch.randn(DIM))
    x = torch.randn(2, 6, DIM) * 2 + 0.5
    out = norm(x)
    b = norm.bias if bias else None
    torch_ref = F.layer_norm(x, (DIM,), norm.weight, b, eps)
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    formula = (xd - mean) / torch.sqrt(var + eps) * norm.weight.double()
    if bias:
        formula = formula + norm.bias.double()
    assert (out - torch_ref).abs().max().item() <= 1e-6
    assert (out.double() - formula).abs().max().item() <= 1e-5


def test_layernorm_bfloat16_statistics_in_float32():
    norm = build(LayerNormSpec().resolve({}, "t"), dim=DIM).to(torch.bfloat16)
    x = (torch.randn(4, DIM) * 100 + 1000).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    ref = F.layer_norm(x.float(), (DIM,), eps=1e-5).to(torch.bfloat16)
    assert torch.equal(out, ref)
