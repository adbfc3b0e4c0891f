"""Position encodings: RoPE with its scalings and layouts, and NoPE.

A position module has no parameters. The model builds one per distinct resolved position spec and
computes its ``(cos, sin)`` tables once per forward; every layer with that spec reuses them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_module
from ..specs import (
    Llama3RopeScaling,
    LinearRopeScaling,
    NoPESpec,
    RopeSpec,
    Spec,
    YarnRopeScaling,
)

Tables = tuple[torch.Tensor, torch.Tensor] | None


def rope_inv_freq(theta: float, dim: int, scaling: Spec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim / 2,) in float32 and the attention factor that multiplies cos/sin.

    Follows transformers' ``ROPE_INIT_FUNCTIONS`` exactly (float32 arithmetic, same formulas). Always
    computed on the CPU, also inside a ``torch.device("meta")`` block (where models are built before
    loading: meta tensors would carry no values, and their first use imports torch's meta kernels,
    over a second).
    """
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if scaling.type == "default":
        return inv, 1.0
    if isinstance(scaling, LinearRopeScaling):
        return inv / scaling.factor, 1.0
    if isinstance(scaling, Llama3RopeScaling):
        # Llama 3.1: wavelengths longer than old/low_freq_factor are interpolated by `factor`,
        # shorter than old/high_freq_factor kept; a linear blend in between.
        old = scaling.original_max_seq_len
        low_wl, high_wl = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / scaling.factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if isinstance(scaling, YarnRopeScaling):
        # YaRN: frequencies below the correction range are interpolated (/factor), above it kept.
        factor = scaling.factor
        assert factor is not None and scaling.attention_factor is not None, "resolve() fills these"
        pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a division by zero
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
        extra = 1 - ramp
        return interpolation * (1 - extra) + extrapolation * extra, scaling.attention_factor
    raise NotImplementedError(f"rope scaling {scaling.type!r} has no implementation")


@register_module("position", "rope")
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer).

    ``tables(pos)`` gives cos/sin of shape (B, T, rotary_dim / 2) for absolute positions ``pos``;
    ``rotate(x, tables)`` rotates (B, H, T, D) queries or keys. The ``half`` layout pairs dim i with
    i + rotary_dim / 2 (HF's ``rotate_half``); ``interleaved`` pairs 2i with 2i + 1. Dims beyond
    ``rotary_dim`` pass through unrotated (partial rotary). YaRN's attention factor multiplies cos
    and sin, as in transformers, so logits scale by its square.
    """

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.attention_factor = rope_inv_freq(spec.theta, spec.rotary_dim or 0, spec.scaling)[1]

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:  # computed in float32 on CPU, like transformers, then moved
            inv, _ = rope_inv_freq(self.spec.theta, self.spec.rotary_dim or 0, self.spec.scaling)
            self._inv_freq[device] = inv.to(device)
        return self._inv_freq[device]

    def tables(self, pos: torch.Tensor, dtype: torch.dtype) -> Tables:
        freqs = pos.float()[..., None] * self.inv_freq(pos.device)  # (B, T, R/2), float32 angles
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        if self.spec.compute_dtype == "model":
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos[:, None], sin[:, None]  # (B, 1, T, R/2): broadcast over heads

    def rotate(self, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        assert tables is not None
        cos, sin = tables
        dtype = x.dtype
        if self.spec.compute_dtype == "float32":
            x = x.float()
        rot = self.spec.rotary_dim or x.shape[-1]
        xr, rest = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
        if self.spec.layout == "half":
            x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        if rest is not None:
            out = torch.cat((out, rest), dim=-1)
        return out.to(dtype)


@register_module("position", "none")
class NoPE(nn.Module):
    """No position encoding: attention is position-agnostic except through the causal mask."""

    def __init__(self, spec: NoPESpec) -> None:
        super().__init__()
        self.spec = spec

    def tables(self, pos: torch.Tensor, dtype: torch.dtype) -> Tables:
        return None

    def rotate(self, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        return x
