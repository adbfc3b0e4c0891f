"""Llama 3 / 3.1 / 3.2 (``model_type: llama``): pre-norm, GQA, SwiGLU, RoPE with llama3 scaling."""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from . import Family, HFConfig, register_family
from .common import dense_to_hf, llama_rules, rope_from_hf, sizes_from_hf


def llama_core(hf: HFConfig, default_eps: float = 1e-6, default_theta: float = 10000.0,
               pad_default: int | None = None) -> dict[str, Any]:
    """Fields shared by Llama-layout configs (Llama, Qwen3, Mistral, SmolLM3)."""
    n_heads = hf.require("num_attention_heads")
    head_dim = hf.get("head_dim")
    act = hf.expect("hidden_act", ("silu",), "the gated MLP of this family uses silu")
    mlp_bias = hf.flag("mlp_bias", False)
    attention_bias = hf.flag("attention_bias", False)
    return {
        **sizes_from_hf(hf, pad_default),
        "attention": {
            "type": "gqa",
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads", n_heads),
            "head_dim": head_dim,
            "qkv_bias": bool(attention_bias),
            "out_bias": bool(attention_bias),
        },
        "position": rope_from_hf(hf, default_theta),
        "norm": {"type": "rmsnorm", "eps": hf.number("rms_norm_eps", default_eps)},
        "mlp": {"type": "gated", "hidden_dim": hf.require("intermediate_size"), "activation": act, "bias": bool(mlp_bias)},
    }


def llama_from_hf(hf: HFConfig) -> dict[str, Any]:
    return llama_core(hf)


def rope_to_hf(position: Any) -> dict[str, Any]:
    """llmparts RoPE spec -> transformers 5 ``rope_parameters``."""
    names = {"original_max_seq_len": "original_max_position_embeddings"}
    out: dict[str, Any] = {"rope_type": position.scaling.type, "rope_theta": position.theta}
    for k, v in vars(position.scaling).items():
        if k != "type" and v is not None:
            out[names.get(k, k)] = v
    return out


def llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a, m = cfg.attention, cfg.mlp
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **dense_to_hf(cfg),
        "head_dim": cfg.layers[0].attention.head_dim,
        "attention_bias": a.qkv_bias,
        "mlp_bias": m.bias,
        "rope_parameters": rope_to_hf(cfg.layers[0].position),
    }


LLAMA = register_family(
    Family(
        model_types=("llama",),
        config_from_hf=llama_from_hf,
        weight_rules=lambda cfg: llama_rules(cfg["tie_embeddings"]),
        config_to_hf=llama_to_hf,
    )
)
