"""Qwen3-MoE, DeepSeek-V2/V3 and GPT-OSS against transformers.

Tiny random transformers models (dense first layers, expert groups, shared experts, latent queries
set and null, sinks, windows shorter than the sequence) are saved with ``save_pretrained`` and loaded
through ``llmparts.load_pretrained``. Logits are compared in float32 with eager attention and the
eager (per-expert loop) experts; run with ``-s`` to see the measured differences. Router weights are
drawn large so that no two experts tie within float32 noise (a near-tie could flip a top-k choice
between two exact implementations).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmparts
from conftest import requantize, save_hf

TOL = 1e-4
SEQ = 80
WINDOW = 16
YARN_MSCALE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_attention_heads=4,
           num_key_value_heads=4)

# name: (config class, model class, kwargs)
CASES = {
    "qwen3_moe-norm": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe-sparse-step-tied": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=16, norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=WINDOW)),
    "deepseek_v3-groups-qlora-yarn": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, n_shared_experts=2, moe_intermediate_size=16, q_lora_rank=24, routed_scaling_factor=2.5,
        rope_parameters=YARN_MSCALE, **MLA)),
    "deepseek_v3-full-q-half-rope": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, n_shared_experts=1, moe_intermediate_size=16, q_lora_rank=None, norm_topk_prob=False,
        rope_interleave=False, attention_bias=True, **MLA)),
    "deepseek_v2-lite": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, moe_intermediate_size=16, q_lora_rank=None, routed_scaling_factor=1.5, **MLA)),
    "gpt_oss-sinks-window": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=32, sliding_window=WINDOW, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})),
}


def hf_moe_reference(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()


def make(name: str, directory):
    cfg_cls, model_cls, kw = CASES[name]
    kw = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256,
          "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **kw}
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias") or "sinks" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, 0.5)  # well-separated router scores
            elif "experts" in n and p.dim() == 3:
                p.normal_(0.0, 0.1)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    save_hf(model, directory)
    return directory, hf_moe_reference(directory)


def batch(T: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 320, (2, T))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    d, ref = make(name, tmp_path)
    ours = llmparts.load_pretrained(d)
    x = batch()
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
    diff = (expected - got).abs().max().item()
    print(f"{name} max abs diff {diff:.2e}")
    assert got.shape == expected.shape
    assert diff <= TOL
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) + sum(
        b.numel() for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias"))


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decode_matches_full_forward_and_transformers(name, tmp_path):
    """Prefill, then token by token past twice the window (MLA: latent cache and absorbed decode)."""
    d, ref = make(name, tmp_path)
    ours = llmparts.load_pretrained(d)
    cache = ours.make_cache(2, 64)
    prefill, total = WINDOW + 4, 2 * WINDOW + 9
    x = batch(total)
    with torch.no_grad():
        expected, full = ref(x).logits, ours(x)
        steps = [ours(x[:, :prefill], cache=cache)]
        steps += [ours(x[:, t : t + 1], cache=cache) for t in range(prefill, total)]
    cached = torch.cat(steps, 1)
    assert (cached - full).abs().max().item() <= 1e-5
    diff = (cached - expected).abs().max().item()
    print(f"{name} cached decode vs transformers max abs diff {diff:.2e}")
    assert diff <= TOL


def test_layer_kinds(tmp_path):
    """The adapters produce the per-layer structure transformers builds."""
    d, _ = make("deepseek_v3-groups-qlora-yarn", tmp_path / "ds")
    cfg = llmparts.load_pretrained(d).config
    assert [layer.mlp.type for layer in cfg.layers] == ["gated", "moe", "moe"]
    mlp = cfg.layers[1].mlp
    assert (mlp.router, mlp.n_groups, mlp.topk_groups, mlp.shared_hidden_dim, mlp.correction_bias) == ("sigmoid", 4, 2, 32, True)
    d, _ = make("qwen3_moe-sparse-step-tied", tmp_path / "qw")
    cfg = llmparts.load_pretrained(d).config
    assert [layer.mlp.type for layer in cfg.layers] == ["gated", "moe", "gated", "moe"]
    assert {layer.attention.window for layer in cfg.layers} == {WINDOW}
    d, _ = make("gpt_oss-sinks-window", tmp_path / "go")
    cfg = llmparts.load_pretrained(d).config
    assert [layer.attention.window for layer in cfg.layers] == [WINDOW, None, WINDOW]
    assert all(layer.attention.sinks for layer in cfg.layers)


@pytest.mark.parametrize("router_logits", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_training_loss_with_load_balancing_matches_transformers(tmp_path, router_logits, padded):
    """Language-model loss plus, when config.json turns router logits on (transformers adds the loss only
    then; released configs do not), router_aux_loss_coef x the load-balancing loss over all MoE layers
    and the real tokens (padding left out, as transformers' attention-mask branch does)."""
    d, _ = make("qwen3_moe-norm", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(output_router_logits=router_logits, router_aux_loss_coef=0.1)
    (d / "config.json").write_text(json.dumps(cfg))
    ref = hf_moe_reference(d).train()
    ours = llmparts.load_pretrained(d).train()
    x = batch(32)
    mask = torch.ones_like(x)
    if padded:
        mask[1, :7] = 0
    labels = x.masked_fill(mask == 0, -100)
    labels[1, 7] = -100  # (predicted from a padding position's output, which the libraries fill differently)
    expected = ref(x, labels=labels, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    got = ours(x, labels=labels, attention_mask=mask)
    assert (expected.aux_loss is not None) == router_logits
    print(f"loss {got.item():.6f} vs {expected.loss.item():.6f}")
    assert abs(got.item() - expected.loss.item()) <= 1e-5
    got.backward()
    expected.loss.backward()
    ours_grad, ref_grad = ours.layers[0].mlp.router.weight.grad, ref.model.layers[0].mlp.gate.weight.grad
    assert (ours_grad - ref_grad).abs().max().item() <= 1e-5 * ref_grad.abs().max().item() + 1e-7


# ------------------------------------------------------------------------ quantized checkpoints
def _max_logit_diff(directory) -> float:
    """Load a (quantized) checkpoint in float32 through transformers and llmparts; compare logits."""
    ref = hf_moe_reference(directory)
    ours = llmparts.load_pretrained(directory, dtype=torch.float32)
    x = batch()
    with torch.no_grad():
        return (ref(x).logits - ours(x)).abs().max().item()


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(tmp_path):
    """Experts quantized to MXFP4 blocks + scales; transformers dequantizes them on CPU, so do we."""
    from llmparts.loading.quant import quantize_mxfp4

    d, _ = make("gpt_oss-sinks-window", tmp_path)

    def convert(k, sd):
        if not k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {}
        blocks, scales = quantize_mxfp4(sd.pop(k).transpose(1, 2).float())  # (E, in, out) -> (E, out, in)
        return {f"{k}_blocks": blocks, f"{k}_scales": scales}

    requantize(d, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}, convert)
    diff = _max_logit_diff(d)
    print(f"gpt_oss mxfp4 max abs diff {diff:.2e}")
    assert diff <= TOL
    gate = llmparts.load_pretrained(d, dtype=torch.float32).layers[0].mlp.experts.gate_proj
    assert gate.dtype == torch.float32 and not torch.equal(gate, torch.zeros_like(gate))


def test_deepseek_v3_fp8_checkpoint_matches_transformers(tmp_path):
    """Every linear weight block-quantized to float8 e4m3 (+ weight_scale_inv); the MTP layer ignored."""
    from llmparts.loading.quant import quantize_fp8_blocks

    d, _ = make("deepseek_v3-groups-qlora-yarn", tmp_path)
    block = (8, 8)  # transformers' CPU dequantization needs shapes that are whole blocks

    def convert(k, sd):
        if not (k.endswith("proj.weight") or k.endswith("proj_with_mqa.weight")) or "layers" not in k:
            return {}
        q, s = quantize_fp8_blocks(sd[k], block)
        return {k: q, f"{k}_scale_inv": s}

    requantize(d, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": list(block)}, convert)
    diff = _max_logit_diff(d)
    print(f"deepseek_v3 fp8 max abs diff {diff:.2e}")
    assert diff <= TOL


def test_quantized_tensor_without_scales_fails_before_building(tmp_path):
    from llmparts.errors import CheckpointError
    from llmparts.loading.quant import quantize_mxfp4

    d, _ = make("gpt_oss-sinks-window", tmp_path)

    def convert(k, sd):
        if not k.endswith("experts.down_proj"):
            return {}
        blocks, _ = quantize_mxfp4(sd.pop(k).transpose(1, 2).float())
        return {f"{k}_blocks": blocks}  # scales missing

    requantize(d, {"quant_method": "mxfp4"}, convert)
    with pytest.raises(CheckpointError, match=r"_blocks without their _scales: model.layers.0.mlp.experts.down_proj_blocks"):
        llmparts.load_pretrained(d)


def test_deepseek_mtp_layer_is_ignored_with_a_reason(tmp_path):
    from safetensors.torch import load_file, save_file

    d, ref = make("deepseek_v3-groups-qlora-yarn", tmp_path)
    sd = load_file(d / "model.safetensors")
    n = ref.config.num_hidden_layers
    sd[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    sd[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(64)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    llmparts.load_pretrained(d)  # num_nextn_predict_layers = 1: layer n is the MTP module
    sd[f"model.layers.{n + 1}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=rf"unexpected tensors[^$]*model.layers.{{i}}.eh_proj.weight for i in {n + 1}"):
        llmparts.load_pretrained(d)


def test_deepseek_without_shared_experts_takes_only_empty_ones(tmp_path):
    """n_shared_experts 0: transformers saves the shared expert's empty tensors, which are skipped;
    shared-expert tensors that hold values contradict the config and fail the load."""
    import json

    from safetensors.torch import load_file, save_file

    d, _ = make("deepseek_v3-groups-qlora-yarn", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_shared_experts"] = 0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llmparts.errors.CheckpointError, match=r"shared_experts.down_proj.weight \(64, 32\) -> nothing: only an empty "
                                              r"tensor is expected here \(n_shared_experts is 0\)"):
        llmparts.load_pretrained(d)
    sd = load_file(d / "model.safetensors")
    for k in [k for k in sd if ".shared_experts." in k]:
        sd[k] = sd[k][:, :0] if k.endswith("down_proj.weight") else sd[k][:0]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    model = llmparts.load_pretrained(d)
    assert all(getattr(layer.mlp, "shared", None) is None for layer in model.layers)


@pytest.mark.parametrize("field,value,match", [
    ("qk_head_dim", 99, "MLA dims do not add up"),
    ("num_key_value_heads", 2, "num_key_value_heads=2 != num_attention_heads=4"),
    ("topk_group", 5, r"topk_groups must be between 1 and n_groups \(4\)"),
    ("num_experts_per_tok", 9, r"top_k must be between 1 and n_experts \(8\)"),
    ("n_group", 3, "n_experts .8. must be divisible by n_groups .3."),
])
def test_bad_deepseek_configs_fail_before_building(tmp_path, field, value, match):
    import json

    d, _ = make("deepseek_v3-groups-qlora-yarn", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llmparts.errors.LLMPartsError, match=match):
        llmparts.load_pretrained(d)
