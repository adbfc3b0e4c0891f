"""Gated and plain MLPs against hand-written activation formulas (float64 references)."""

from __future__ import annotations

import math

import pytest
import torch

from llmparts.modules import build
from llmparts.specs import GatedMLPSpec, PlainMLPSpec

D_MODEL, HIDDEN = 12, 20


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


ACTS = {"silu": silu, "gelu_tanh": gelu_tanh, "gelu": gelu, "relu": relu}


def linear(x, w, b):
    y = x @ w.detach().double().T
    return y if b is None else y + b.detach().double()


def randomize(mod):
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.4)


def check(out: torch.Tensor, ref: torch.Tensor) -> float:
    """float32 vs float64: max abs diff relative to the output's scale (outputs reach ~10-30 here)."""
    rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-6, rel
    return rel


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp(activation, bias):
    mlp = build(GatedMLPSpec(hidden_dim=HIDDEN, activation=activation, bias=bias).resolve({}, "t"), d_model=D_MODEL)
    randomize(mlp)
    assert (mlp.gate_proj.bias is not None) == bias
    x = torch.randn(2, 5, D_MODEL) * 2
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    xd = x.double()
    ref = linear(ACTS[activation](linear(xd, g.weight, g.bias)) * linear(xd, u.weight, u.bias), d.weight, d.bias)
    check(mlp(x), ref)


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_plain_mlp(activation, bias):
    mlp = build(PlainMLPSpec(hidden_dim=HIDDEN, activation=activation, bias=bias).resolve({}, "t"), d_model=D_MODEL)
    randomize(mlp)
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(2, 5, D_MODEL) * 2
    u, d = mlp.up_proj, mlp.down_proj
    ref = linear(ACTS[activation](linear(x.double(), u.weight, u.bias)), d.weight, d.bias)
    check(mlp(x), ref)


def test_gelu_tanh_differs_from_exact_gelu():
    """The two GELUs are distinct choices (GeGLU in Gemma uses the tanh approximation)."""
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert (gelu_tanh(x) - gelu(x)).abs().max().item() > 1e-4
    spec = GatedMLPSpec(hidden_dim=HIDDEN, activation="gelu_tanh").resolve({}, "t")
    a = build(spec, d_model=D_MODEL)
    b = build(spec.replace(activation="gelu"), d_model=D_MODEL)
    randomize(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, D_MODEL) * 3
    assert not torch.allclose(a(x), b(x), atol=1e-6)
