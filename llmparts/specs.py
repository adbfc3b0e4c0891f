"""Typed, frozen component specs, one small dataclass per ``(kind, type)``.

A spec holds what the user wrote (``None`` where a value is derived). ``resolve(ctx)`` returns a copy
with every derived field filled and every cross-field rule checked, for one layer; the model is built
only from resolved specs. Field types are enforced by :func:`llmparts.config.parse_spec` from the
annotations below, so a spec class is the single source of truth for its YAML schema.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .errors import ConfigError
from .registry import register_spec


@dataclass(frozen=True)
class Spec:
    kind: ClassVar[str] = ""
    type: str = ""

    def resolve(self, ctx: dict[str, Any], path: str) -> "Spec":
        """Fill derived fields and check consistency; ``ctx`` carries d_model, max_seq_len, attention."""
        return self

    def replace(self, **changes: Any) -> "Spec":
        return dataclasses.replace(self, **changes)


def _positive(path: str, name: str, value: float | int | None, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"{path}.{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{path}.{name} must be > 0 (a finite number), got {value!r}")


# ----------------------------------------------------------------------------------------- norms
@register_spec("norm", "rmsnorm")
@dataclass(frozen=True)
class RMSNormSpec(Spec):
    """RMSNorm: ``x / sqrt(mean(x^2) + eps) * (offset + w)``, statistics always in float32.

    ``offset: 1.0`` is Gemma's ``(1 + w)`` (weights stored as offsets, zero-initialised).
    ``cast``: where the float32 result returns to the input dtype. ``before_weight`` is Llama's
    ``w * y.to(dtype)``; ``after_weight`` is Gemma's/OLMo's ``(y * w).to(dtype)``. Equal in float32.
    """

    type: str = "rmsnorm"
    eps: float = 1e-6
    offset: float = 0.0
    cast: Literal["before_weight", "after_weight"] = "before_weight"

    def resolve(self, ctx: dict[str, Any], path: str) -> "RMSNormSpec":
        _positive(path, "eps", self.eps)
        return self


@register_spec("norm", "layernorm")
@dataclass(frozen=True)
class LayerNormSpec(Spec):
    """LayerNorm (mean and variance), statistics in float32; optional bias."""

    type: str = "layernorm"
    eps: float = 1e-5
    bias: bool = True

    def resolve(self, ctx: dict[str, Any], path: str) -> "LayerNormSpec":
        _positive(path, "eps", self.eps)
        return self


# ------------------------------------------------------------------------------- rope scalings
@register_spec("rope_scaling", "default")
@dataclass(frozen=True)
class DefaultRopeScaling(Spec):
    """No scaling: ``inv_freq = 1 / theta ** (2i / dim)``."""

    type: str = "default"


@register_spec("rope_scaling", "linear")
@dataclass(frozen=True)
class LinearRopeScaling(Spec):
    """Position interpolation: every frequency divided by ``factor`` (Gemma3 4B+ global layers)."""

    type: str = "linear"
    factor: float = 1.0

    def resolve(self, ctx: dict[str, Any], path: str) -> "LinearRopeScaling":
        _positive(path, "factor", self.factor, allow_none=False)
        return self


@register_spec("rope_scaling", "llama3")
@dataclass(frozen=True)
class Llama3RopeScaling(Spec):
    """Llama 3.1's piecewise scaling: low frequencies / factor, high kept, a smooth band between."""

    type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def resolve(self, ctx: dict[str, Any], path: str) -> "Llama3RopeScaling":
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"):
            _positive(path, name, getattr(self, name), allow_none=False)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"{path}: high_freq_factor ({self.high_freq_factor}) must be > low_freq_factor "
                f"({self.low_freq_factor})"
            )
        return self


@register_spec("rope_scaling", "yarn")
@dataclass(frozen=True)
class YarnRopeScaling(Spec):
    """YaRN (Peng et al. 2023): per-frequency blend of interpolation and extrapolation, plus an
    attention factor that multiplies cos and sin (so logits by its square).

    ``factor: null`` derives it as ``max_seq_len / original_max_seq_len``. ``attention_factor: null``
    derives it from ``mscale``/``mscale_all_dim`` (DeepSeek) or ``0.1 ln(factor) + 1``.
    ``truncate``: floor/ceil the correction range (GPT-OSS uses false).
    """

    type: str = "yarn"
    factor: float | None = None
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def resolve(self, ctx: dict[str, Any], path: str) -> "YarnRopeScaling":
        _positive(path, "original_max_seq_len", self.original_max_seq_len, allow_none=False)
        factor = self.factor
        if factor is None:
            factor = ctx["max_seq_len"] / self.original_max_seq_len
        _positive(path, "factor", factor, allow_none=False)
        for name in ("beta_fast", "beta_slow", "attention_factor"):
            _positive(path, name, getattr(self, name))
        if self.beta_fast < self.beta_slow:  # (the correction range would be reversed)
            raise ConfigError(
                f"{path}: beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow}); YaRN's defaults are "
                "32 and 1"
            )
        attn = self.attention_factor
        if attn is None:
            try:
                attn = yarn_attention_factor(factor, self.mscale, self.mscale_all_dim)
            except ZeroDivisionError:
                attn = math.inf
            if not (math.isfinite(attn) and attn > 0):
                raise ConfigError(
                    f"{path}: mscale ({self.mscale}) and mscale_all_dim ({self.mscale_all_dim}) give an attention "
                    f"factor of {attn:g} at factor {factor:g}; it must be finite and > 0 (set attention_factor, or mscale values "
                    "around 1)"
                )
        return dataclasses.replace(self, factor=float(factor), attention_factor=float(attn))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


# ------------------------------------------------------------------------------------ position
@register_spec("position", "rope")
@dataclass(frozen=True)
class RopeSpec(Spec):
    """Rotary position embedding (Su et al. 2021).

    ``layout``: ``half`` rotates pairs (i, i + d/2) (HF checkpoints); ``interleaved`` rotates
    (2i, 2i + 1) (Meta/DeepSeek originals). ``rotary_dim`` < head_dim rotates only the first dims
    (partial rotary); ``null`` means head_dim. ``compute_dtype: float32`` rotates in float32 and casts
    back (OLMo2/3); ``model`` casts cos/sin to the activation dtype first (Llama, Qwen3, Gemma3).
    """

    type: str = "rope"
    theta: float = 10000.0
    layout: Literal["half", "interleaved"] = "half"
    rotary_dim: int | None = None
    compute_dtype: Literal["model", "float32"] = "model"
    scaling: Spec = field(default=DefaultRopeScaling(), metadata={"kind": "rope_scaling"})

    def resolve(self, ctx: dict[str, Any], path: str) -> "RopeSpec":
        _positive(path, "theta", self.theta)
        head_dim = ctx["rope_head_dim"]
        rot = head_dim if self.rotary_dim is None else self.rotary_dim
        if rot <= 0 or rot % 2 or rot > head_dim:
            raise ConfigError(
                f"{path}.rotary_dim: must be even, > 0 and <= head_dim ({head_dim}), got {rot}"
                + (" (head_dim is odd: set rotary_dim to an even value)" if self.rotary_dim is None else "")
            )
        scaling = self.scaling.resolve(ctx, f"{path}.scaling")
        return dataclasses.replace(self, rotary_dim=rot, scaling=scaling)


@register_spec("position", "none")
@dataclass(frozen=True)
class NoPESpec(Spec):
    """No positional encoding at all (NoPE): queries and keys are not rotated (SmolLM3 every 4th layer)."""

    type: str = "none"


# ----------------------------------------------------------------------------------- attention
@register_spec("attention", "gqa")
@dataclass(frozen=True)
class AttentionSpec(Spec):
    """Softmax attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads.

    MHA is ``n_kv_heads == n_heads`` (or null), MQA ``n_kv_heads: 1``, GQA anything between.
    ``qk_norm``: ``per_head`` normalises each head over head_dim (Qwen3, Gemma3); ``full`` over the
    whole projected width (OLMo2). ``window``: W visible keys including the query (sliding window).
    ``sinks``: one learned logit per head joins the softmax (GPT-OSS). ``softcap``: ``c tanh(s / c)``
    on the logits (Gemma2). ``scale``: softmax scale, default ``head_dim ** -0.5``.
    """

    type: str = "gqa"
    n_heads: int = 0
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    qk_norm_position: Literal["before_rope", "after_rope"] = "before_rope"
    window: int | None = None
    sinks: bool = False
    softcap: float | None = None
    scale: float | None = None

    def resolve(self, ctx: dict[str, Any], path: str) -> "AttentionSpec":
        d_model = ctx["d_model"]
        if self.n_heads <= 0:
            raise ConfigError(f"{path}.n_heads is required and must be > 0, got {self.n_heads!r}")
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if n_kv <= 0 or self.n_heads % n_kv:
            raise ConfigError(
                f"{path}.n_kv_heads: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({n_kv}); "
                f"valid values: {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}"
            )
        head_dim = self.head_dim
        if head_dim is None:
            if d_model % self.n_heads:
                raise ConfigError(
                    f"{path}.head_dim is missing and cannot be derived: d_model ({d_model}) is not "
                    f"divisible by n_heads ({self.n_heads}); set head_dim explicitly"
                )
            head_dim = d_model // self.n_heads
        _positive(path, "head_dim", head_dim)
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{path}.window must be >= 1 (or null for full attention), got {self.window}")
        if self.window is not None and self.window > ctx["max_seq_len"]:
            raise ConfigError(
                f"{path}.window ({self.window}) is larger than max_seq_len ({ctx['max_seq_len']}); "
                "use window: null for full attention"
            )
        _positive(path, "softcap", self.softcap)
        _positive(path, "scale", self.scale)
        return dataclasses.replace(self, n_kv_heads=n_kv, head_dim=head_dim)


@register_spec("attention", "mla")
@dataclass(frozen=True)
class MLASpec(Spec):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434; DeepSeek-V3, Kimi K2).

    Keys and values are up-projected from one shared latent of ``kv_lora_rank`` values per token
    (RMS-normalised), plus one shared rotary key of ``qk_rope_head_dim``; the cache stores only those
    ``kv_lora_rank + qk_rope_head_dim`` values per token. Queries come from a latent of
    ``q_lora_rank`` (normalised) or, when it is null, from one full projection (DeepSeek-V2-Lite).
    Each head's query/key is ``qk_nope_head_dim`` position-free dims followed by ``qk_rope_head_dim``
    rotated dims; values have ``v_head_dim``. ``bias``: biases on q_a/kv_a/o projections (HF
    ``attention_bias``). ``latent_norm_eps``: eps of the two latent norms (null: the layer norm's;
    transformers' DeepSeek uses 1e-6 whatever ``rms_norm_eps`` is). ``scale`` defaults to
    ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, multiplied by ``mscale(factor,
    mscale_all_dim) ** 2`` when the layer's RoPE is YaRN with ``mscale_all_dim`` set (DeepSeek's
    long-context correction of the softmax temperature).
    """

    type: str = "mla"
    n_heads: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    bias: bool = False
    latent_norm_eps: float | None = None
    window: int | None = None
    scale: float | None = None

    @property
    def rope_head_dim(self) -> int:
        """The width RoPE rotates: only the decoupled rotary part of each head."""
        return self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def resolve(self, ctx: dict[str, Any], path: str) -> "MLASpec":
        for name in ("n_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{path}.{name} is required and must be > 0, got {value!r}")
        if self.qk_nope_head_dim < 0:
            raise ConfigError(f"{path}.qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{path}.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"{path}.q_lora_rank must be > 0, or null for a full query projection, got {self.q_lora_rank}")
        _positive(path, "latent_norm_eps", self.latent_norm_eps)
        _positive(path, "scale", self.scale)
        if self.window is not None and not 1 <= self.window <= ctx["max_seq_len"]:
            raise ConfigError(
                f"{path}.window must be between 1 and max_seq_len ({ctx['max_seq_len']}), got {self.window}; "
                "use window: null for full attention"
            )
        scale = self.scale
        if scale is None:
            scale = self.qk_head_dim**-0.5
            position = ctx.get("position")
            scaling = getattr(position, "scaling", None)
            if getattr(position, "type", None) == "rope" and getattr(scaling, "type", None) == "yarn" and scaling.mscale_all_dim:
                factor = scaling.resolve(ctx, f"{path} (position.scaling)").factor
                scale *= yarn_get_mscale(factor, scaling.mscale_all_dim) ** 2
        return dataclasses.replace(self, scale=float(scale))


# ------------------------------------------------------------------------------------------ mlp
Activation = Literal["silu", "gelu_tanh", "gelu", "relu"]


@register_spec("mlp", "gated")
@dataclass(frozen=True)
class GatedMLPSpec(Spec):
    """``down(act(gate(x)) * up(x))``: SwiGLU with ``silu`` (Llama, Qwen), GeGLU with ``gelu_tanh`` (Gemma)."""

    type: str = "gated"
    hidden_dim: int = 0
    activation: Activation = "silu"
    bias: bool = False

    def resolve(self, ctx: dict[str, Any], path: str) -> "GatedMLPSpec":
        _positive(path, "hidden_dim", self.hidden_dim, allow_none=False)
        return self


@register_spec("mlp", "plain")
@dataclass(frozen=True)
class PlainMLPSpec(Spec):
    """``down(act(up(x)))``: the original transformer MLP (GPT-2 style)."""

    type: str = "plain"
    hidden_dim: int = 0
    activation: Activation = "gelu"
    bias: bool = False

    def resolve(self, ctx: dict[str, Any], path: str) -> "PlainMLPSpec":
        _positive(path, "hidden_dim", self.hidden_dim, allow_none=False)
        return self


MoEActivation = Literal["silu", "gelu_tanh", "gelu", "relu", "clamped_swiglu"]


@register_spec("mlp", "moe")
@dataclass(frozen=True)
class MoESpec(Spec):
    """Sparse mixture of experts: a router picks ``top_k`` of ``n_experts`` gated MLPs per token.

    Router variants (router math in float32):

    * ``softmax``: softmax over all experts, then the top k (Qwen3-MoE, Mixtral); ``normalize``
      rescales the k weights to sum to 1 (HF ``norm_topk_prob``).
    * ``topk_softmax``: the top k of the logits, then a softmax over those k (GPT-OSS).
    * ``sigmoid``: sigmoid scores (DeepSeek-V3, Kimi K2); ``correction_bias`` is added to the scores
      for *selection only*; ``normalize`` then ``scaling_factor`` (``routed_scaling_factor``).

    ``n_groups`` / ``topk_groups``: group-limited selection: experts are split into ``n_groups``
    equal groups, each scored by the sum of its two best selection scores; only experts of the best
    ``topk_groups`` groups can be picked (DeepSeek-V3). ``router_bias``: a bias on the router
    projection, used for weights and selection (GPT-OSS). ``hidden_dim``: per expert.
    ``activation: clamped_swiglu`` is GPT-OSS's ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha g)``
    with ``g = min(gate, l)``, ``l = swiglu_limit``, ``alpha = swiglu_alpha``; ``expert_bias`` adds
    biases to the expert projections (GPT-OSS). ``shared_hidden_dim`` > 0 adds an always-on gated MLP
    of that width (DeepSeek's shared experts, ``n_shared_experts * moe_intermediate_size``).
    ``aux_loss_coef``: weight of the load-balancing loss (Switch Transformer, arXiv 2101.03961) that
    training adds to the language-model loss.
    """

    type: str = "moe"
    n_experts: int = 0
    top_k: int = 0
    hidden_dim: int = 0
    activation: MoEActivation = "silu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    expert_bias: bool = False
    router: Literal["softmax", "topk_softmax", "sigmoid"] = "softmax"
    router_bias: bool = False
    correction_bias: bool = False
    normalize: bool = False
    n_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0
    shared_hidden_dim: int = 0
    aux_loss_coef: float = 0.0

    def resolve(self, ctx: dict[str, Any], path: str) -> "MoESpec":
        E, k = self.n_experts, self.top_k
        if E < 1:
            raise ConfigError(f"{path}.n_experts is required and must be >= 1, got {E!r}")
        if not 1 <= k <= E:
            raise ConfigError(f"{path}.top_k must be between 1 and n_experts ({E}), got {k!r}")
        _positive(path, "hidden_dim", self.hidden_dim, allow_none=False)
        for name in ("swiglu_limit", "swiglu_alpha", "scaling_factor"):
            _positive(path, name, getattr(self, name))
        if self.shared_hidden_dim < 0:
            raise ConfigError(f"{path}.shared_hidden_dim must be >= 0 (0: no shared expert), got {self.shared_hidden_dim}")
        if self.shared_hidden_dim and self.activation == "clamped_swiglu":
            raise ConfigError(
                f"{path}: activation clamped_swiglu (GPT-OSS's, routed experts only) has no shared-expert form; "
                f"set shared_hidden_dim: 0 (got {self.shared_hidden_dim}) or another activation"
            )
        if self.aux_loss_coef < 0:
            raise ConfigError(f"{path}.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        G, g = self.n_groups, self.topk_groups
        if G < 1 or E % G:
            raise ConfigError(
                f"{path}.n_groups: n_experts ({E}) must be divisible by n_groups ({G}); "
                f"valid values: {[d for d in range(1, E + 1) if E % d == 0]}"
            )
        if not 1 <= g <= G:
            raise ConfigError(f"{path}.topk_groups must be between 1 and n_groups ({G}), got {g}")
        if G > 1 and E // G < 2:
            raise ConfigError(
                f"{path}.n_groups ({G}): each group needs at least 2 experts (a group is scored by the sum "
                f"of its two best experts), but n_experts / n_groups = {E // G}"
            )
        if k > g * (E // G):
            raise ConfigError(
                f"{path}.top_k ({k}) is more than the {g * (E // G)} experts the topk_groups ({g}) selected "
                f"groups hold ({E // G} each); raise topk_groups or lower top_k"
            )
        return self


# ---------------------------------------------------------------------------- block, embedding
@register_spec("block", "transformer")
@dataclass(frozen=True)
class BlockSpec(Spec):
    """Residual block around attention and MLP.

    ``pre``: ``x + f(norm(x))`` (Llama, Qwen). ``post``: ``x + norm(f(x))`` (OLMo2: the norm is on the
    sublayer output, inside the residual). ``sandwich``: ``x + norm2(f(norm1(x)))`` (Gemma3).
    """

    type: str = "transformer"
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"


@register_spec("embedding", "standard")
@dataclass(frozen=True)
class EmbeddingSpec(Spec):
    """Token embedding, optionally multiplied by a constant (``sqrt_d_model``: Gemma, in the weight dtype).

    ``padding_idx``: the pad token's row, as ``nn.Embedding(padding_idx=...)`` (transformers passes
    ``pad_token_id``): it is zero at random init and the lookup gives it no gradient (a tied head
    still does). The output is the same either way.
    """

    type: str = "standard"
    scale: float | Literal["none", "sqrt_d_model"] = "none"
    padding_idx: int | None = None

    def resolve(self, ctx: dict[str, Any], path: str) -> "EmbeddingSpec":
        vocab = ctx["vocab_size"]
        if not isinstance(self.scale, str):
            _positive(path, "scale", self.scale)  # (a number; or none / sqrt_d_model)
        if self.padding_idx is not None and not 0 <= self.padding_idx < vocab:
            raise ConfigError(f"{path}.padding_idx must be a token id in [0, vocab_size {vocab}) or null, "
                              f"got {self.padding_idx}; with a smaller vocab_size, also override "
                              "embedding.padding_idx (null: no padding row)")
        return self


DEFAULT_TYPES = {
    "attention": "gqa",
    "position": "rope",
    "rope_scaling": "default",
    "norm": "rmsnorm",
    "mlp": "gated",
    "block": "transformer",
    "embedding": "standard",
}
