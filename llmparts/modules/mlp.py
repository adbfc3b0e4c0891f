"""Feed-forward layers: gated (SwiGLU, GeGLU) and plain."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_module
from .linear import Linear
from ..specs import GatedMLPSpec, PlainMLPSpec

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_pytorch_tanh"
    "gelu": F.gelu,
    "relu": F.relu,
}


@register_module("mlp", "gated")
class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (Shazeer 2020). SwiGLU in Llama/Qwen, GeGLU (tanh) in Gemma."""

    def __init__(self, spec: GatedMLPSpec, d_model: int) -> None:
        super().__init__()
        self.spec = spec
        self.act = ACTIVATIONS[spec.activation]
        self.gate_proj = Linear(d_model, spec.hidden_dim, bias=spec.bias)
        self.up_proj = Linear(d_model, spec.hidden_dim, bias=spec.bias)
        self.down_proj = Linear(spec.hidden_dim, d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.down_proj(self.act(gate) * up)
        # inference: reuse the gate's buffer (saves two (T, hidden) allocations per layer in prefill)
        return self.down_proj(self.act(gate).mul_(up) if self.act is not F.silu else F.silu(gate, inplace=True).mul_(up))


@register_module("mlp", "plain")
class PlainMLP(nn.Module):
    """``down(act(up(x)))``: the two-layer MLP of the original transformer and GPT-2."""

    def __init__(self, spec: PlainMLPSpec, d_model: int) -> None:
        super().__init__()
        self.spec = spec
        self.act = ACTIVATIONS[spec.activation]
        self.up_proj = Linear(d_model, spec.hidden_dim, bias=spec.bias)
        self.down_proj = Linear(spec.hidden_dim, d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
