"""Normalisation layers. Statistics are always computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_module
from ..specs import LayerNormSpec, RMSNormSpec


@register_module("norm", "rmsnorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * (offset + w)``.

    eps is added inside the square root. Llama/Qwen (``cast: before_weight``) return
    ``w * y.to(dtype)``; Gemma/OLMo (``cast: after_weight``) multiply in float32 and cast last.
    Gemma stores ``w`` as an offset from one (``offset: 1.0``), so its weights initialise to zero.
    """

    def __init__(self, spec: RMSNormSpec, dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0 - self.spec.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.spec.eps)  # x / sqrt(mean(x^2) + eps), fused
        if self.spec.cast == "before_weight":
            w = self.weight + self.spec.offset if self.spec.offset else self.weight
            return w * y.to(dtype)
        return (y * (self.weight.float() + self.spec.offset)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.spec.eps}, offset={self.spec.offset}"


@register_module("norm", "layernorm")
class LayerNorm(nn.Module):
    """Layer norm (Ba et al. 2016) with float32 statistics and an optional bias."""

    def __init__(self, spec: LayerNormSpec, dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if spec.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), w.shape, w, b, self.spec.eps).to(x.dtype)
