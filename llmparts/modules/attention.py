"""Softmax attention for MHA, GQA and MQA — one module, chosen by ``n_kv_heads``.

Used by Llama 3, Qwen3, Mistral, Gemma3, OLMo2/3, SmolLM3 and GPT-OSS. Features are spec fields:
q/k/v and output biases, QK-norm (per head or over the full width, before or after RoPE), a
sliding window, learned per-head sinks (GPT-OSS), logit soft-capping and a softmax scale override.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import LayerKV, StepPlan
from ..registry import register_module
from .linear import Linear
from ..specs import AttentionSpec, Spec
from .position import Tables


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Exact reference attention (the path for sinks and soft-capping, which SDPA cannot express).

    q (B, H, T, D), k/v (B, K, S, D) with H a multiple of K; mask (B, 1, T, S) bool, True = visible.
    Logits are scaled after ``q @ k^T``, masked with the dtype's most negative finite value (so a
    fully masked row stays finite), soft-capped as ``c * tanh(s / c)`` before masking, and
    normalised in float32. A sink is one extra logit per head appended to every row and dropped
    after the softmax: ``out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sink})``.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, K, H // K, T, D)  # group query heads by the kv head they share
    scores = (qg @ k[:, :, None].transpose(-1, -2)).view(B, H, T, S) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        scores = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    out = probs.view(B, K, H // K, T, S) @ v[:, :, None]
    return out.view(B, H, T, v.shape[-1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention for a few query tokens (decode), as two batched matmuls per kv head (also MLA's
    absorbed attention: H query heads over one latent "kv head").

    SDPA's CPU kernel is built for long queries: for one decode token it reads a long cache slowly
    (float32, 4096 keys: 4 ms per layer against 1.8 here) and bfloat16 is slower still (7.5 ms
    against 0.7), measured on the benchmark machine (docs/benchmarks.md). On an H100 (torch 2.11)
    SDPA chose cuDNN's kernel, which spent 1.8 ms of CPU time per call preparing it (63% of an eager
    Qwen3-0.6B decode step), and inside a compiled decode step it broke the graph. The query heads sharing a
    kv head are folded into rows; float32 reads the keys as ``k @ q^T`` (rows of k contiguous), other
    dtypes as ``q @ k^T``. Softmax in float32; mask (B, 1, T, S) bool as in :func:`eager_attention`.
    Inside a compiled decode step both products are broadcast multiply-sums instead, which inductor
    turns into streaming float32 reductions over the cache (small bfloat16 ``bmm`` calls are slow on
    CPU: 0.12 ms each at 144 keys against 0.05 in float32, measured in the Qwen3-0.6B decode profile).
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = q.reshape(B, K, G * T, D)  # row g * T + t: query head k * G + g, token t
    compiling = torch.compiler.is_compiling()  # compiled decode step: both products as streaming reductions
    if compiling:
        scores = (qg.float()[..., :, None, :] * k.float()[..., None, :, :]).sum(-1)  # (B, K, G*T, S)
    elif q.dtype == torch.float32:
        scores = (k @ qg.transpose(-1, -2)).transpose(-1, -2)
    else:
        scores = qg @ k.transpose(-1, -2)
    scores = scores.float() * scale
    if mask is not None:
        m = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = (probs.float()[..., None] * v.float()[..., None, :, :]).sum(-2).to(v.dtype) if compiling else probs @ v
    return out.view(B, H, T, v.shape[-1])


DECODE_MAX_QUERIES = 16  # query rows (heads per kv head x tokens) up to which attention uses decode_attention


@register_module("attention", "gqa")
class Attention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` shared key/value heads (Ainslie et al. 2023).

    Args:
        spec: resolved :class:`~llmparts.specs.AttentionSpec` (n_kv_heads and head_dim filled).
        d_model: residual width.
        norm: norm spec used for QK-norm when ``spec.qk_norm`` is not ``none``.
    """

    def __init__(self, spec: AttentionSpec, d_model: int, norm: Spec) -> None:
        super().__init__()
        from . import build

        self.spec = spec
        H, K, D = spec.n_heads, spec.n_kv_heads or spec.n_heads, spec.head_dim or 0
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.scale = spec.scale if spec.scale is not None else D**-0.5
        self.q_proj = Linear(d_model, H * D, bias=spec.qkv_bias)
        self.k_proj = Linear(d_model, K * D, bias=spec.qkv_bias)
        self.v_proj = Linear(d_model, K * D, bias=spec.qkv_bias)
        self.o_proj = Linear(H * D, d_model, bias=spec.out_bias)
        if spec.qk_norm == "per_head":  # Qwen3, Gemma3: one weight of head_dim shared by all heads
            self.q_norm, self.k_norm = build(norm, dim=D), build(norm, dim=D)
        elif spec.qk_norm == "full":  # OLMo2: over the whole projected width, before the head split
            self.q_norm, self.k_norm = build(norm, dim=H * D), build(norm, dim=K * D)
        self.sinks = nn.Parameter(torch.zeros(H)) if spec.sinks else None

    def cache_dims(self) -> tuple[int, int, int]:
        return self.n_kv_heads, self.head_dim, self.head_dim

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H, D), k (B, T, K, D), before the heads move to dim 1."""
        if self.spec.qk_norm == "per_head":
            return self.q_norm(q), self.k_norm(k)
        B, T, H, D = q.shape  # full width (OLMo2): norm over (H * D) per token, then split heads again
        K = k.shape[2]
        return self.q_norm(q.reshape(B, T, H * D)).view(B, T, H, D), self.k_norm(k.reshape(B, T, K * D)).view(B, T, K, D)

    def project(self, x: torch.Tensor, position: nn.Module, tables: Tables) -> tuple[torch.Tensor, ...]:
        """x (B, T, d_model) -> rotated q (B, H, T, D), k (B, K, T, D) and v (B, K, T, D)."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, K, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        norm_first = self.spec.qk_norm != "none" and self.spec.qk_norm_position == "before_rope"
        if norm_first:
            q, k = self._qk_norm(q, k)
        q, k = position.rotate(q.transpose(1, 2), tables), position.rotate(k.transpose(1, 2), tables)
        if self.spec.qk_norm != "none" and not norm_first:
            q, k = self._qk_norm(q.transpose(1, 2), k.transpose(1, 2))
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, kv: LayerKV | None = None,
               start: int = 0) -> torch.Tensor:
        """Store this step's keys/values in the cache, attend; -> (B, T, H * D) before ``o_proj``."""
        if kv is not None:
            k, v = kv.update(k, v, plan, start)
        return self.attention(q, k, v, plan.mask, plan.is_causal)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  is_causal: bool) -> torch.Tensor:
        """q (B, H, T, D) over every key/value it may see (cached ones included); -> (B, T, H * D).
        ``mask`` (B, 1, T, S) bool or None; ``is_causal``: the last T keys are the queries, in order."""
        B, H, T, D = q.shape
        if self.sinks is not None or self.spec.softcap is not None:
            if mask is None and is_causal:
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
            out = eager_attention(q, k, v, mask, self.scale, self.spec.softcap, self.sinks)
        elif not is_causal and (H // self.n_kv_heads) * T <= DECODE_MAX_QUERIES:
            out = decode_attention(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                enable_gqa=self.n_kv_heads != H,
            )
        return out.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x: torch.Tensor, position: nn.Module, tables: Tables, plan: StepPlan,
                kv: LayerKV | None = None, start: int = 0) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). ``plan`` carries the mask; ``kv`` the layer's cache."""
        q, k, v = self.project(x, position, tables)
        return self.o_proj(self.attend(q, k, v, plan, kv, start))
