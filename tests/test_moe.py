"""Mixture of experts: a per-token float64 reference, properties, and transformers' own MoE blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as hf

from llmparts.config import parse_spec
from llmparts.errors import ConfigError
from llmparts.modules import build
from llmparts.modules.moe import MoE, load_balancing_loss
from llmparts.specs import GatedMLPSpec, MoESpec

D = 32  # d_model
FH = 16  # per-expert hidden width


def make(d_model: int = D, seed: int = 0, **kw) -> MoE:
    """A resolved MoE with every parameter (biases, correction bias) random."""
    spec = MoESpec(**{"n_experts": 8, "top_k": 2, "hidden_dim": FH, **kw}).resolve({"d_model": d_model}, "mlp")
    moe = build(spec, d_model=d_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            scale = {"router.weight": 0.08, "router.correction_bias": 0.5}.get(name, 0.3)  # logits ~ N(0, 1)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return moe.eval()


# ------------------------------------------------------------------------------ naive reference
def act(name: str, v: torch.Tensor) -> torch.Tensor:
    return {"silu": lambda t: t / (1 + torch.exp(-t)),
            "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
            "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
            "relu": lambda t: t.clamp(min=0)}[name](v)


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Written from the spec, one token and one chosen expert at a time, in float64."""
    s = moe.spec
    P = {n: p.detach().double() for n, p in moe.named_parameters()}
    E, k, G = s.n_experts, s.top_k, s.n_groups
    xs = x.detach().double().reshape(-1, x.shape[-1])
    out = torch.zeros_like(xs)
    for n in range(xs.shape[0]):
        h = xs[n]
        bias = [float(b) for b in P["router.bias"]] if s.router_bias else [0.0] * E
        logits = [float(P["router.weight"][e] @ h) + bias[e] for e in range(E)]
        if s.router == "softmax":
            z = sum(math.exp(v) for v in logits)
            scores = [math.exp(v) / z for v in logits]
        elif s.router == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            scores = list(logits)
        choice = [scores[e] + (float(P["router.correction_bias"][e]) if s.correction_bias else 0.0) for e in range(E)]
        allowed = set(range(E))
        if G > 1:
            size = E // G
            gscore = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(G)]
            best = sorted(range(G), key=lambda g: -gscore[g])[: s.topk_groups]
            allowed = {e for e in range(E) if e // size in best}
        chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
        if s.router == "topk_softmax":
            z = sum(math.exp(logits[e]) for e in chosen)
            w = [math.exp(logits[e]) / z for e in chosen]
        else:
            w = [scores[e] for e in chosen]
            if s.normalize:
                w = [v / sum(w) for v in w]
        for e, we in zip(chosen, w):
            gate = P["experts.gate_proj"][e] @ h + (P["experts.gate_bias"][e] if s.expert_bias else 0)
            up = P["experts.up_proj"][e] @ h + (P["experts.up_bias"][e] if s.expert_bias else 0)
            if s.activation == "clamped_swiglu":
                lim, a = s.swiglu_limit, s.swiglu_alpha
                gate = torch.where(gate > lim, torch.full_like(gate, lim), gate)
                up = torch.where(up > lim, torch.full_like(up, lim), torch.where(up < -lim, torch.full_like(up, -lim), up))
                mid = (up + 1) * gate / (1 + torch.exp(-a * gate))
            else:
                mid = act(s.activation, gate) * up
            y = P["experts.down_proj"][e] @ mid + (P["experts.down_bias"][e] if s.expert_bias else 0)
            out[n] += we * s.scaling_factor * y
        if s.shared_hidden_dim:
            mid = act(s.activation, P["shared.gate_proj.weight"] @ h) * (P["shared.up_proj.weight"] @ h)
            out[n] += P["shared.down_proj.weight"] @ mid
    return out.view(x.shape)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


CASES = {
    "softmax": dict(router="softmax"),
    "softmax_normalize": dict(router="softmax", normalize=True),
    "softmax_correction_scaled": dict(router="softmax", correction_bias=True, scaling_factor=1.5),
    "softmax_groups": dict(router="softmax", n_groups=2, topk_groups=1, normalize=True),
    "topk_softmax_gptoss": dict(router="topk_softmax", router_bias=True, expert_bias=True,
                                activation="clamped_swiglu", swiglu_limit=0.8, swiglu_alpha=1.702),
    "topk_softmax_groups": dict(router="topk_softmax", n_groups=2, topk_groups=1, top_k=3),
    "sigmoid_deepseek": dict(router="sigmoid", correction_bias=True, normalize=True, n_groups=4, topk_groups=2,
                             top_k=3, scaling_factor=2.5, shared_hidden_dim=24),
    "sigmoid_plain": dict(router="sigmoid"),
    "gelu_tanh_shared_bias": dict(activation="gelu_tanh", shared_hidden_dim=8, expert_bias=True),
    "gelu_router_bias": dict(activation="gelu", router_bias=True, normalize=True),
    "relu_all_experts": dict(activation="relu", top_k=8),
}


def test_a_shared_expert_with_the_clamped_activation_is_refused():
    """GPT-OSS's clamped SwiGLU exists for routed experts only; a shared expert used to fall back to SiLU."""
    with pytest.raises(ConfigError, match="clamped_swiglu .* has no shared-expert form; set shared_hidden_dim: 0"):
        make(activation="clamped_swiglu", swiglu_limit=0.5, swiglu_alpha=2.0, shared_hidden_dim=8)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_reference(case):
    moe = make(**CASES[case])
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1)) * 2
    out = moe(x)  # with gradients: gate and up as two products, per expert
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = naive(moe, x)
    assert rel_err(out, ref) <= 2e-6
    with torch.no_grad():  # inference: gate and up as one product (per expert, or grouped from 64 rows)
        assert rel_err(moe(x), ref) <= 2e-6
        assert rel_err(moe(x[:1, :2]), naive(moe, x[:1, :2])) <= 2e-6  # per expert


@pytest.mark.parametrize("case", ["softmax_groups", "topk_softmax_groups", "sigmoid_deepseek"])
def test_group_limit_changes_some_choices(case):
    """The group cases above do exclude experts that would otherwise have been picked."""
    moe = make(**CASES[case])
    free = make(**{**CASES[case], "n_groups": 1, "topk_groups": 1})
    free.load_state_dict(moe.state_dict())
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1)) * 2
    ids = moe.router(x.reshape(-1, D))[2].sort(-1).values
    free_ids = free.router(x.reshape(-1, D))[2].sort(-1).values
    assert (ids != free_ids).any(-1).float().mean() > 0.1


def test_clamp_is_active_in_the_clamped_case():
    """The clamped_swiglu reference cases above do reach the clamp (else they would test plain SwiGLU)."""
    moe = make(**CASES["topk_softmax_gptoss"])
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1)) * 2
    gate = torch.einsum("efd,nd->enf", moe.experts.gate_proj, x.reshape(-1, D))
    assert (gate > 0.8).float().mean() > 0.1 and (gate < -0.8).float().mean() > 0.1


@pytest.mark.parametrize("n_tokens", [1, 2, 64])
def test_decode_and_prefill_sizes(n_tokens):
    """One token (decode: only k experts run), and many (every expert gets tokens)."""
    moe = make(**CASES["sigmoid_deepseek"])
    x = torch.randn(1, n_tokens, D, generator=torch.Generator().manual_seed(2))
    assert rel_err(moe(x), naive(moe, x)) <= 2e-6


def test_all_tokens_to_one_expert_and_low_precision():
    moe = make(router_bias=True)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.arange(8.0))  # experts 7 and 6 win for every token
    x = torch.randn(2, 5, D)
    assert rel_err(moe(x), naive(moe, x)) <= 2e-6
    out = moe.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, naive(moe, x.bfloat16())) < 2e-2


def test_one_expert_top1_equals_dense_mlp():
    moe = make(n_experts=1, top_k=1, normalize=True)
    mlp = build(GatedMLPSpec(hidden_dim=FH).resolve({}, "t"), d_model=D)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(moe.experts.gate_proj[0])
        mlp.up_proj.weight.copy_(moe.experts.up_proj[0])
        mlp.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 9, D)
    assert (moe(x) - mlp(x)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("case", ["softmax_correction_scaled", "topk_softmax_gptoss", "sigmoid_deepseek"])
def test_expert_permutation_invariance(case):
    """Relabelling experts together with their router rows changes nothing. With groups, the
    permutation keeps groups intact (it shuffles groups, and experts inside each group)."""
    moe = make(**CASES[case])
    E, G = moe.spec.n_experts, moe.spec.n_groups
    g = torch.Generator().manual_seed(3)
    size = E // G
    perm = torch.cat([grp * size + torch.randperm(size, generator=g) for grp in torch.randperm(G, generator=g)])
    assert not torch.equal(perm, torch.arange(E))
    other = make(**CASES[case])
    with torch.no_grad():
        for name, p in moe.named_parameters():
            q = other.get_parameter(name)
            q.copy_(p if name.startswith("shared.") else p[perm])
    x = torch.randn(2, 11, D)
    assert rel_err(moe(x), other(x)) <= 1e-6  # only the summation order differs


def test_gradcheck_float64():
    moe = make(d_model=8, **{**CASES["sigmoid_deepseek"], "hidden_dim": 4, "shared_hidden_dim": 4}).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe, (x,))


def test_correction_bias_stays_float32():
    """DeepSeek-V3's selection bias is not rounded to bf16 (transformers keeps it in float32)."""
    moe = make(**CASES["sigmoid_deepseek"])
    bias = moe.router.correction_bias.detach().clone()
    moe.to(torch.bfloat16)
    assert moe.router.correction_bias.dtype == torch.float32 and torch.equal(moe.router.correction_bias, bias)
    assert moe.router.weight.dtype == torch.bfloat16 and not moe.router.correction_bias.requires_grad


# ------------------------------------------------------------------------------- transformers


def _randomize_hf(module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in list(module.named_parameters()) + list(module.named_buffers()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_qwen3_moe(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = hf.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=FH, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=norm_topk_prob, hidden_act="silu")
    cfg._experts_implementation = "eager"
    ref = Qwen3MoeSparseMoeBlock(cfg).eval()
    _randomize_hf(ref)
    moe = make(router="softmax", normalize=norm_topk_prob)
    with torch.no_grad():
        moe.router.weight.copy_(ref.gate.weight)
        moe.experts.gate_proj.copy_(ref.experts.gate_up_proj[:, :FH])  # first half = gate
        moe.experts.up_proj.copy_(ref.experts.gate_up_proj[:, FH:])
        moe.experts.down_proj.copy_(ref.experts.down_proj)
    x = torch.randn(2, 13, D)
    out, expected = moe(x), ref(x)
    assert rel_err(out, expected) <= 1e-6  # float32 rounding, relative to the output's scale


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_deepseek_v3(norm_topk_prob):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = hf.DeepseekV3Config(hidden_size=D, moe_intermediate_size=FH, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5,
                              norm_topk_prob=norm_topk_prob, hidden_act="silu")
    cfg._experts_implementation = "eager"
    ref = DeepseekV3MoE(cfg).eval()
    _randomize_hf(ref)
    assert ref.gate.e_score_correction_bias.abs().min() > 0  # a random, nonzero correction bias
    moe = make(n_experts=16, top_k=4, router="sigmoid", correction_bias=True, normalize=norm_topk_prob,
               n_groups=4, topk_groups=2, scaling_factor=2.5, shared_hidden_dim=2 * FH)
    with torch.no_grad():
        moe.router.weight.copy_(ref.gate.weight)
        moe.router.correction_bias.copy_(ref.gate.e_score_correction_bias)
        moe.experts.gate_proj.copy_(ref.experts.gate_up_proj[:, :FH])
        moe.experts.up_proj.copy_(ref.experts.gate_up_proj[:, FH:])
        moe.experts.down_proj.copy_(ref.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.shared, name).weight.copy_(getattr(ref.shared_experts, name).weight)
    x = torch.randn(2, 13, D)
    out, expected = moe(x), ref(x)
    assert rel_err(out, expected) <= 1e-6  # float32 rounding, relative to the output's scale


@pytest.mark.parametrize("limit", [7.0, 0.8])
def test_matches_transformers_gpt_oss(limit):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = hf.GptOssConfig(hidden_size=D, intermediate_size=FH, num_local_experts=8, num_experts_per_tok=2,
                          swiglu_limit=limit)
    cfg._experts_implementation = "eager"
    ref = GptOssMLP(cfg).eval()
    _randomize_hf(ref)
    moe = make(router="topk_softmax", router_bias=True, expert_bias=True, activation="clamped_swiglu",
               swiglu_limit=limit, swiglu_alpha=cfg.swiglu_alpha)
    ex = ref.experts
    with torch.no_grad():  # transformers stores x @ W layouts with gate/up interleaved in columns
        moe.router.weight.copy_(ref.router.weight)
        moe.router.bias.copy_(ref.router.bias)
        moe.experts.gate_proj.copy_(ex.gate_up_proj[:, :, 0::2].transpose(1, 2))
        moe.experts.up_proj.copy_(ex.gate_up_proj[:, :, 1::2].transpose(1, 2))
        moe.experts.gate_bias.copy_(ex.gate_up_proj_bias[:, 0::2])
        moe.experts.up_bias.copy_(ex.gate_up_proj_bias[:, 1::2])
        moe.experts.down_proj.copy_(ex.down_proj.transpose(1, 2))
        moe.experts.down_bias.copy_(ex.down_proj_bias)
    x = torch.randn(2, 13, D) * 3
    out, expected = moe(x), ref(x)[0]
    assert rel_err(out, expected) <= 1e-6  # float32 rounding, relative to the output's scale


# ------------------------------------------------------------------------------- training
def test_aux_loss_matches_transformers_and_trains():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    moe = make(aux_loss_coef=0.01, router_bias=True).train()
    x = torch.randn(2, 13, D)
    out = moe(x)
    logits = F.linear(x.reshape(-1, D), moe.router.weight, moe.router.bias)
    expected = load_balancing_loss_func((logits.detach(),), 8, 2)
    assert moe.aux_loss.shape == () and moe.router_logits.shape == (26, 8)
    assert abs(moe.aux_loss.item() - 0.01 * expected.item()) <= 1e-7
    # several layers: transformers averages statistics over all layers' rows (not a sum of losses)
    other = torch.randn(26, 8)
    assert torch.allclose(load_balancing_loss([logits, other], 2), load_balancing_loss_func((logits, other), 8, 2))

    (out.square().mean() + moe.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.router.bias.grad.abs().sum() > 0
    assert moe.experts.gate_proj.grad.abs().sum() > 0 and moe.experts.down_proj.grad.abs().sum() > 0
    moe(x)
    (g,) = torch.autograd.grad(moe.aux_loss, moe.router.weight)  # the aux loss alone reaches the router
    assert g.abs().sum() > 0

    moe.eval()
    moe(x)
    assert moe.aux_loss is None and moe.router_logits is None


def test_no_aux_loss_when_coefficient_is_zero():
    moe = make().train()
    moe(torch.randn(1, 4, D))
    assert moe.aux_loss is None


def test_correction_bias_gets_no_gradient():
    moe = make(**CASES["sigmoid_deepseek"], aux_loss_coef=0.1).train()
    (moe(torch.randn(2, 5, D)).sum() + moe.aux_loss).backward()
    assert moe.router.correction_bias.grad is None
    assert moe.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- counting, config
@pytest.mark.parametrize("expert_bias", [False, True])
def test_inactive_parameters(expert_bias):
    moe = make(n_experts=8, top_k=3, expert_bias=expert_bias, shared_hidden_dim=8, router_bias=True)
    per_expert = 3 * FH * D + ((2 * FH + D) if expert_bias else 0)
    assert moe.inactive_parameters() == (8 - 3) * per_expert
    assert sum(p.numel() for p in moe.experts.parameters()) == 8 * per_expert


@pytest.mark.parametrize("fields, name", [
    ({"n_experts": 4, "top_k": 5}, "top_k"),
    ({"n_experts": 8, "top_k": 2, "n_groups": 2, "topk_groups": 3}, "topk_groups"),
    ({"n_experts": 6, "top_k": 2, "n_groups": 4, "topk_groups": 1}, "n_groups"),
])
def test_bad_specs_raise(fields, name):
    data = {"type": "moe", "hidden_dim": FH, **fields}
    with pytest.raises(ConfigError, match=rf"mlp\.{name}\b"):
        parse_spec("mlp", data, "mlp").resolve({"d_model": D, "max_seq_len": 64}, "mlp")


def test_in_a_model_active_parameters_and_init():
    """Built through a YAML config: experts are initialised like projections, and the active
    parameter count leaves out (n_experts - top_k) experts per MoE layer."""
    from llmparts import build_model

    model = build_model("tiny/qwen3", overrides=[
        "mlp.type=moe", "mlp.n_experts=4", "mlp.top_k=2", "mlp.hidden_dim=16", "mlp.router=sigmoid",
        "mlp.correction_bias=true"])
    d, n_layers = model.config.d_model, model.config.n_layers
    assert model.num_parameters() - model.num_active_parameters() == n_layers * 2 * 3 * 16 * d
    mlp = model.layers[0].mlp
    assert isinstance(mlp, MoE) and mlp.experts.gate_proj.std() > 0
    assert torch.equal(mlp.router.correction_bias, torch.zeros(4))


@pytest.mark.parametrize("name", ["softmax_normalize", "topk_softmax_gptoss", "sigmoid_deepseek", "gelu_tanh_shared_bias"])
def test_grouped_matmul_path_equals_expert_loop(name):
    """Inference on many tokens runs all experts as grouped matmuls; with gradients the per-expert
    loop runs. Both give the same output."""
    from llmparts.modules.moe import GROUPED_MIN_ROWS

    moe = make(**CASES[name]).eval()
    x = torch.randn(2, GROUPED_MIN_ROWS, D)
    with torch.no_grad():
        grouped = moe(x)
    with torch.enable_grad():
        loop = moe(x)
    assert (grouped - loop.detach()).abs().max().item() <= 1e-5 * max(1.0, loop.abs().max().item())


@pytest.mark.parametrize("name", ["softmax_normalize", "topk_softmax_gptoss", "sigmoid_deepseek", "gelu_tanh_shared_bias"])
def test_grouped_path_reads_nothing_back_from_the_device(name):
    """The grouped (prefill) path launches no op whose output size or result the host must read
    first: on CUDA each such op (``.item()``, ``bincount``, ``repeat_interleave`` without an output
    size, ``nonzero``) makes the CPU wait for the GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmparts.modules.moe import GROUPED_MIN_ROWS

    host_reads = {"_local_scalar_dense", "item", "bincount", "repeat_interleave", "nonzero", "masked_select", "unique"}

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    moe = make(**CASES[name]).eval()
    x = torch.randn(2, GROUPED_MIN_ROWS, D)
    with torch.no_grad(), Ops() as grouped:
        moe(x)
    with torch.enable_grad(), Ops() as loop:
        moe(x)
    assert "_grouped_mm" in grouped.names and not host_reads & set(grouped.names)
    assert "_grouped_mm" not in loop.names  # (the loop's one read, tolist(), is not an op)


def test_gate_and_up_are_views_of_one_tensor_through_conversions_and_copies():
    """Gate and up (the checkpoints' two parameter names, (E, F, D) each) view one (E, 2F, D) tensor,
    expert by expert, so that prefill multiplies both at once; conversions, meta-device builds,
    loading and copies keep it so, with the values and names unchanged."""
    import copy

    moe = make(**CASES["topk_softmax_gptoss"])
    ex = moe.experts
    E, Fd, _ = ex.gate_proj.shape
    assert [n for n, _ in ex.named_parameters()][:2] == ["gate_proj", "up_proj"]
    assert ex.gate_proj.shape == ex.up_proj.shape == (8, FH, D)

    def joint_holds(e) -> None:
        gu = e.gate_up()
        assert gu is not None and gu.shape == (E, 2 * Fd, D)
        assert torch.equal(gu, torch.cat((e.gate_proj, e.up_proj), 1))
        assert gu.data_ptr() == e.gate_proj.data_ptr()

    joint_holds(ex)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.to(torch.float64)
    joint_holds(ex)
    assert all(torch.equal(before[k].double(), v) for k, v in moe.state_dict().items() if k != "router.correction_bias")
    moe.float()
    twin = copy.deepcopy(moe)  # deepcopy clones parameters one by one
    joint_holds(twin.experts)
    assert twin.experts.gate_proj.data_ptr() != ex.gate_proj.data_ptr()
    with torch.device("meta"):
        fresh = build(moe.spec, d_model=D)
    assert fresh.experts.gate_up() is None  # meta tensors hold nothing
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(moe.state_dict())  # in place, into the views
    joint_holds(fresh.experts)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert torch.equal(fresh(x), moe(x)) and torch.equal(twin(x), moe(x))


@pytest.mark.parametrize("how", ["replaced", "re-pointed"])
def test_separate_gate_and_up_still_compute_the_same(how):
    """A gate or up parameter that no longer views the shared tensor (a user's own Parameter, or
    ``.data`` set) is used as it is, by the per-expert loop and the grouped matmuls alike."""
    from llmparts.modules.moe import GROUPED_MIN_ROWS

    moe = make(**CASES["gelu_tanh_shared_bias"])
    new = moe.experts.up_proj.detach().clone() * 1.5
    if how == "replaced":
        moe.experts.up_proj = torch.nn.Parameter(new)
    else:
        moe.experts.up_proj.data = new
    assert moe.experts.gate_up() is None
    x = torch.randn(2, GROUPED_MIN_ROWS, D, dtype=torch.float64)
    moe.double()
    assert moe.experts.gate_up() is None  # a conversion does not join what the user separated
    with torch.no_grad():
        grouped = moe(x)
    assert rel_err(grouped, naive(moe, x)) < 1e-12
    assert torch.equal(moe.experts.up_proj, new.double())
