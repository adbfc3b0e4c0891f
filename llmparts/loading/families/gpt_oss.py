"""GPT-OSS (``model_type: gpt_oss``): sinks, alternating sliding/full attention, a biased MoE.

* attention: GQA with biases on q/k/v/o (``attention_bias``), one learned sink logit per head,
  ``sliding_attention`` layers with a window of ``sliding_window`` (128), YaRN RoPE (``truncate:
  false``); RMSNorm multiplies by the weight in float32 and casts last;
* MLP: ``num_local_experts`` experts, router with a bias, top ``num_experts_per_tok`` of the logits
  then a softmax over those; experts with biases and the clamped SwiGLU ``(clamp(up, -l, l) + 1) *
  g * sigmoid(alpha g)``, ``g = min(gate, l)``;
* checkpoint layout: experts are stored for ``x @ W`` (``gate_up_proj`` (E, d_model, 2F) with gate and
  up interleaved in its last dim: columns 0::2 gate, 1::2 up; ``down_proj`` (E, F, d_model)). The
  released weights are MXFP4 (``*_blocks`` + ``*_scales``), dequantized by the loader.
"""

from __future__ import annotations

from typing import Any

from ..weight_map import Rename, Rule
from . import Family, HFConfig, register_family
from .common import (layer_types_from_hf, llama_rules, one_of, rope_from_hf, router_aux_loss_coef, sizes_from_hf,
                     sliding_overrides)


# transformers 5.23's GptOssConfig default rope_parameters (used when config.json has none); without
# a theta: the file's top-level rope_theta fills it, else the class's default_theta (150000)
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def gpt_oss_from_hf(hf: HFConfig) -> dict[str, Any]:
    n_heads = hf.require("num_attention_heads")
    n_layers = hf.require("num_hidden_layers")
    bias = hf.flag("attention_bias", True)
    hf.get("hidden_act")  # transformers' GPT-OSS experts hard-code the clamped SwiGLU; the field is unused
    hf.get("initial_context_length")  # OpenAI's original config key; transformers ignores it
    n_experts = one_of(hf, ("num_local_experts", "num_experts"), 128)
    top_k = one_of(hf, ("num_experts_per_tok", "experts_per_token"), 4)
    cfg: dict[str, Any] = {
        **sizes_from_hf(hf),
        "attention": {
            "type": "gqa",
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads", n_heads),
            "head_dim": hf.get("head_dim", 64),
            "qkv_bias": bias,
            "out_bias": bias,
            "sinks": True,
        },
        "position": rope_from_hf(hf, 150000.0, default_params=_DEFAULT_ROPE),
        "norm": {"type": "rmsnorm", "eps": hf.number("rms_norm_eps", 1e-5), "cast": "after_weight"},
        "mlp": {
            "type": "moe",
            "n_experts": n_experts,
            "top_k": top_k,
            "hidden_dim": hf.require("intermediate_size"),
            "activation": "clamped_swiglu",
            "swiglu_limit": hf.number("swiglu_limit", 7.0),
            "swiglu_alpha": hf.number("swiglu_alpha", 1.702),
            "expert_bias": True,
            "router": "topk_softmax",
            "router_bias": True,
            "aux_loss_coef": router_aux_loss_coef(hf),
        },
    }
    default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    types = layer_types_from_hf(hf, n_layers, default)
    cfg["overrides"] = sliding_overrides(hf, types, hf.get("sliding_window", 128))
    return cfg


def gpt_oss_rules(cfg: dict[str, Any]) -> list[Rule]:
    ex = "model.layers.{i}.mlp.experts"
    return [
        Rename("model.layers.{i}.self_attn.sinks", "layers.{i}.attn.sinks"),
        Rename("model.layers.{i}.mlp.router.{w}", "layers.{i}.mlp.router.{w}"),
        # (E, d_model, 2F), gate/up interleaved in the last dim -> two (E, F, d_model) parameters
        Rename(f"{ex}.gate_up_proj", "layers.{i}.mlp.experts.gate_proj", ops=("even", "transpose")),
        Rename(f"{ex}.gate_up_proj", "layers.{i}.mlp.experts.up_proj", ops=("odd", "transpose")),
        Rename(f"{ex}.gate_up_proj_bias", "layers.{i}.mlp.experts.gate_bias", ops=("even",)),
        Rename(f"{ex}.gate_up_proj_bias", "layers.{i}.mlp.experts.up_bias", ops=("odd",)),
        Rename(f"{ex}.down_proj", "layers.{i}.mlp.experts.down_proj", ops=("transpose",)),
        Rename(f"{ex}.down_proj_bias", "layers.{i}.mlp.experts.down_bias"),
        *llama_rules(cfg["tie_embeddings"]),
    ]


register_family(Family(model_types=("gpt_oss",), config_from_hf=gpt_oss_from_hf, weight_rules=gpt_oss_rules))
