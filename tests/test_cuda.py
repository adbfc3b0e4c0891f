"""Every path on ``device="cuda"``: the same model on GPU and CPU agree, caches decode exactly, MoE and
MLA run, quantized checkpoints dequantize onto the GPU, every family's tiny model matches transformers
on the GPU, the compiled decode step compiles there (with triton) and generates as eager does, half
precision runs, and the benchmark runs unchanged. Skipped on machines without a CUDA device (the CPU
suite covers the same code paths); run on an H100 with torch 2.11 (docs/benchmarks.md, "CUDA")."""

from __future__ import annotations

import warnings

import pytest
import torch

import llmparts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "gqa": [],
    "window-sinks": ["attention.window=6", "attention.sinks=true", "tie_embeddings=false"],
    "moe": ["mlp={type: moe, n_experts: 8, top_k: 2, hidden_dim: 32, router: sigmoid, correction_bias: true, "
            "n_groups: 4, topk_groups: 2, shared_hidden_dim: 32}"],
    "mla": ["attention={type: mla, n_heads: 4, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 8, "
            "qk_rope_head_dim: 8, v_head_dim: 8}"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_cpu_and_caches(name):
    cpu = llmparts.build_model("tiny/qwen3", overrides=CASES[name], seed=0).eval()
    gpu = llmparts.build_model("tiny/qwen3", overrides=CASES[name], seed=0).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda")
    if name == "moe":  # gate and up still view one tensor, on the GPU (joined again after the move)
        assert all(b.mlp.experts.gate_up() is not None and b.mlp.experts.gate_up().is_cuda for b in gpu.layers)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref = cpu(ids)
        full = gpu(ids.cuda())
        cache = gpu.make_cache(2, 32)
        steps = [gpu(ids[:, :9].cuda(), cache=cache)] + [gpu(ids[:, t : t + 1].cuda(), cache=cache) for t in range(9, 20)]
    assert (full.cpu() - ref).abs().max().item() <= 1e-4
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_generate_and_compile_on_gpu():
    model = llmparts.build_model("tiny/qwen3", seed=1, device="cuda").eval()
    ids = torch.randint(0, 256, (1, 8), device="cuda")
    expected = llmparts.generate(model, None, ids, max_new_tokens=8)
    model.compile_decode()  # compiles with triton, or warns and stays eager
    assert torch.equal(llmparts.generate(model, None, ids, max_new_tokens=8), expected)


def test_load_pretrained_onto_gpu(tmp_path):
    from llmparts.loading.export import save_pretrained

    model = llmparts.build_model("tiny/qwen3", seed=2)
    save_pretrained(model, tmp_path, model_type="qwen3")
    gpu = llmparts.load_pretrained(tmp_path, device="cuda")
    assert gpu.device.type == "cuda"
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert (gpu(ids.cuda()).cpu() - model(ids)).abs().max().item() <= 1e-4


def test_dequantize_onto_gpu():
    from llmparts.loading.quant import dequantize_fp8_blocks, dequantize_mxfp4, quantize_fp8_blocks, quantize_mxfp4

    w = torch.randn(4, 64, 96)
    blocks, scales = quantize_mxfp4(w)
    cpu = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32, device="cuda").cpu(), cpu)
    q, s = quantize_fp8_blocks(w[0], (16, 32))
    cpu = dequantize_fp8_blocks(q, s, (16, 32), torch.float32)
    assert torch.equal(dequantize_fp8_blocks(q, s, (16, 32), torch.float32, device="cuda").cpu(), cpu)


def test_bench_runs_on_gpu(tmp_path, monkeypatch):
    """`llmparts bench --device cuda` runs unchanged: both libraries, the bandwidth probes on the GPU, and
    the load's peak GPU memory against the weight bytes."""
    import json

    from llmparts import bench

    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    out = tmp_path / "bench.json"
    assert bench.main(["tiny/qwen3", "--dtype", "float32", "--repeats", "1", "--prefill", "8", "--new-tokens", "40",
                       "--contexts", "24", "--device", "cuda", "--compile", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["float32"]
    assert res["device"] == "cuda" and res["device_name"] == torch.cuda.get_device_name()
    for r in res["runs"]:
        assert r["load_peak_device_memory"] >= r["weight_bytes"] and r["weight_read"] > 0
    assert "load_peak_gpu_mem/weights" in res["summary"]["llmparts"]


# Every family's tiny transformers model (the parity suites' cases, 5.x layout), on the GPU in both libraries.
def _family_cases() -> dict[str, tuple]:
    import test_families
    import test_moe_families
    import test_parity

    cases = {f"dense:{n}": (test_parity, n) for n in test_parity.CASES}
    cases.update({f"families:{n}": (test_families, n) for n in test_families.CASES})
    cases.update({f"moe:{n}": (test_moe_families, n) for n in test_moe_families.CASES})
    return cases


FAMILIES = _family_cases()


def _make_family(key: str, directory):
    """(checkpoint dir, transformers reference on the GPU) for one family case."""
    from conftest import hf_reference

    module, name = FAMILIES[key]
    made = module.make(name, directory)
    d, ref = (made, hf_reference(made)) if module.__name__ == "test_parity" else made
    return d, ref.to("cuda")


@pytest.mark.parametrize("key", list(FAMILIES))
def test_family_on_gpu_matches_transformers_on_gpu(key, tmp_path):
    """Loaded straight onto the GPU, every family's logits match transformers' on the GPU, and a cached
    prefill + token-by-token decode (past twice the sliding window) matches the full forward there."""
    d, ref = _make_family(key, tmp_path)
    ours = llmparts.load_pretrained(d, device="cuda")
    assert all(p.is_cuda for p in ours.parameters()) and all(b.is_cuda for b in ours.buffers())
    x = torch.randint(0, 320, (2, 41), device="cuda")
    with torch.no_grad():
        expected, full = ref(x).logits, ours(x)
        cache = ours.make_cache(2, 64)
        steps = [ours(x[:, :20], cache=cache)] + [ours(x[:, t : t + 1], cache=cache) for t in range(20, 41)]
    diff = (expected - full).abs().max().item()
    print(f"{key} on cuda: max abs diff vs transformers {diff:.2e}")
    assert full.is_cuda and diff <= 1e-4
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


COMPILED = ["dense:llama-gqa-llama3-tied", "families:gemma3-5to1", "moe:qwen3_moe-norm",
            "moe:deepseek_v3-groups-qlora-yarn", "moe:gpt_oss-sinks-window"]


@pytest.mark.parametrize("key", COMPILED)
def test_compiled_generation_on_gpu_equals_eager(key, tmp_path):
    """compile_decode() compiles on a GPU with triton (no silent eager fallback), and greedy generation
    of a left-padded batch through the compiled parts (the whole-model step, no fallback) equals the eager
    generation token for token."""
    from torch.utils._triton import has_triton

    d, _ = _make_family(key, tmp_path)
    model = llmparts.load_pretrained(d, device="cuda")
    ids = torch.randint(0, 320, (2, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second prompt is 5 tokens shorter
    eager = llmparts.generate(model, None, ids, attention_mask=mask, max_new_tokens=12)
    with warnings.catch_warnings():  # no fallback (eager, or one compiled block at a time) either
        warnings.filterwarnings("error", message="compile_decode")
        assert model.compile_decode() is has_triton()
        assert torch.equal(llmparts.generate(model, None, ids, attention_mask=mask, max_new_tokens=12), eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu(dtype):
    """bfloat16 / float16 on the GPU: eager logits close to float32's, the compiled step close to eager,
    and seeded sampling reproducible."""
    from torch.utils._triton import has_triton

    ref = llmparts.build_model("tiny/qwen3", seed=3, device="cuda").eval()
    model = llmparts.build_model("tiny/qwen3", seed=3, device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, 256, (1, 16), device="cuda")
    with torch.no_grad():
        full, half = ref(ids), model(ids)
    assert half.dtype == torch.float32 and ((half - full).norm() / full.norm()).item() < 2e-2
    sampled = llmparts.generate(model, None, ids, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5)
    assert torch.equal(llmparts.generate(model, None, ids, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5),
                       sampled)
    assert model.compile_decode() is has_triton()  # (checks the compiled logits against eager ones)
    greedy = llmparts.generate(model, None, ids, max_new_tokens=10)
    assert greedy.shape == (1, 26) and greedy.is_cuda
