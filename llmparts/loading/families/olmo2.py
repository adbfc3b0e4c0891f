"""OLMo 2 (``model_type: olmo2``): post-norm blocks, full-width QK-norm, float32 RMSNorm and RoPE.

Differences from Llama, all expressed as specs:
* no norm on the branch inputs: ``x + norm(attn(x))``, ``x + norm(mlp(x))`` (``norm_placement: post``);
  HF's ``post_attention_layernorm`` / ``post_feedforward_layernorm`` are our ``attn_out_norm`` /
  ``mlp_out_norm`` (in Llama ``post_attention_layernorm`` is the pre-MLP norm);
* q and k are RMS-normalised over the whole projected width (``qk_norm: full``), before the split
  into heads and before RoPE;
* RMSNorm multiplies by the weight in float32 and casts last (``cast: after_weight``);
* RoPE rotates in float32 and casts back (``compute_dtype: float32``);
* no ``head_dim`` field (d_model / n_heads; transformers honours one if a config.json carries it),
  untied head by default, optional ``attention_bias`` on q/k/v/o (off in every release).
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ..weight_map import Ignore, Rename, Rule
from . import Family, HFConfig, register_family
from .common import dense_to_hf, export_rope, rope_from_hf, sizes_from_hf


def olmo_core(hf: HFConfig) -> dict[str, Any]:
    """Fields shared by OLMo 2 and OLMo 3, everything except ``position`` and ``overrides``."""
    n_heads = hf.require("num_attention_heads")
    bias = hf.flag("attention_bias", False)
    act = hf.expect("hidden_act", ("silu",), "the gated MLP of this family uses silu")
    # OLMo 1's q/k/v clipping: transformers' OLMo 2/3 never apply it, so only null is the same network
    hf.expect("clip_qkv", (None,), "q/k/v clipping is not part of OLMo 2/3 in transformers")
    return {
        **sizes_from_hf(hf, pad_default=1),  # Olmo2Config / Olmo3Config: pad_token_id 1
        "attention": {
            "type": "gqa",
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads", n_heads),
            "head_dim": hf.get("head_dim"),  # not an Olmo2Config field; getattr'd by the modeling code
            "qkv_bias": bias,
            "out_bias": bias,
            "qk_norm": "full",  # OLMo2: over nH*D / nKV*D, not per head
        },
        "norm": {"type": "rmsnorm", "eps": hf.number("rms_norm_eps", 1e-5), "cast": "after_weight"},
        "mlp": {"type": "gated", "hidden_dim": hf.require("intermediate_size"), "activation": act},
        "block": {"type": "transformer", "norm_placement": "post"},
    }


def olmo_rope(hf: HFConfig, default_theta: float, params: dict[str, Any] | None = None,
              where: str | None = None) -> dict[str, Any]:
    return {**rope_from_hf(hf, default_theta, params, where), "compute_dtype": "float32"}


def olmo2_from_hf(hf: HFConfig) -> dict[str, Any]:
    return {**olmo_core(hf), "position": olmo_rope(hf, 10000.0)}


def olmo_rules(cfg: dict[str, Any]) -> list[Rule]:
    return [
        Rename("model.embed_tokens.weight", "embed.weight"),
        Rename("model.norm.weight", "final_norm.weight"),
        Rename("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_out_norm.weight"),
        Rename("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_out_norm.weight"),
        Rename("model.layers.{i}.self_attn.{p}_proj.{w}", "layers.{i}.attn.{p}_proj.{w}"),
        Rename("model.layers.{i}.self_attn.{p}_norm.weight", "layers.{i}.attn.{p}_norm.weight"),
        Rename("model.layers.{i}.mlp.{p}_proj.weight", "layers.{i}.mlp.{p}_proj.weight"),
        Ignore("model.layers.{i}.self_attn.rotary_emb.inv_freq", "RoPE tables are recomputed, never loaded"),
        Rename("lm_head.weight", "head.weight"),
    ]


def olmo_core_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a = cfg.attention
    out = {
        **dense_to_hf(cfg),
        "attention_bias": a.qkv_bias,
    }
    if a.head_dim is not None:
        out["head_dim"] = a.head_dim
    return out


def olmo2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "olmo2",
        "architectures": ["Olmo2ForCausalLM"],
        **olmo_core_to_hf(cfg),
        "rope_parameters": export_rope(cfg, 0),
    }
    return out


OLMO2 = register_family(
    Family(model_types=("olmo2",), config_from_hf=olmo2_from_hf, weight_rules=olmo_rules, config_to_hf=olmo2_to_hf)
)
