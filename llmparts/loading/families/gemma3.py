"""Gemma 3 text (``model_type: gemma3_text``): sandwich norms, (1 + w) RMSNorm, scaled embeddings,
GeGLU, per-head QK-norm, local/global layers with their own RoPE bases.

Differences from Llama, all expressed as specs:
* four norms per block (``norm_placement: sandwich``), RMSNorm ``offset: 1.0`` computed in float32
  (``cast: after_weight``) — also for q_norm/k_norm;
* embeddings times sqrt(d_model), rounded to the weight dtype (``embedding.scale: sqrt_d_model``);
* softmax scale ``query_pre_attn_scalar ** -0.5`` instead of head_dim ** -0.5;
* ``sliding_attention`` layers (5 of every 6 by default) use the window and the local RoPE base
  (10k); ``full_attention`` layers the global base (1M) and the config's rope scaling.

transformers 5.23 reads two corner cases that no release hits differently: a 4.x ``rope_scaling``
written with the legacy ``type`` key is merged into parameters that already say ``rope_type:
default``, so it scales nothing; and YaRN's ``truncate`` is looked up at the top level of
``rope_parameters``, never in the per-layer-type dicts that hold it. Here ``type`` means
``rope_type`` and a per-layer ``truncate`` counts (the readings the files were written for).
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...errors import ConfigError, UnsupportedModelError
from ..weight_map import Ignore, Rename, Rule
from . import Family, HFConfig, register_family
from .common import embedding_from_hf, layer_types_from_hf, rope_from_hf, sliding_overrides
from .llama import rope_to_hf

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0


def gemma3_from_hf(hf: HFConfig) -> dict[str, Any]:
    n = hf.require("num_hidden_layers")
    d_model = hf.require("hidden_size")
    if hf.flag("use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{hf.source}: use_bidirectional_attention=true is not a causal LM")
    hf.expect("attention_bias", (False,), "Gemma 3 projections have no bias")
    hf.expect("hidden_activation", ("gelu_pytorch_tanh",), "Gemma 3's GeGLU uses tanh GELU")
    hf.get("hidden_act")  # legacy duplicate of hidden_activation, unused by transformers' Gemma3
    # transformers stores attn_logit_softcapping on the module but never applies it in Gemma 3
    hf.get("attn_logit_softcapping")
    # Rope: nested per layer type (5.x) or rope_theta / rope_local_base_freq / rope_scaling (4.x), read
    # as transformers' Gemma3TextConfig.convert_rope_params_to_dict does: a legacy rope_scaling is merged
    # into the full-attention layers' parameters, and a missing rope_theta comes from the top-level
    # rope_theta (full) / rope_local_base_freq (sliding), then the defaults.
    params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{hf.source}: {name} must be an object or null, got {value!r}")
    params = params or {}
    if "full_attention" in params or "sliding_attention" in params:
        for kind in ("full_attention", "sliding_attention"):
            if params.get(kind) is not None and not isinstance(params[kind], dict):
                raise ConfigError(f"{hf.source}: rope_parameters.{kind} must be an object, got {params[kind]!r}")
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(params), {}
    full.update(scaling or {})
    full.setdefault("rope_theta", hf.get("rope_theta", GLOBAL_THETA))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", LOCAL_THETA))
    global_rope = rope_from_hf(hf, GLOBAL_THETA, full, "rope_parameters.full_attention")
    local_rope = rope_from_hf(hf, LOCAL_THETA, local, "rope_parameters.sliding_attention")
    # transformers builds the default layer types from `sliding_window_pattern` only; a leftover
    # `_sliding_window_pattern` attribute in config.json is read but has no effect there either
    hf.get("_sliding_window_pattern")
    pattern = hf.get("sliding_window_pattern", 6)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ConfigError(f"{hf.source}: sliding_window_pattern must be an int >= 1, got {pattern!r}")
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    types = layer_types_from_hf(hf, n, default)
    softcap = hf.get("final_logit_softcapping")
    n_heads = hf.require("num_attention_heads")
    return {
        "vocab_size": hf.require("vocab_size"),
        "d_model": d_model,
        "n_layers": n,
        "max_seq_len": hf.require("max_position_embeddings"),
        "tie_embeddings": hf.flag("tie_word_embeddings", True),
        "logit_softcap": softcap,
        "embedding": embedding_from_hf(hf, 0, scale="sqrt_d_model"),  # Gemma3TextConfig: pad_token_id 0
        "attention": {
            "type": "gqa",
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads", n_heads),
            "head_dim": hf.get("head_dim", 256),
            "qk_norm": "per_head",
            "scale": hf.number("query_pre_attn_scalar", 256) ** -0.5,
        },
        "position": global_rope,
        "norm": {"type": "rmsnorm", "eps": hf.number("rms_norm_eps", 1e-6), "offset": 1.0, "cast": "after_weight"},
        "mlp": {"type": "gated", "hidden_dim": hf.require("intermediate_size"), "activation": "gelu_tanh"},
        "block": {"type": "transformer", "norm_placement": "sandwich"},
        "overrides": sliding_overrides(hf, types, hf.get("sliding_window", 4096), {"position": local_rope}),
    }


def gemma3_rules(cfg: dict[str, Any]) -> list[Rule]:
    return [
        Rename("model.embed_tokens.weight", "embed.weight"),
        Rename("model.norm.weight", "final_norm.weight"),
        Rename("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
        Rename("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_out_norm.weight"),
        Rename("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        Rename("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_out_norm.weight"),
        Rename("model.layers.{i}.self_attn.{p}_proj.weight", "layers.{i}.attn.{p}_proj.weight"),
        Rename("model.layers.{i}.self_attn.{p}_norm.weight", "layers.{i}.attn.{p}_norm.weight"),
        Rename("model.layers.{i}.mlp.{p}_proj.weight", "layers.{i}.mlp.{p}_proj.weight"),
        Ignore("model.layers.{i}.self_attn.rotary_emb.inv_freq", "RoPE tables are recomputed, never loaded"),
        Rename("lm_head.weight", "head.weight"),
    ]


def gemma3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    layers = cfg.layers
    full = next((layer for layer in layers if layer.attention.window is None), layers[0])
    local = next((layer for layer in layers if layer.attention.window is not None), None)
    a = cfg.layers[0].attention
    scale = a.scale if a.scale is not None else a.head_dim**-0.5
    rope = {"full_attention": rope_to_hf(full.position)}
    # transformers' Gemma 3 builds its sliding-window mask whether or not a layer uses it, so a model
    # without sliding layers still states a window (the context: it would cut nothing) and a local base
    rope["sliding_attention"] = rope_to_hf(local.position) if local is not None else {
        "rope_type": "default", "rope_theta": LOCAL_THETA}
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.embedding.padding_idx,
        "query_pre_attn_scalar": int(round(scale**-2)) if abs(scale**-2 - round(scale**-2)) < 1e-6 else scale**-2,
        "sliding_window": local.attention.window if local is not None else cfg.max_seq_len,
        "layer_types": ["full_attention" if layer.attention.window is None else "sliding_attention" for layer in layers],
        "final_logit_softcapping": cfg.logit_softcap,
        "rope_parameters": rope,
    }


GEMMA3 = register_family(
    Family(
        model_types=("gemma3_text",),
        config_from_hf=gemma3_from_hf,
        weight_rules=gemma3_rules,
        config_to_hf=gemma3_to_hf,
    )
)
