"""``Linear``: ``nn.Linear`` whose matrix-vector products compile to one streaming kernel.

Decoding one token multiplies every weight matrix by a single vector, so its speed is how fast the
weights stream from memory. On CPUs the BLAS ``gemv`` behind ``F.linear`` reaches only about half of
the machine's read bandwidth for the wide matrices of an LLM (measured: 14-17 GB/s of ~30 in
float32; see docs/benchmarks.md). Written as a broadcast multiply and a sum over the input dim,
``torch.compile``'s inductor fuses the product into a vectorised, multi-threaded reduction that
reads each weight once at close to full bandwidth, in float32 or bfloat16 (accumulating in float32).
Eager execution would materialise the product, so this form is used only while compiling and only
for a few rows (decode); everything else is ``F.linear``. Parameter names are nn.Linear's.

On CPUs without native bfloat16/float16 matrix products (oneDNN reports none: AVX2-only x86, for
example), torch multiplies half-precision matrices with a generic loop, 5-8x slower than float32
BLAS at prefill sizes. There, products of :data:`UPCAST_MIN_ROWS` rows or more without gradients
convert the weight to float32, a slice at a time, and multiply in float32 (:func:`upcast_linear`):
the weights stay half precision in memory, the result is rounded to it, as the native product's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MATVEC_MAX_ROWS = 8  # rows (batch x tokens) up to which a compiled linear streams as a reduction
UPCAST_MIN_ROWS = 16  # rows from which an emulated half-precision product runs in float32 (8 rows: 0.8-1.1x)
UPCAST_CHUNK = 1 << 20  # weight values converted to float32 at a time: a 4 MB slice, used while still cached


def _native_half_matmul(dtype: torch.dtype) -> bool:
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: assume native, change nothing
        return True


# Per half dtype: whether this CPU lacks native matrix products in it (decided once, at import).
EMULATED_HALF = {dt: not _native_half_matmul(dt) for dt in (torch.bfloat16, torch.float16)}


def emulated_half(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CPU bfloat16/float16 tensor whose matrix products this CPU only emulates."""
    return t.device.type == "cpu" and EMULATED_HALF.get(t.dtype, False)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed in float32 and rounded to ``x.dtype``, the weight converted
    :data:`UPCAST_CHUNK` values (a slice of output features) at a time."""
    xf = x.float()
    step = max(1, UPCAST_CHUNK // max(1, weight.shape[-1]))
    starts = range(0, max(1, weight.shape[0]), step)  # (one empty slice for a weight without rows)
    parts = [F.linear(xf, weight[i : i + step].float(), None if bias is None else bias[i : i + step].float())
             .to(x.dtype) for i in starts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


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
    """``F.linear``, except under ``torch.compile`` for at most :data:`MATVEC_MAX_ROWS` rows
    (:func:`matvec`), and for emulated half precision from :data:`UPCAST_MIN_ROWS` rows without
    gradients (:func:`upcast_linear`; with gradients the float32 weight would be kept for backward)."""
    if torch.compiler.is_compiling() and x.numel() <= MATVEC_MAX_ROWS * x.shape[-1]:
        return matvec(x, weight, bias)
    if (emulated_half(weight) and x.dtype == weight.dtype and not torch.is_grad_enabled()
            and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]):
        return upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and init) whose compiled decode-time products stream weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
