"""The optimized decode paths equal the reference ones: the few-query CPU attention, the streaming
matrix-vector form of ``Linear``, and the compiled decode step (token for token in greedy decoding)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import llmparts
from llmparts.generation import generate
from llmparts.masks import visible
from llmparts.modules.attention import decode_attention, eager_attention
from llmparts.modules.linear import Linear, matvec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,K,window", [(1, 8, 2, None), (1, 4, 4, 5), (3, 4, 2, None), (2, 6, 1, 4)])
def test_decode_attention_matches_eager(dtype, T, H, K, window):
    B, S, D = 2, 11, 16
    q, k, v = (torch.randn(B, n, t, D, dtype=dtype) for n, t in ((H, T), (K, S), (K, S)))
    q_pos = torch.arange(S - T, S).expand(B, T)
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[1, :2] = -1  # empty slots in one row
    mask = visible(q_pos, k_pos, window)
    ref = eager_attention(q.float(), k.float(), v.float(), mask, 0.3)
    got = decode_attention(q, k, v, mask, 0.3).float()
    assert (got - ref).abs().max().item() <= (1e-6 if dtype == torch.float32 else 2e-2)
    if window is None and T == 1:  # no mask at all
        assert torch.allclose(decode_attention(q, k, v, None, 0.3).float(),
                              eager_attention(q.float(), k.float(), v.float(), None, 0.3), atol=1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("rows", [1, 3])
def test_matvec_form_equals_linear(rows):
    lin = Linear(48, 40, bias=True)
    x = torch.randn(rows, 1, 48)
    assert torch.allclose(matvec(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias), atol=1e-6)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # eager: plain F.linear
    view = torch.randn(rows, 1, 50)[..., 1:49]  # a view with a storage offset and row gaps
    assert torch.allclose(matvec(view, lin.weight, lin.bias), F.linear(view, lin.weight, lin.bias), atol=1e-6)
    if _compiler_works():
        got = torch.compile(matvec)(view, lin.weight, lin.bias)  # the input vector realised once
        assert torch.allclose(got, F.linear(view, lin.weight, lin.bias), atol=1e-6)


def _compiler_works() -> bool:
    """Whether torch.compile works at all here (a C++ compiler for inductor): then compile_decode must."""
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).eq(3).all())
    except Exception:  # noqa: BLE001
        return False


def _greedy(model, ids, n=12):
    return generate(model, None, ids, max_new_tokens=n)


MLA_LAYERS = ("attention={type: mla, n_heads: 4, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, "
              "v_head_dim: 8, q_lora_rank: 12}")


# DeepSeek-V3's layout at tiny size: MLA with low-rank queries, interleaved YaRN RoPE, a dense first
# layer, then a grouped sigmoid router with a correction bias and a shared expert.
DEEPSEEK_V3_TINY = ["attention={type: mla, n_heads: 4, q_lora_rank: 24, kv_lora_rank: 16, qk_nope_head_dim: 8, "
                    "qk_rope_head_dim: 8, v_head_dim: 8}",
                    "position={type: rope, theta: 10000.0, layout: interleaved, scaling: {type: yarn, factor: 4.0, "
                    "original_max_seq_len: 64, mscale: 1.0, mscale_all_dim: 1.0}}",
                    "mlp={type: moe, n_experts: 8, top_k: 2, hidden_dim: 32, router: sigmoid, correction_bias: true, "
                    "n_groups: 4, topk_groups: 2, normalize: true, scaling_factor: 2.5, shared_hidden_dim: 32}",
                    "layers[0].mlp={type: gated, hidden_dim: 96, activation: silu}"]


@pytest.mark.parametrize("overrides", [[], ["attention.window=6", "tie_embeddings=false"],
                                       ["layers[::2].attention.window=5"],  # rings and full buffers
                                       ["attention.sinks=true", "attention.softcap=20.0"],
                                       ["mlp={type: moe, n_experts: 4, top_k: 2, hidden_dim: 32}"],
                                       ["layers[2:].attention={type: mla, n_heads: 4, kv_lora_rank: 16, "
                                        "qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 8}"],
                                       DEEPSEEK_V3_TINY])
def test_compiled_decode_equals_eager_decode(overrides):
    """compile_decode either compiles (and then decodes the same tokens as eager, with logits within
    float32 rounding) or warns and stays eager; both are correct outcomes of the same contract."""
    model = llmparts.build_model("tiny/qwen3", overrides=overrides, seed=3).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = _greedy(model, ids)
    with torch.no_grad():
        cache = model.make_cache(2, 20)
        eager_prefill = model(ids, cache=cache)
        eager_step = model(ids[:, -1:], cache=cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = model.compile_decode()
    if not compiled:
        assert not _compiler_works(), [str(w.message)[:2000] for w in caught if "compile_decode" in str(w.message)]  # only a machine without a compiler falls back
        assert any("compile_decode" in str(w.message) for w in caught), "a fallback must say so"
        assert model._decode_parts is None
    assert torch.equal(_greedy(model, ids), expected)
    calls = _count_model_steps(model)
    with torch.no_grad():
        cache.reset()
        prefill = model(ids, cache=cache)  # compiled prefill parts (dynamic length)
        step = model(ids[:, -1:], cache=cache)  # compiled decode parts
    assert (step - eager_step).abs().max().item() <= 1e-4
    assert (prefill - eager_prefill).abs().max().item() <= 1e-4
    # A decode step is one compiled call for the whole model (torch with nested regions), MLA blocks included.
    whole = compiled and hasattr(torch.compiler, "nested_compile_region")
    assert calls == [1] * whole
    if whole:
        with torch.no_grad():
            assert _compiled_frames(model, lambda: model(ids[:, -1:], cache=cache)) == 1


def _compiled_frames(model, step) -> int:
    """How many compiled frames (dynamo entries) one call of ``step()`` runs: 1 when a decode step is
    one compiled graph; one per block when dynamo skipped the step and ran its loop eagerly."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("Torch-Compiled Region"))


def _count_model_steps(model) -> list[int]:
    """Count the calls of the compiled whole-model decode step from now on (one list entry if it exists)."""
    calls: list[int] = []
    parts = model._decode_parts
    if parts is not None and "model_step" in parts:
        calls.append(0)
        inner = parts["model_step"]

        def counted(*a):
            calls[0] += 1
            return inner(*a)

        parts["model_step"] = counted
    return calls


def test_compiled_decode_for_models_of_different_shapes_in_one_process():
    """The whole-model decode step is one function compiled for every model: a second model with
    other shapes, ring buffers instead of full ones, or another batch size gets its own graph (and
    torch's automatic dynamic shapes do not turn the first one's sizes symbolic)."""
    for overrides, B in (([], 1), (["attention.window=4", "d_model=48"], 1), (["attention.window=5"], 3), ([], 2)):
        model = llmparts.build_model("tiny/qwen3", overrides=overrides, seed=7).eval()
        ids = torch.randint(0, 256, (B, 6), generator=torch.Generator().manual_seed(2))
        expected = _greedy(model, ids, 10)
        compiled = model.compile_decode()
        assert compiled or not _compiler_works()
        calls = _count_model_steps(model)
        assert torch.equal(_greedy(model, ids, 10), expected)
        assert calls == [9] * (compiled and hasattr(torch.compiler, "nested_compile_region"))  # steps after the prefill


@pytest.mark.parametrize("overrides", [["layers[1].attention.window=7"],
                                       [MLA_LAYERS, "layers[1].attention.window=7"]])  # MLA: latent cache, ring
def test_compiled_decode_step_with_padding_and_long_caches(overrides):
    """The compiled decode step writes the cache itself and attends over a dynamic number of slots:
    left-padded batches (a mask), caches of other sizes and lengths past the compiled trial's all
    decode as eagerly, without recompiling the step for each new length."""
    model = llmparts.build_model("tiny/qwen3", overrides=overrides, seed=6).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    expected = [generate(model, None, ids, max_new_tokens=30, attention_mask=mask), _greedy(model, ids[:1, :3], 40)]
    compiled = model.compile_decode()
    assert compiled or not _compiler_works()
    generate(model, None, ids, max_new_tokens=2, attention_mask=mask)  # compiles the masked variant once
    calls = _count_model_steps(model)
    with torch.compiler.set_stance("fail_on_recompile"):  # every later length reuses the same graphs
        got = [generate(model, None, ids, max_new_tokens=30, attention_mask=mask), _greedy(model, ids[:1, :3], 40)]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert calls == [29 + 39] * (compiled and hasattr(torch.compiler, "nested_compile_region"))  # one call a step


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = llmparts.build_model("tiny/qwen3", seed=4).eval()
    ids = torch.randint(0, 256, (1, 5))
    expected = _greedy(model, ids, 6)

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="compile_decode: torch.compile failed here.*no C\\+\\+ compiler"):
        assert model.compile_decode() is False
    assert model._decode_parts is None
    assert torch.equal(_greedy(model, ids, 6), expected)


def test_training_never_uses_compiled_parts():
    model = llmparts.build_model("tiny/qwen3", seed=5)
    unusable = {"attn_in": None, "attn_out_mlp": None, "attn_out": None, "mlp": None, "head": None}
    model._decode_parts, model._prefill_parts = unusable, dict(unusable)
    for T in (1, 7):
        ids = torch.randint(0, 256, (1, T))
        model(ids, labels=ids).backward()  # grad enabled: the compiled parts are not touched


def test_every_model_gets_its_own_compiled_graphs():
    """Dynamo stops compiling a function after ``recompile_limit`` variants (8) and then runs it
    eagerly, without an error: each compile_decode call compiles its own copies, so a model of
    another shape in the same process still gets compiled graphs (checked with the limit at 2)."""
    if not _compiler_works():
        pytest.skip("torch.compile does not work on this machine")
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(recompile_limit=2):
        for d_model in (48, 64, 80):
            model = llmparts.build_model("tiny/qwen3", overrides=[f"d_model={d_model}", "n_layers=1"], seed=1).eval()
            before = counters["stats"]["unique_graphs"]
            assert model.compile_decode()
            assert counters["stats"]["unique_graphs"] > before, f"model {d_model}: no graph compiled"


def test_a_failing_whole_step_compile_falls_back_per_block():
    """If compiling the whole-model step fails for a new input (a torch compiler error), that step and
    the following ones run one block at a time, with a warning, and decode the same tokens."""
    model = llmparts.build_model("tiny/qwen3", seed=8).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = _greedy(model, ids, 8)
    if not (_compiler_works() and hasattr(torch.compiler, "nested_compile_region")):
        pytest.skip("no C++ compiler for torch.compile, or a torch without nested_compile_region")
    assert model.compile_decode() and "model_step" in model._decode_parts
    from torch._dynamo.exc import InternalTorchDynamoError

    def failing(*a):
        raise InternalTorchDynamoError("KeyError: Min(s0, u0)")

    model._decode_parts["model_step"] = failing
    with pytest.warns(UserWarning, match="compiling the whole decode step failed.*InternalTorchDynamoError"):
        got = _greedy(model, ids, 8)
    assert torch.equal(got, expected)
    assert "model_step" not in model._decode_parts


@pytest.mark.parametrize("failing", ["decode", "prefill and decode"])
def test_a_compiled_part_failing_later_falls_back_to_eager(failing):
    """If a compiled part fails on an input the trial in compile_decode did not meet (some torch versions
    fail to compile a padded batch's variant), that forward runs again eagerly, with a warning, and so
    does the model from then on: the same tokens as an eager model, no exception."""
    if not _compiler_works():
        pytest.skip("torch.compile does not work on this machine")
    model = llmparts.build_model("tiny/qwen3", seed=9).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = generate(model, None, ids, attention_mask=mask, max_new_tokens=6)
    assert model.compile_decode()

    def broken(*a, **k):
        raise RuntimeError("BackendCompilerFailed: a variant that does not compile")

    for parts in [model._decode_parts] + ([model._prefill_parts] if failing != "decode" else []):
        for name, part in parts.items():
            if callable(part):
                parts[name] = broken
    with warnings.catch_warnings(record=True) as caught:  # (decode: the whole step's per-block fallback first)
        warnings.simplefilter("always")
        got = generate(model, None, ids, attention_mask=mask, max_new_tokens=6)
    assert any("compiled part failed for this input; the model runs eagerly" in str(w.message) and "variant"
               in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert torch.equal(got, expected)
    assert model._decode_parts is None and model._prefill_parts is None


def test_a_compiled_prefill_failing_after_a_ring_was_read_raises():
    """A prefill chunk after the first reads a sliding-window ring before writing it: when its compiled
    parts fail midway, running it again would read keys this chunk already wrote, so it raises (the
    model eager from then on) and the cache refuses further steps until reset."""
    if not _compiler_works():
        pytest.skip("torch.compile does not work on this machine")
    model = llmparts.build_model("tiny/qwen3", overrides=["attention.window=6"], seed=9).eval()
    assert model.compile_decode()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = model.make_cache(1, 64)
    with torch.no_grad():
        model(ids[:, :20], cache=cache)

        def broken(*a, **k):
            raise RuntimeError("a variant that does not compile")

        model._prefill_parts["attn_out_mlp"] = broken
        with pytest.warns(UserWarning, match="runs eagerly"), pytest.raises(RuntimeError, match="does not compile"):
            model(ids[:, 20:], cache=cache)
        assert model._decode_parts is None
        with pytest.raises(llmparts.CacheError, match="partly written"):
            model(ids[:, 20:21], cache=cache)


@pytest.mark.parametrize("how", ["replaced", "re-pointed"])
def test_compiled_moe_decode_follows_gate_and_up_changed_after_compiling(how):
    """A compiled MoE decode step reads each layer's gate and up as the one tensor they view, checked
    before every step: after a user replaces or re-points one of them, decoding follows the new
    weights (as eagerly) in one call a step, and no shared tensor stays on the module between steps."""
    model = llmparts.build_model("tiny/qwen3", overrides=["mlp={type: moe, n_experts: 4, top_k: 2, hidden_dim: 32}"],
                                 seed=9).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    before = _greedy(model, ids, 10)
    compiled = model.compile_decode()
    assert compiled or not _compiler_works()
    assert torch.equal(_greedy(model, ids, 10), before)
    for block in model.layers:
        ex = block.mlp.experts
        assert ex.step_gate_up is None and ex.gate_up() is not None
        new = ex.gate_proj.detach().clone().mul_(-3.0)
        if how == "replaced":
            ex.gate_proj = torch.nn.Parameter(new)
        else:
            ex.gate_proj.data = new
        assert ex.gate_up() is None
    parts, model._decode_parts = model._decode_parts, None
    expected = _greedy(model, ids, 10)  # eager
    assert not torch.equal(expected, before)
    model._decode_parts = parts
    calls = _count_model_steps(model)
    assert torch.equal(_greedy(model, ids, 10), expected)
    assert calls == [9] * (compiled and hasattr(torch.compiler, "nested_compile_region"))


def test_compiled_decode_with_expert_biases_equals_eager():
    """GPT-OSS's experts (clamped SwiGLU, gate/up/down biases, a router bias) in the compiled step:
    the joint gate/up product with the two biases added after it decodes as eagerly."""
    mlp = ("mlp={type: moe, n_experts: 4, top_k: 2, hidden_dim: 32, activation: clamped_swiglu, swiglu_limit: 0.5, "
           "swiglu_alpha: 1.702, expert_bias: true, router: topk_softmax, router_bias: true}")
    model = llmparts.build_model("tiny/qwen3", overrides=[mlp, "attention.sinks=true"], seed=11).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "router.bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.make_cache(2, 12)
        model(ids, cache=cache)
        eager_step = model(ids[:, -1:], cache=cache)
    expected = _greedy(model, ids, 10)
    compiled = model.compile_decode()
    assert compiled or not _compiler_works()
    calls = _count_model_steps(model)
    assert torch.equal(_greedy(model, ids, 10), expected)
    with torch.no_grad():
        cache.reset()
        model(ids, cache=cache)
        step = model(ids[:, -1:], cache=cache)
    assert (step - eager_step).abs().max().item() <= 1e-4
    assert calls == [9 + 1] * (compiled and hasattr(torch.compiler, "nested_compile_region"))  # one call a step


def test_compiled_decode_with_nope_and_rope_layers_equals_eager():
    """SmolLM3's shape: NoPE layers among RoPE ones (their blocks are separate compile regions; one
    shared region failed to compile, and the model decoded eagerly)."""
    model = llmparts.build_model("tiny/qwen3", overrides=["layers[1].position.type=none"], seed=12).eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = _greedy(model, ids, 10)
    with torch.no_grad():
        expected_padded = llmparts.generate(model, None, ids, attention_mask=mask, max_new_tokens=10)
    compiled = model.compile_decode()
    assert compiled or not _compiler_works()
    calls = _count_model_steps(model)
    assert torch.equal(_greedy(model, ids, 10), expected)
    assert calls == [9] * (compiled and hasattr(torch.compiler, "nested_compile_region"))  # one call a step
    if calls:  # ... and one compiled graph
        with torch.no_grad():
            cache = model.make_cache(2, 9)
            model(ids, cache=cache)
            assert _compiled_frames(model, lambda: model(ids[:, -1:], cache=cache)) == 1
    with torch.no_grad():
        assert torch.equal(llmparts.generate(model, None, ids, attention_mask=mask, max_new_tokens=10), expected_padded)


def test_more_step_variants_than_dynamo_keeps_decode_per_block():
    """Batch sizes x padding beyond dynamo's recompile limit: the whole-model step (compiled with
    fullgraph, so the limit raises instead of running eagerly) hands those variants to the per-block
    step with a warning; the variants compiled before keep the whole step; tokens equal eager."""
    model = llmparts.build_model("tiny/qwen3", seed=13).eval()
    batches = []
    for B in range(1, 7):
        ids = torch.randint(0, 256, (B, 6), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        batches += [(ids, None), (ids, mask)]
    with torch.no_grad():
        expected = [llmparts.generate(model, None, ids, attention_mask=m, max_new_tokens=4) for ids, m in batches]
    compiled = model.compile_decode()
    assert compiled or not _compiler_works()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = [llmparts.generate(model, None, ids, attention_mask=m, max_new_tokens=4) for ids, m in batches]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if compiled and hasattr(torch.compiler, "nested_compile_region"):
        assert any("limit of compiled variants" in str(w.message) for w in caught)
        assert "model_step" in model._decode_parts and model._decode_parts["over_limit"]
        ids = batches[0][0]
        with torch.no_grad():  # batch 1, no padding: compiled before the limit, still one graph
            cache = model.make_cache(1, 8)
            model(ids, cache=cache)
            assert _compiled_frames(model, lambda: model(ids[:, -1:], cache=cache)) == 1
