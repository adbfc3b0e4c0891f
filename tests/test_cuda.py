"""Every path on ``device="cuda"``: the same model on GPU and CPU agree, caches decode exactly, MoE and
MLA run, quantized checkpoints dequantize onto the GPU, and the compiled decode step either works or
falls back. Skipped on machines without a CUDA device (the CPU suite covers the same code paths)."""

from __future__ import annotations

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
    for r in res["runs"]:
        assert r["load_peak_device_memory"] >= r["weight_bytes"] and r["weight_read"] > 0
    assert "load_peak_gpu_mem/weights" in res["summary"]["llmparts"]
