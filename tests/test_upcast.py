"""Half-precision products on CPUs that only emulate them (``llmparts.modules.linear.upcast_linear``):
computed in float32 from a slice of the weight at a time, rounded to the half dtype; used by
``linear()`` only without gradients, from UPCAST_MIN_ROWS rows, and by the MoE experts instead of
grouped matmuls. ``EMULATED_HALF`` is patched so that every machine runs both sides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmparts
import llmparts.modules.linear as L
from llmparts.modules.moe import GROUPED_MIN_ROWS

HALF = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # relative rounding of one value


@pytest.fixture
def emulated(monkeypatch):
    def set_to(value: bool) -> None:
        monkeypatch.setattr(L, "EMULATED_HALF", {dt: value for dt in HALF})
    set_to(True)
    return set_to


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("chunk", [1 << 20, 7 * 24, 1])  # one slice; slices of 7 output rows, ragged; one value
@pytest.mark.parametrize("bias", [False, True])
def test_upcast_linear_is_the_float32_product_rounded(monkeypatch, dtype, chunk, bias):
    monkeypatch.setattr(L, "UPCAST_CHUNK", chunk)
    x = torch.randn(2, 9, 24).to(dtype)
    w = torch.randn(40, 24).to(dtype)
    b = torch.randn(40).to(dtype) if bias else None
    got = L.upcast_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (2, 9, 40)
    # Only the final rounding differs from the exact product (float32 accumulation error ~1e-6).
    assert ((got.double() - ref).abs() <= EPS[dtype] * ref.abs() + 1e-4).all()
    assert torch.equal(got, F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype))


@pytest.mark.parametrize("out,inp", [(0, 24), (40, 0)])
def test_upcast_linear_empty_weights(out, inp):
    x = torch.randn(3, inp).to(torch.bfloat16)
    w = torch.randn(out, inp).to(torch.bfloat16)
    assert torch.equal(L.upcast_linear(x, w), F.linear(x, w))


def _spy(monkeypatch):
    calls = []
    real = L.upcast_linear
    monkeypatch.setattr(L, "upcast_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", HALF)
def test_linear_upcasts_only_emulated_half_without_gradients_from_min_rows(monkeypatch, emulated, dtype):
    calls = _spy(monkeypatch)
    lin = L.Linear(32, 48).to(dtype)
    many = torch.randn(1, L.UPCAST_MIN_ROWS, 32).to(dtype)
    few = torch.randn(1, L.UPCAST_MIN_ROWS - 1, 32).to(dtype)
    with torch.no_grad():
        y = lin(many)
        lin(few)
    assert calls == [many.shape]
    assert torch.equal(y, F.linear(many.float(), lin.weight.float(), lin.bias.float()).to(dtype))
    lin(many)  # gradients enabled: the float32 weight would be kept for backward
    with torch.no_grad():
        lin.float()(many.float())  # float32
        emulated(False)
        lin.to(dtype)(many)  # native half precision
    assert len(calls) == 1
    emulated(True)
    with torch.no_grad(), pytest.raises(RuntimeError):  # a dtype mismatch stays an error
        lin(many.float())


def test_emulated_half_is_cpu_only(emulated):
    assert L.emulated_half(torch.ones(2, dtype=torch.bfloat16))
    assert not L.emulated_half(torch.ones(2))
    assert not L.emulated_half(torch.ones(2, dtype=torch.bfloat16, device="meta"))


def _tiny(name: str, dtype: torch.dtype) -> llmparts.CausalLM:
    torch.manual_seed(0)
    over = [] if name == "qwen3" else ["mlp={type: moe, n_experts: 8, top_k: 2, hidden_dim: 32}"]
    return llmparts.build_model("tiny/qwen3", overrides=over).to(dtype).eval()


@pytest.mark.parametrize("name", ["qwen3", "qwen3-moe"])
def test_model_prefill_logits_with_and_without_upcast(monkeypatch, emulated, name):
    """A bfloat16 prefill through the float32 products and through the native ones, against a
    float32 model with the same (bfloat16) weights: both within bfloat16 error of it; MoE experts
    take the per-expert loop (no grouped matmul) when emulated."""
    model = _tiny(name, torch.bfloat16)
    ref_model = _tiny(name, torch.bfloat16).float()
    ids = torch.randint(0, model.config.vocab_size, (2, max(GROUPED_MIN_ROWS, 2 * L.UPCAST_MIN_ROWS)))
    with torch.no_grad():
        ref = ref_model(ids)  # float32: grouped matmuls, no upcast
    grouped = []
    real = F.grouped_mm if hasattr(F, "grouped_mm") else None
    if real is not None:
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: grouped.append(1) or real(*a, **k))
    calls = _spy(monkeypatch)
    with torch.no_grad():
        up = model(ids)
        assert calls and not grouped
        emulated(False)
        n_up = len(calls)
        native = model(ids)
        assert len(calls) == n_up
        assert bool(grouped) == (name == "qwen3-moe" and real is not None)
    scale = ref.abs().max().item()
    err_up = (up.float() - ref).abs().max().item() / scale
    err_native = (native.float() - ref).abs().max().item() / scale
    assert err_up < 3e-2 and err_native < 3e-2, (err_up, err_native)
