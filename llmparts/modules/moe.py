"""Sparse mixture of experts: a router sends each token to ``top_k`` of ``n_experts`` gated MLPs.

Sparsely-gated MoE layers come from Shazeer et al. 2017 ("Outrageously Large Neural Networks",
arXiv 1701.06538); top-k routing with a load-balancing loss from Switch Transformer (arXiv
2101.03961). Fine-grained experts plus always-on shared experts are DeepSeekMoE (arXiv 2401.06066);
sigmoid scores with a selection-only correction bias and group-limited routing are DeepSeek-V3
(arXiv 2412.19437).

=============  ================  ==============================  ============  ===============
model          router            weights                         experts       shared expert
=============  ================  ==============================  ============  ===============
Qwen3-MoE      ``softmax``       softmax probs of the top k,     SwiGLU        none
                                 renormalised (``normalize``)
GPT-OSS        ``topk_softmax``  softmax over the k top logits   clamped       none
               + router bias                                     SwiGLU, bias
DeepSeek-V3    ``sigmoid``       sigmoid of the top k (picked    SwiGLU        1 (added
               + correction      with bias, 8 groups keep 4),                  unweighted)
                                 renormalised, x 2.5
=============  ================  ==============================  ============  ===============

Parameter names (the weight maps rely on them): ``router.weight`` (E, D), ``router.bias`` (E,),
``router.correction_bias`` (E,), ``experts.{gate,up}_proj`` (E, F, D), ``experts.down_proj``
(E, D, F) -- stacked ``nn.Linear`` weights, (E, out, in); gate and up are (non-contiguous) views of
one (E, 2F, D) tensor, :meth:`Experts.gate_up` -- ``experts.{gate,up}_bias`` (E, F),
``experts.down_bias`` (E, D), and ``shared.{gate,up,down}_proj.weight`` (a :class:`GatedMLP`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_module
from ..specs import GatedMLPSpec, MoESpec
from .linear import MATVEC_MAX_ROWS, emulated_half, linear, materialized
from .mlp import ACTIVATIONS, GatedMLP


GROUPED_MIN_ROWS = 64  # (token, expert) pairs from which inference runs all experts as grouped matmuls


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """Stand-alone init like ``nn.Linear``'s; :meth:`CausalLM.init_weights` re-initialises in a model."""
    bound = fan_in**-0.5
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def load_balancing_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], top_k: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (arXiv 2101.03961, eqs. 4-6), as ``transformers``
    computes it (``load_balancing_loss_func``; with an attention mask, over the real tokens only:
    ``valid``, a (N,) bool mask of each layer's rows).

    ``E * sum_e f_e * P_e`` where ``f_e`` is the fraction of (token, slot) assignments that go to
    expert e under top-k of ``softmax(logits)`` (summed over the k slots, so it totals k), and
    ``P_e`` the mean router probability of e. With several layers, transformers averages ``f`` and
    ``P`` over the rows of *all* layers before multiplying (not a sum of per-layer losses). Only
    ``P`` carries a gradient. Whatever the router type, transformers applies this formula to the
    softmax of the raw router logits (GPT-OSS: logits including the router bias).

    router_logits: one (N, E) tensor per layer. Returns a float32 scalar (= k when perfectly balanced).
    """
    E = router_logits[0].shape[-1]
    if valid is not None:  # (transformers weights every sum by the mask: the same as dropping the rows)
        router_logits = [lg[valid] for lg in router_logits]
    probs = torch.cat([lg.float() for lg in router_logits]).softmax(dim=-1)  # (L*N, E)
    chosen = probs.topk(top_k, dim=-1).indices  # (L*N, k)
    tokens_per_expert = F.one_hot(chosen, E).sum(dim=(0, 1)).float() / probs.shape[0]  # (E,)
    return (tokens_per_expert * probs.mean(dim=0)).sum() * E


class Router(nn.Module):
    """Scores experts for each token and returns the chosen ids with their mixing weights.

    Everything is computed in float32 (float64 for float64 inputs). DeepSeek-V3 does so in its
    reference; Qwen3-MoE and GPT-OSS compute the logits in the model dtype, which differs only in
    bf16/fp16 (where a near-tie can then pick a different expert than transformers does).
    """

    def __init__(self, spec: MoESpec, d_model: int) -> None:
        super().__init__()
        E = spec.n_experts
        self.spec = spec
        self.weight = _uniform((E, d_model), d_model)
        self.bias = nn.Parameter(torch.zeros(E)) if spec.router_bias else None  # GPT-OSS
        # DeepSeek-V3 "auxiliary-loss-free" balancing: a per-expert offset used only to *choose*
        # experts. Training adjusts it with a sign rule outside backprop (paper, section 2.1.2), so it
        # gets no gradient; it is a Parameter so that loading and counting treat it like a weight.
        self.correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False) if spec.correction_bias else None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Keep ``correction_bias`` in float32 when the module is cast to bf16/fp16 (transformers:
        ``_keep_in_fp32_modules_strict``). It decides which experts win; bf16 keeps about three
        significant digits, so rounding it would flip close choices."""
        cb = self.correction_bias.data if self.correction_bias is not None else None
        super()._apply(fn, recurse)
        new = self.correction_bias
        if cb is not None and cb.dtype == torch.float32 and new.dtype.is_floating_point and new.dtype.itemsize < 4:
            new.data = cb.to(new.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> logits (N, E), weights (N, k) (both float32, or float64 for float64 x), ids (N, k)."""
        s = self.spec
        dt = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
        bias = self.bias.to(dt) if self.bias is not None else None
        logits = F.linear(x.to(dt), self.weight.to(dt), bias)  # (N, E)
        if s.router == "softmax":  # Qwen3-MoE, Mixtral: probabilities over all experts
            scores = logits.softmax(dim=-1)
        elif s.router == "sigmoid":  # DeepSeek-V3: independent per-expert affinities
            scores = logits.sigmoid()
        else:  # topk_softmax (GPT-OSS): choose on the raw logits
            scores = logits
        choice = scores if self.correction_bias is None else scores + self.correction_bias.to(dt)
        if s.n_groups > 1:
            choice = self._limit_groups(choice)
        ids = choice.topk(s.top_k, dim=-1, sorted=False).indices  # (N, k)
        weights = scores.gather(-1, ids)  # unbiased scores: the correction bias never weighs outputs
        if s.router == "topk_softmax":
            weights = weights.softmax(dim=-1)  # sums to 1 already: `normalize` has nothing to do
        elif s.normalize and s.router == "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)  # Qwen3-MoE: no epsilon
        elif s.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # DeepSeek-V3
        return logits, weights * s.scaling_factor, ids

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 group-limited routing: score each of the G groups of E/G experts by the sum of
        its two best selection scores, keep the ``topk_groups`` best groups, and make the experts of
        the others unselectable (-inf, as transformers; DeepSeek's reference code uses 0.0)."""
        N, E = choice.shape
        G = self.spec.n_groups
        grouped = choice.view(N, G, E // G)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        keep = group_scores.topk(self.spec.topk_groups, dim=-1, sorted=False).indices  # (N, topk_groups)
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
        return grouped.masked_fill(~mask[..., None], float("-inf")).view(N, E)


class Experts(nn.Module):
    """``n_experts`` gated MLPs with stacked weights, applied only to the tokens routed to them."""

    def __init__(self, spec: MoESpec, d_model: int) -> None:
        super().__init__()
        E, Fd, D = spec.n_experts, spec.hidden_dim, d_model
        self.spec = spec
        # gate and up are two parameters (the checkpoints' names) viewing one (E, 2F, D) tensor, each
        # expert's gate rows followed by its up rows, so that both are one matmul (:meth:`gate_up`).
        gate_up = _uniform((E, 2 * Fd, D), D).data
        self.gate_proj, self.up_proj = nn.Parameter(gate_up[:, :Fd]), nn.Parameter(gate_up[:, Fd:])
        self.down_proj = _uniform((E, D, Fd), Fd)
        if spec.expert_bias:  # GPT-OSS
            self.gate_bias = nn.Parameter(torch.zeros(E, Fd))
            self.up_bias = nn.Parameter(torch.zeros(E, Fd))
            self.down_bias = nn.Parameter(torch.zeros(E, D))
        else:
            self.gate_bias = self.up_bias = self.down_bias = None
        self.act = ACTIVATIONS.get(spec.activation)  # None for clamped_swiglu

    # The gate/up tensor a compiled decode step reads, set by the model around each such step
    # (:meth:`compiled_step`): a nested compile region rejects two inputs that alias, as the two
    # parameters do, and cannot check for itself that they still share one tensor.
    step_gate_up: torch.Tensor | None = None

    def gate_up(self) -> torch.Tensor | None:
        """The (E, 2F, D) tensor that ``gate_proj`` and ``up_proj`` view (expert e's gate rows, then
        its up rows), or None when they no longer share it (a parameter replaced or re-pointed).

        Checked on every call from the views' layout (a few microseconds): two live tensors cannot
        overlap, so gate rows strided by 2F rows with up's data F rows after gate's are one tensor."""
        g, u = self._parameters.get("gate_proj"), self._parameters.get("up_proj")  # (absent when parametrized)
        if g is None or u is None or g.dim() != 3:
            return None
        E, Fd, D = g.shape
        stride = (2 * Fd * D, D, 1)
        if (u.shape != g.shape or u.dtype != g.dtype or u.device != g.device or g.is_meta
                or g.stride() != stride or u.stride() != stride
                or u.data_ptr() != g.data_ptr() + Fd * D * g.element_size()):
            return None
        return g.detach().as_strided((E, 2 * Fd, D), stride)

    def compiled_step(self, active: bool) -> None:
        """Called by :class:`~llmparts.model.CausalLM` with True before and False after it runs its
        compiled parts: sets :attr:`step_gate_up` (:meth:`gate_up`, checked now) or clears it."""
        self.__dict__["step_gate_up"] = self.gate_up() if active else None  # (nn.Module's setattr: slower)

    def _join(self, empty: bool = False) -> None:
        """Put gate and up (same shape, dtype and device) into one new (E, 2F, D) tensor: copied, or
        uninitialised with ``empty``. Transiently twice this layer's gate and up."""
        g, u = self._parameters.get("gate_proj"), self._parameters.get("up_proj")
        if (g is None or u is None or g.is_meta or g.shape != u.shape or g.dtype != u.dtype or g.device != u.device
                or self.gate_up() is not None):
            return
        E, Fd, D = g.shape
        base = torch.empty((E, 2 * Fd, D), dtype=g.dtype, device=g.device) if empty else torch.cat((g.data, u.data), 1)
        g.data, u.data = base[:, :Fd], base[:, Fd:]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``nn.Module._apply`` (``to``, ``float``, ``to_empty``, ...) converts gate and up one by one:
        put them back into one tensor (from the meta device, which holds no values, a new empty one)."""
        g, u = self._parameters.get("gate_proj"), self._parameters.get("up_proj")
        was_meta = g is not None and u is not None and g.is_meta and u.is_meta
        joint = was_meta or self.gate_up() is not None
        super()._apply(fn, recurse)
        if joint:
            self._join(empty=was_meta)
        return self

    def __setstate__(self, state: dict) -> None:
        """``copy.deepcopy`` and unpickling clone each parameter on its own: join gate and up again."""
        super().__setstate__(state)
        self._join()

    def _bias(self, b: torch.Tensor | None, e: int) -> torch.Tensor | None:
        return None if b is None else b[e]

    def _split_gate_up(self, h: torch.Tensor, index: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """A product with :meth:`gate_up`'s rows (..., 2F) -> gate, up, each plus its bias (GPT-OSS)
        of the experts ``index`` picks."""
        gate, up = h.chunk(2, dim=-1)
        if self.gate_bias is None:
            return gate, up
        return gate + self.gate_bias[index], up + self.up_bias[index]

    def expert(self, e: int, x: torch.Tensor, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e`` on the tokens x (n, D) -> (n, D); with ``gate_up`` (:meth:`gate_up`, for
        inference) gate and up are one product."""
        if gate_up is None:
            gate = linear(x, self.gate_proj[e], self._bias(self.gate_bias, e))  # (n, F)
            up = linear(x, self.up_proj[e], self._bias(self.up_bias, e))  # (n, F)
        else:
            gate, up = self._split_gate_up(linear(x, gate_up[e]), e)
        return linear(self._activate(gate, up), self.down_proj[e], self._bias(self.down_bias, e))

    def _grouped(self, xs: torch.Tensor, ends: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """All experts at once on rows sorted by expert (``ends[e]``: one past expert e's last row;
        ``expert_of_row``: each row's expert): grouped matmuls (``F.grouped_mm``), gate and up as one
        (:meth:`gate_up`). On CPUs a grouped matmul is a loop of per-expert matmuls; one of 2F rows
        instead of two of F per expert was 5-20 % faster here (32 experts of 384x512, 512 rows; about
        equal at 2048 rows)."""
        offs = ends.to(torch.int32)

        def proj(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            y = F.grouped_mm(h, w.transpose(-2, -1), offs=offs)  # (n, out): row r uses its expert's w
            return y if b is None else y + b[expert_of_row]

        gate_up = self.gate_up()
        if gate_up is None:
            gate, up = proj(xs, self.gate_proj, self.gate_bias), proj(xs, self.up_proj, self.up_bias)
        else:
            gate, up = self._split_gate_up(proj(xs, gate_up, None), expert_of_row)
        return proj(self._activate(gate, up), self.down_proj, self.down_bias)

    def _activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            return self.act(gate) * up
        limit, alpha = self.spec.swiglu_limit, self.spec.swiglu_alpha  # GPT-OSS: gate clamped from above only
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)

    def gathered(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum for a few tokens (decode) as matrix-vector products on the chosen experts'
        weights, indexed by ``ids``. Under ``torch.compile`` the indexing fuses into the streaming
        reduction, so exactly the chosen experts' weights are read, once; eager execution would copy
        them first, so :class:`MoE` uses this form only while compiling."""
        N, k = ids.shape
        dtype = x.dtype

        def mv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            y = (h[..., None, :] * w[ids].float()).sum(-1)  # (N, k, out) float32; h float32, computed once
            return y if b is None else y + b[ids].float()

        xk = materialized(x.float())[:, None, :].expand(N, k, x.shape[-1])
        if self.step_gate_up is not None:
            gate, up = self._split_gate_up(mv(xk, self.step_gate_up, None), ids)  # float32 (+ biases promoted)
        else:
            gate, up = mv(xk, self.gate_proj, self.gate_bias), mv(xk, self.up_proj, self.up_bias)
        h = self._activate(gate.to(dtype), up.to(dtype))
        y = mv(materialized(h.float()), self.down_proj, self.down_bias).to(dtype)  # (N, k, D)
        return (y * weights[..., None]).to(dtype).sum(dim=1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids (N, k), weights (N, k) -> sum over k of weight * expert(x), (N, D) in x.dtype.

        The N*k (token, slot) pairs are sorted by expert. For many rows without gradients (prefill),
        all experts run as grouped matmuls over the sorted rows (except in half precision on a CPU
        that only emulates it, :func:`~llmparts.modules.linear.emulated_half`); otherwise each expert that got any
        tokens runs once on the rows gathered for it (in increasing id order, as transformers' eager
        loop). Weighted outputs are added back with ``index_add_``.
        """
        k = ids.shape[1]
        flat = ids.reshape(-1)  # (N*k,) pair p = token p // k, slot p % k
        expert_of_pair, order = flat.sort(stable=True)  # pairs grouped by expert
        tokens = order // k  # (N*k,) token of each sorted pair
        pair_w = weights.reshape(-1)[order]  # (N*k,)
        # where each expert's pairs end; unlike bincount (or repeat_interleave), a binary search needs
        # no output size read back from the device, so a CUDA prefill never waits for the GPU here
        experts = torch.arange(self.spec.n_experts, device=flat.device, dtype=flat.dtype)
        ends = torch.searchsorted(expert_of_pair, experts, right=True)
        if (flat.numel() >= GROUPED_MIN_ROWS and hasattr(F, "grouped_mm") and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and x.dtype in (torch.float32, torch.bfloat16)
                and not emulated_half(x)):  # there the loop's linear() multiplies in float32, a slice at a time
            y = self._grouped(x[tokens], ends, expert_of_pair)  # (N*k, D)
            return torch.zeros_like(x).index_add_(0, tokens, (y * pair_w[:, None]).to(x.dtype))
        gate_up = None if torch.is_grad_enabled() or torch.compiler.is_compiling() else self.gate_up()
        out = torch.zeros_like(x)
        start = 0
        for e, end in enumerate(ends.tolist()):  # one host sync
            if end == start:
                continue
            tok = tokens[start:end]
            y = self.expert(e, x[tok], gate_up)  # (n, D)
            out.index_add_(0, tok, (y * pair_w[start:end, None]).to(x.dtype))
            start = end
        return out


@register_module("mlp", "moe")
class MoE(nn.Module):
    """Router + experts (+ an optional always-on shared expert). x (B, T, D) -> (B, T, D).

    The routed output is ``sum_k w_k * expert_{i_k}(x)``; the shared expert's output (DeepSeekMoE)
    is added without a weight. In training mode, ``aux_loss`` holds ``aux_loss_coef`` times the
    Switch load-balancing loss of this layer (:func:`load_balancing_loss`, over every row, padding
    included) and ``router_logits`` the (B*T, E) float32 logits (to combine several layers, and
    leave out padding, exactly as transformers does: :meth:`~llmparts.model.CausalLM.aux_loss`);
    both are ``None`` in eval mode or when ``aux_loss_coef`` is 0.

    Args:
        spec: resolved :class:`~llmparts.specs.MoESpec`.
        d_model: residual width.
    """

    # Compiled decode steps run the router and the chosen experts as one graph (Experts.gathered);
    # prefill dispatch is data-dependent (how many tokens each expert gets) and stays eager.
    compilable = "decode"

    def __init__(self, spec: MoESpec, d_model: int) -> None:
        super().__init__()
        self.spec = spec
        self.router = Router(spec, d_model)
        self.experts = Experts(spec, d_model)
        self.shared: GatedMLP | None = None
        if spec.shared_hidden_dim > 0:
            # (MoESpec refuses a shared expert with clamped_swiglu)
            self.shared = GatedMLP(GatedMLPSpec(hidden_dim=spec.shared_hidden_dim, activation=spec.activation), d_model)
        self.aux_loss: torch.Tensor | None = None
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits, weights, ids = self.router(flat)  # (N, E), (N, k), (N, k)
        # transformers casts the weights to the model dtype before weighting (Qwen3-MoE, GPT-OSS) but
        # keeps DeepSeek-V3's float32 (the product is then rounded once); identical in float32.
        if self.spec.router != "sigmoid":
            weights = weights.to(x.dtype)
        if torch.compiler.is_compiling() and B * T <= MATVEC_MAX_ROWS:  # a compiled decode step
            out = self.experts.gathered(flat, ids, weights).view(B, T, D)
        else:
            out = self.experts(flat, ids, weights).view(B, T, D)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training and self.spec.aux_loss_coef > 0:
            self.router_logits = logits
            self.aux_loss = self.spec.aux_loss_coef * load_balancing_loss([logits], self.spec.top_k)
        else:
            self.router_logits = self.aux_loss = None
        return out

    def expert_parameters(self) -> int:
        """Parameters of one routed expert, biases included."""
        Fd, D = self.spec.hidden_dim, self.experts.down_proj.shape[1]
        return 3 * Fd * D + ((2 * Fd + D) if self.spec.expert_bias else 0)

    def inactive_parameters(self) -> int:
        """Expert parameters one token does not use: ``(n_experts - top_k)`` experts' worth."""
        return (self.spec.n_experts - self.spec.top_k) * self.expert_parameters()
