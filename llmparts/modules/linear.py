"""``Linear``: ``nn.Linear`` whose matrix-vector products compile to one streaming kernel.

Decoding one token multiplies every weight matrix by a single vector, so its speed is how fast the
weights stream from memory. On CPUs the BLAS ``gemv`` behind ``F.linear`` reaches only about half of
the machine's read bandwidth for the wide matrices of an LLM (measured: 14-17 GB/s of ~30 in
float32; see docs/benchmarks.md). Written as a broadcast multiply and a sum over the input dim,
``torch.compile``'s inductor fuses the product into a vectorised, multi-threaded reduction that
reads each weight once at close to full bandwidth, in float32 or bfloat16 (accumulating in float32).
Eager execution would materialise the product, so this form is used only while compiling and only
for a few rows (decode); everything else is ``F.linear``. Parameter names are nn.Linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MATVEC_MAX_ROWS = 8  # rows (batch x tokens) up to which a compiled linear streams as a reduction


def materialized(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself; under ``torch.compile`` it makes inductor compute ``t`` once into a buffer.

    Inductor otherwise inlines the elementwise ops that produce a reduction's input (an RMSNorm,
    a bfloat16-to-float32 cast) into the reduction's inner loop: a matrix-vector product then
    recomputes its input vector for every weight row. That costs instructions, not memory traffic,
    and bfloat16 products are bound by instructions here: realising the float32 input vector first
    took a bfloat16 3072x1024 product from 19-24 to 31-40 GB/s (docs/benchmarks.md). An identity
    ``as_strided`` is the op whose lowering realises its input.
    """
    return torch.as_strided(t, t.shape, t.stride())


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` as ``(x[..., None, :] * weight).sum(-1)`` in float32, cast back."""
    y = (materialized(x.float()).unsqueeze(-2) * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except under ``torch.compile`` for at most :data:`MATVEC_MAX_ROWS` rows."""
    if torch.compiler.is_compiling() and x.numel() <= MATVEC_MAX_ROWS * x.shape[-1]:
        return matvec(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and init) whose compiled decode-time products stream weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
