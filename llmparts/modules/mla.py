"""Multi-head Latent Attention (MLA): DeepSeek-V2 (arXiv 2405.04434), V2-Lite, V3, Kimi K2.

Every token is compressed to one latent ``c`` of ``kv_lora_rank`` (r) values, RMS-normalised, plus
one rotary key ``k_rope`` of ``qk_rope_head_dim`` (dr) values shared by all heads. Per head h::

    k_h = [W_UK(h) c, k_rope]      v_h = W_UV(h) c      q_h = [q_nope_h, q_rope_h]

with ``kv_b_proj.weight`` holding, per head, the rows ``[W_UK(h) (qk_nope_head_dim), W_UV(h)
(v_head_dim)]``. The cache keeps only ``[c, k_rope]``: r + dr values per token and layer (576 for
DeepSeek-V3, against 2 * 128 heads * 128 = 32768 for the equivalent multi-head cache). RoPE lives
only in the decoupled ``k_rope``/``q_rope`` dims because a rotation between ``W_UK`` and ``c``
would block the absorption below.

Two exact evaluations of the same logits, chosen by ``MLA.absorb`` (None = automatic):

* naive: up-project keys and values for all S cached tokens with ``kv_b_proj``, then ordinary
  attention over H heads of ``qk_nope + qk_rope`` dims (what transformers does). Cheapest when many
  queries share the keys (prefill, training).
* absorbed (DeepSeek-V2 section 2.1.2, "weight absorption"): associativity moves the up-projections
  onto the queries and the output, so attention runs in latent space and nothing per key is
  expanded::

      q_nope_h . (W_UK(h) c_s) = (q_nope_h W_UK(h)) . c_s         (scores)
      sum_s p_s W_UV(h) c_s    = W_UV(h) (sum_s p_s c_s)           (outputs)

  Per decode step it costs O(H (nope + v) r) for the absorption plus O(H S (2 r + dr)) for attention,
  instead of O(S H (nope + v) r) for re-expanding every cached key. Same math in another
  association order: float32 agrees to ~1e-6, not bitwise.

Numerics: the two latent norms use ``spec.latent_norm_eps`` when set, because transformers'
DeepSeek builds them with RMSNorm's default eps 1e-6 whatever ``rms_norm_eps`` says.
``spec.scale`` already holds YaRN's ``mscale(factor, mscale_all_dim) ** 2`` softmax correction.
RoPE: DeepSeek checkpoints store the rope dims as interleaved pairs (``position.layout:
interleaved``); transformers' ``rope_interleave`` rotates the pairs and writes the result
de-interleaved (half-split order) for both q and k. The same permutation of q and k leaves every
dot product unchanged, so our in-place interleaved rotation gives identical logits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.fx.experimental.symbolic_shapes import guard_or_true
except ImportError:  # torch < 2.8
    guard_or_true = bool

from ..kv_cache import LayerKV, StepPlan
from ..registry import register_module
from .attention import decode_attention
from .linear import Linear, matvec
from ..specs import MLASpec, Spec
from .position import Tables

# Automatic path choice: absorbed when a step attends over cached keys and at most this many queries
# arrive per step.
# The FLOP model puts the crossover at T ~ (nope + v) r / (2 r - nope - v), independent of H: ~170
# for DeepSeek-V2/V3 and Kimi K2 (nope = v = 128, r = 512). Measured on CPU (torch 2.13, float32,
# 2 threads, mean of 20) with DeepSeek-V2-Lite shapes (H 16), B 1, S 1024 cached keys:
#   T = 1: naive 29.9 ms, absorbed 0.6 ms     T = 16: naive 35.3 ms, absorbed 6.1 ms
#   T = 64: naive 35.9 ms, absorbed 16.3 ms   T = 128: naive 40.5 ms, absorbed 36.2 ms
# (at S 4096: T = 1 170 vs 2.6 ms; crossover between T 128 and 256 in both). 16 keeps a wide
# margin for devices where the naive path's fused SDPA kernels are relatively faster (unmeasured
# here) and for the absorbed path's materialised (B, H, T, S) float32 scores.
ABSORB_MAX_T = 16


@register_module("attention", "mla")
class MLA(nn.Module):
    """Multi-head latent attention with a latent KV cache.

    Args:
        spec: resolved :class:`~llmparts.specs.MLASpec` (``scale`` filled).
        d_model: residual width.
        norm: the layer's norm spec; the latent norms use it with ``spec.latent_norm_eps`` if set.

    Parameters: ``q_proj`` (``q_lora_rank`` null, DeepSeek-V2-Lite) or ``q_a_proj`` -> ``q_a_norm``
    -> ``q_b_proj``; ``kv_a_proj`` (d_model -> r + dr), ``kv_a_norm`` (r), ``kv_b_proj``
    (r -> H * (nope + v), per head ``[k_nope | v]``), ``o_proj``.
    """

    def __init__(self, spec: MLASpec, d_model: int, norm: Spec) -> None:
        super().__init__()
        from . import build

        self.spec = spec
        H, r, dr = spec.n_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
        self.n_heads, self.kv_lora_rank, self.rope_dim = H, r, dr
        self.nope_dim, self.v_dim, self.qk_dim = spec.qk_nope_head_dim, spec.v_head_dim, spec.qk_head_dim
        assert spec.scale is not None, "MLASpec.resolve() fills the scale"
        self.scale = spec.scale
        # DeepSeek in transformers: latent norms are RMSNorm(eps=1e-6) regardless of rms_norm_eps
        latent_norm = dataclasses.replace(norm, eps=spec.latent_norm_eps) if spec.latent_norm_eps else norm
        if spec.q_lora_rank is None:  # DeepSeek-V2-Lite: one full query projection
            self.q_proj = Linear(d_model, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(d_model, spec.q_lora_rank, bias=spec.bias)
            self.q_a_norm = build(latent_norm, dim=spec.q_lora_rank)
            self.q_b_proj = Linear(spec.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj = Linear(d_model, r + dr, bias=spec.bias)
        self.kv_a_norm = build(latent_norm, dim=r)
        self.kv_b_proj = Linear(r, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, d_model, bias=spec.bias)
        self.absorb: bool | None = None  # None: automatic (absorbed for cached steps of <= ABSORB_MAX_T)

    def cache_dims(self) -> tuple[int, int, int]:
        """One cache "head" holding ``[c, k_rope]`` as the key, and no value."""
        return 1, self.kv_lora_rank + self.rope_dim, 0

    def project(self, x: torch.Tensor, position: nn.Module, tables: Tables) -> tuple[torch.Tensor, ...]:
        """x (B, T, d_model) -> q (B, H, T, nope + dr) with its rope dims rotated, and this step's
        cache entry as the "key" of one shared head: the latent ``[c, k_rope]`` (B, 1, T, r + dr);
        the "value" is empty (B, 1, T, 0). The same interface as GQA's ``Attention.project``."""
        B, T, _ = x.shape
        H, r, dr = self.n_heads, self.kv_lora_rank, self.rope_dim
        q = self.q_proj(x) if self.spec.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.qk_dim).transpose(1, 2)  # (B, H, T, nope + dr)
        q_nope, q_rope = q.split([self.nope_dim, dr], dim=-1)
        q = torch.cat((q_nope, position.rotate(q_rope, tables)), dim=-1)
        ckv = self.kv_a_proj(x)  # (B, T, r + dr)
        c = self.kv_a_norm(ckv[..., :r])
        k_rope = position.rotate(ckv[..., r:][:, None], tables)  # (B, 1, T, dr): one head shared by all
        latent = torch.cat((c[:, None], k_rope), dim=-1)  # (B, 1, T, r + dr)
        return q, latent, latent.new_empty(B, 1, T, 0)

    def attend(self, q: torch.Tensor, latent: torch.Tensor, v: torch.Tensor, plan: StepPlan,
               kv: LayerKV | None = None, start: int = 0) -> torch.Tensor:
        """Store this step's latents in the cache, attend; -> (B, T, H * v) before ``o_proj``."""
        if kv is not None:
            latent, v = kv.update(latent, v, plan, start)  # (B, 1, S, r + dr)
        return self.attention(q, latent, v, plan.mask, plan.is_causal)

    def attention(self, q: torch.Tensor, latent: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  is_causal: bool) -> torch.Tensor:
        """q (B, H, T, nope + dr) over every latent it may see (B, 1, S, r + dr); -> (B, T, H * v).
        ``v`` is the cache's empty value. Absorbed when ``absorb`` says so or, automatically, when
        the step attends over cached keys (S > T) with at most :data:`ABSORB_MAX_T` queries."""
        B, H, T, _ = q.shape
        S = latent.shape[2]
        # (S > T: a compiled decode step's S is its symbolic cache length, never guarded on: true)
        absorb = self.absorb if self.absorb is not None else (T <= ABSORB_MAX_T and guard_or_true(S > T))
        out = (self._absorbed if absorb else self._naive)(q, latent, mask, is_causal)
        return out.transpose(1, 2).reshape(B, T, H * self.v_dim)

    def forward(self, x: torch.Tensor, position: nn.Module, tables: Tables, plan: StepPlan,
                kv: LayerKV | None = None, start: int = 0) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). ``plan`` carries the mask; ``kv`` the layer's latent cache."""
        q, latent, v = self.project(x, position, tables)
        return self.o_proj(self.attend(q, latent, v, plan, kv, start))

    def _naive(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """Expand per-head keys and values from the latent, then SDPA. Returns (B, H, T, v)."""
        B, H, T, _ = q.shape
        S = latent.shape[2]
        c, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c[:, 0]).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, H, S, nope + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope_dim)), dim=-1)  # (B, H, S, nope + dr)
        pad = self.qk_dim - self.v_dim
        if q.device.type == "cpu" and pad > 0:
            # SDPA's fused CPU kernel needs value dim == query dim; otherwise it materialises the scores
            # (math path). Zero value columns change nothing and are sliced off: 2.4x faster attention
            # (512 tokens, 8 heads, dims 96/64: 16 ms -> 6.6 ms float32, 11 -> 6 ms bfloat16).
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), attn_mask=mask,
                                                 is_causal=is_causal, scale=self.scale)
            return out[..., : self.v_dim]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)

    def _absorbed(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """Attention in latent space, ``W_UK`` folded into the queries and ``W_UV`` into the output.

        Scores ``[q_nope W_UK, q_rope] . [c, k_rope]`` need no per-key expansion: the cached latent
        is the one shared key, and ``c`` its value: multi-query attention of the H heads over the
        latent (:func:`~llmparts.modules.attention.decode_attention`, which inside a compiled decode
        step streams the cache as float32 reductions). Returns (B, H, T, v).
        """
        B, H, T, _ = q.shape
        S = latent.shape[2]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, nope, r), (H, v, r)
        compiling = torch.compiler.is_compiling()  # per-head matrix-vector products as streaming reductions
        if compiling:  # (weights (H, 1, out, in) against (B, H, T, in))
            q_latent = matvec(q_nope, w_uk.transpose(1, 2)[:, None])  # (B, H, T, r)
        else:
            q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q_cat = torch.cat((q_latent, q_rope), dim=-1)  # (B, H, T, r + dr)
        if mask is None and is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        o_latent = decode_attention(q_cat, latent, latent[..., : self.kv_lora_rank], mask, self.scale)  # (B, H, T, r)
        if compiling:
            return matvec(o_latent, w_uv[:, None])  # (B, H, T, v)
        return torch.einsum("bhtr,hvr->bhtv", o_latent, w_uv)
