"""Every tensor a path creates lands on the model's device, or on the CPU where it must (file reads).

Without a GPU the CUDA tests skip, so this runs the same paths on CPU with torch's default device set
to ``meta``: a tensor created without an explicit device lands on meta, and mixing it with the model's
CPU tensors raises. On a GPU such a tensor would land on the CPU next to CUDA tensors (the same
error), and a user who calls ``torch.set_default_device("cuda")`` would get file buffers on the GPU.
"""

from __future__ import annotations

import pytest
import torch

import llmparts
from llmparts.generation import generate
from llmparts.loading.export import save_pretrained

from conftest import requantize
import test_families as dense_cases
import test_moe_families as moe_cases


@pytest.fixture
def meta_default():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _ids(vocab: int, B: int = 2, T: int = 12):
    return torch.randint(0, vocab, (B, T), device="cpu")


def _exercise(model, vocab: int) -> None:
    """Full forward, padded forward, chunked cached decode, greedy and sampled generation, training."""
    ids = _ids(vocab)
    mask = torch.ones(2, 12, dtype=torch.long, device="cpu")
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids)
        model(ids, attention_mask=mask)
        cache = model.make_cache(2, 16)
        steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(7, 12)]
    assert full.device.type == "cpu" and torch.isfinite(full).all()
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
    generate(model, None, ids, attention_mask=mask, max_new_tokens=3)
    generate(model, None, ids, attention_mask=mask, max_new_tokens=3, temperature=0.8, top_k=5, top_p=0.9,
             min_p=0.05, repetition_penalty=1.2, seed=1)
    model.train()
    model(ids, labels=ids).backward()
    model.eval()


@pytest.mark.parametrize("name", ["gemma3-5to1", "smollm3-nope-sliding-untied", "olmo3-two-bases"])
def test_dense_families(name, tmp_path, meta_default):
    with torch.device("cpu"):
        directory, _ = dense_cases.make(name, tmp_path)
    _exercise(llmparts.load_pretrained(directory, device="cpu"), 320)


@pytest.mark.parametrize("name", ["gpt_oss-sinks-window", "deepseek_v3-groups-qlora-yarn"])
def test_moe_families(name, tmp_path, meta_default):
    with torch.device("cpu"):
        directory, _ = moe_cases.make(name, tmp_path)
    _exercise(llmparts.load_pretrained(directory, device="cpu"), 320)


def test_quantized_checkpoint(tmp_path, meta_default):
    """MXFP4 experts are read into CPU buffers and dequantized onto the model's device."""
    from llmparts.loading.quant import quantize_mxfp4

    with torch.device("cpu"):
        directory, _ = moe_cases.make("gpt_oss-sinks-window", tmp_path)

        def convert(k, sd):
            if not k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                return {}
            blocks, scales = quantize_mxfp4(sd.pop(k).transpose(1, 2).float())
            return {f"{k}_blocks": blocks, f"{k}_scales": scales}

        requantize(directory, {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}, convert)
    model = llmparts.load_pretrained(directory, device="cpu", dtype="bfloat16")
    assert model.layers[0].mlp.experts.gate_proj.device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(model(_ids(320)).float()).all()


def test_compiled_decode_and_export(tmp_path, meta_default):
    """compile_decode's one-call step (and its padded variant) and save_pretrained -> load_pretrained."""
    model = llmparts.build_model("tiny/qwen3", overrides=["attention.window=6", "attention.sinks=true"], seed=0,
                                 device="cpu").eval()
    ids = _ids(256)
    mask = torch.ones(2, 12, dtype=torch.long, device="cpu")
    mask[1, :4] = 0
    expected = generate(model, None, ids, attention_mask=mask, max_new_tokens=6)
    assert model.compile_decode()
    assert torch.equal(generate(model, None, ids, attention_mask=mask, max_new_tokens=6), expected)
    plain = llmparts.build_model("tiny/qwen3", seed=0, device="cpu")
    save_pretrained(plain, tmp_path, model_type="qwen3")
    again = llmparts.load_pretrained(tmp_path, device="cpu")
    with torch.no_grad():
        assert torch.equal(again(ids), plain(ids))
