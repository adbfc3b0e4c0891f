"""DeepSeek-V2 / V3 (``model_type: deepseek_v2``, ``deepseek_v3``; Kimi K2 is ``kimi_k2`` with the V3
architecture): multi-head latent attention and DeepSeekMoE.

* attention is MLA (``attention.type: mla``): ``q_lora_rank`` (null: one full query projection,
  V2-Lite), ``kv_lora_rank``, ``qk_nope_head_dim`` + ``qk_rope_head_dim`` per query/key head,
  ``v_head_dim``; the latent norms use eps 1e-6 whatever ``rms_norm_eps`` says (transformers builds
  them with the default); RoPE rotates only the rope dims, in interleaved pairs (V3:
  ``rope_interleave``; V2 multiplies complex pairs, the same thing); YaRN's ``mscale_all_dim``
  goes into the softmax scale (resolved by the MLA spec);
* layers ``< first_k_dense_replace`` have a dense MLP of ``intermediate_size`` (every layer when it is
  ``num_hidden_layers`` or more; the router's fields then describe experts no layer has); the others a
  mixture of ``n_routed_experts`` plus ``n_shared_experts * moe_intermediate_size`` of always-on shared
  experts (none for 0: transformers saves that expert's empty tensors, which are skipped);
* V3 router: sigmoid scores, ``e_score_correction_bias`` for selection only, group-limited selection
  (``n_group``, ``topk_group``), ``norm_topk_prob``, ``routed_scaling_factor``; ``rope_interleave`` and
  ``norm_topk_prob`` are ``bool | None`` in transformers, which keeps a null and tests it as false;
  V2 router: softmax,
  ``topk_method: greedy`` (``group_limited_greedy`` scores groups differently and is refused), no
  renormalisation, ``routed_scaling_factor``;
* checkpoint layer ``num_hidden_layers`` onwards (``num_nextn_predict_layers`` of them) is V3's
  multi-token-prediction module, only used in training: ignored with that reason.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError, UnsupportedModelError
from ..weight_map import Ignore, Rename, Rule
from . import Family, HFConfig, register_family
from .common import get_present, llama_rules, moe_dense_overrides, one_of, rope_from_hf, sizes_from_hf
from .qwen3_moe import moe_rules


# What transformers 5.23's DeepseekV2Config / DeepseekV3Config use for a field config.json leaves out.
_DEFAULTS = {
    2: {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "moe_intermediate_size": 1407,
        "first_k_dense_replace": 0, "routed_scaling_factor": 1.0, "num_experts_per_tok": None},
    3: {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "moe_intermediate_size": 2048,
        "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4},
}


def _deepseek(hf: HFConfig, version: int) -> dict[str, Any]:
    defaults = _DEFAULTS[version]

    def field(key: str) -> Any:  # transformers' default only where the key is absent (null stays null)
        return hf.require(key) if defaults.get(key) is None else get_present(hf, key, defaults[key])

    n_heads = hf.require("num_attention_heads")
    n_kv = hf.get("num_key_value_heads", n_heads)
    if n_kv != n_heads:
        raise UnsupportedModelError(
            f"{hf.source}: num_key_value_heads={n_kv} != num_attention_heads={n_heads}; MLA expands keys and "
            "values per query head, and transformers would repeat them again: set num_key_value_heads to "
            f"{n_heads} (it has no other effect)"
        )
    nope, rope, v = field("qk_nope_head_dim"), field("qk_rope_head_dim"), field("v_head_dim")
    qk_head_dim = hf.get("qk_head_dim", nope + rope)
    if qk_head_dim != nope + rope:
        raise ConfigError(
            f"{hf.source}: MLA dims do not add up: qk_head_dim ({qk_head_dim}) must equal qk_nope_head_dim "
            f"({nope}) + qk_rope_head_dim ({rope})"
        )
    head_dim = hf.get("head_dim", rope)  # transformers sets it to qk_rope_head_dim (the rotary width)
    if head_dim != rope:
        raise ConfigError(
            f"{hf.source}: head_dim ({head_dim}) must equal qk_rope_head_dim ({rope}) for DeepSeek models "
            "(transformers uses it as the RoPE width)"
        )
    interleave = hf.flag("rope_interleave", True, null=False) if version == 3 else True
    act = hf.expect("hidden_act", ("silu",), "DeepSeek MLPs use silu")
    hf.expect("mlp_bias", (False,), "DeepSeek MLPs have no bias")
    position = rope_from_hf(hf, 10000.0)
    position["layout"] = "interleaved" if interleave else "half"
    n_layers = hf.require("num_hidden_layers")
    bias = hf.flag("attention_bias", False)
    cfg: dict[str, Any] = {
        **sizes_from_hf(hf),
        "attention": {
            "type": "mla",
            "n_heads": n_heads,
            "q_lora_rank": field("q_lora_rank"),
            "kv_lora_rank": field("kv_lora_rank"),
            "qk_nope_head_dim": nope,
            "qk_rope_head_dim": rope,
            "v_head_dim": v,
            "bias": bias,
            "latent_norm_eps": 1e-6,  # DeepseekV{2,3}RMSNorm(rank) with its default eps
        },
        "position": position,
        "norm": {"type": "rmsnorm", "eps": hf.number("rms_norm_eps", 1e-6)},
    }
    dense = {"type": "gated", "hidden_dim": hf.require("intermediate_size"), "activation": act}
    n_experts = one_of(hf, ("n_routed_experts", "num_local_experts", "num_experts"), defaults["n_routed_experts"])
    first_dense = field("first_k_dense_replace")
    if isinstance(first_dense, bool) or not isinstance(first_dense, int) or first_dense < 0:
        raise ConfigError(f"{hf.source}: first_k_dense_replace must be an integer >= 0, got {first_dense!r}")
    freq = hf.get("moe_layer_freq", 1)
    if freq != 1:
        raise UnsupportedModelError(f"{hf.source}: moe_layer_freq={freq} is not supported (transformers ignores it; only 1 is unambiguous)")
    hf.get("ep_size")  # expert-parallel degree of the original training code: no effect on the function
    hf.get("aux_loss_alpha")  # training-only
    hf.get("seq_aux")
    mtp = hf.get("num_nextn_predict_layers", 0) if version == 3 else 0
    cfg["weights"] = {"mtp_layers": list(range(n_layers, n_layers + (mtp or 0)))}
    if not n_experts or first_dense >= n_layers:  # transformers: layer i is a MoE when i >= first_k_dense_replace
        for key in ("num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor", "n_shared_experts",
                    "scoring_func", "topk_method", "norm_topk_prob", "n_group", "topk_group"):
            hf.get(key)  # describe the experts no layer has
        cfg["mlp"] = dense
        return cfg
    shared = field("n_shared_experts") or 0
    moe: dict[str, Any] = {
        "type": "moe",
        "n_experts": n_experts,
        "top_k": field("num_experts_per_tok"),
        "hidden_dim": field("moe_intermediate_size"),
        "activation": act,
        "scaling_factor": field("routed_scaling_factor"),
        "shared_hidden_dim": shared * field("moe_intermediate_size"),
    }
    if version == 3:
        hf.expect("scoring_func", ("sigmoid",), "DeepSeek-V3 routes with sigmoid scores")
        hf.expect("topk_method", ("noaux_tc",), "DeepSeek-V3 selects with the correction bias (noaux_tc)")
        moe.update(router="sigmoid", correction_bias=True, normalize=hf.flag("norm_topk_prob", True, null=False),
                   n_groups=field("n_group"), topk_groups=field("topk_group"))
    else:
        hf.expect("scoring_func", ("softmax",), "DeepSeek-V2 routes with softmax scores")
        hf.expect("topk_method", ("greedy",), "only greedy top-k is supported for DeepSeek-V2 "
                  "(group_limited_greedy scores groups by their max, which llmparts does not implement)")
        hf.get("n_group")
        hf.get("topk_group")
        if hf.flag("norm_topk_prob", False):
            raise UnsupportedModelError(f"{hf.source}: norm_topk_prob=true: transformers' DeepSeek-V2 ignores it; refusing the ambiguity")
        moe.update(router="softmax", normalize=False)
    cfg["mlp"] = moe
    cfg["overrides"] = moe_dense_overrides(list(range(first_dense)), dense)
    return cfg


def deepseek_rules(cfg: dict[str, Any]) -> list[Rule]:
    rules: list[Rule] = [
        Ignore(f"model.layers.{i}.{{path}}", "multi-token-prediction module (DeepSeek-V3 num_nextn_predict_layers): "
               "used only for training and speculative decoding")
        for i in cfg.get("weights", {}).get("mtp_layers", [])
    ]
    if cfg["mlp"].get("shared_hidden_dim", 0) == 0:  # n_shared_experts 0: transformers saves empty ones
        rules.append(Ignore("model.layers.{i}.mlp.shared_experts.{path}", "n_shared_experts is 0", empty=True))
    rules += [
        Rename("model.layers.{i}.self_attn.kv_a_proj_with_mqa.{w}", "layers.{i}.attn.kv_a_proj.{w}"),
        Rename("model.layers.{i}.self_attn.{p}_layernorm.weight", "layers.{i}.attn.{p}_norm.weight"),
        *moe_rules(correction="e_score_correction_bias", shared="shared_experts"),
        *llama_rules(cfg["tie_embeddings"]),
    ]
    return rules


register_family(Family(model_types=("deepseek_v3", "kimi_k2"), config_from_hf=lambda hf: _deepseek(hf, 3),
                       weight_rules=deepseek_rules))
register_family(Family(model_types=("deepseek_v2",), config_from_hf=lambda hf: _deepseek(hf, 2),
                       weight_rules=deepseek_rules))
