"""Qwen3-MoE (``model_type: qwen3_moe``): Qwen3 attention with a sparse mixture of experts.

Differences from Qwen3 dense: the MLP of layer i is a mixture of ``num_experts`` experts of width
``moe_intermediate_size`` (softmax router over all experts, top ``num_experts_per_tok``,
renormalised when ``norm_topk_prob``), unless i is in ``mlp_only_layers`` or ``(i + 1) %
decoder_sparse_step != 0``: then a dense MLP of ``intermediate_size``. No shared expert. ``head_dim``
defaults to hidden / heads (not 128 as in Qwen3 dense). With ``use_sliding_window`` the window applies
to every layer (transformers ignores ``max_window_layers`` for this family).
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from ..weight_map import Rename, Rule
from . import Family, HFConfig, register_family
from .common import check_window, get_present, llama_rules, moe_dense_overrides, one_of, router_aux_loss_coef
from .llama import llama_core


def qwen3_moe_from_hf(hf: HFConfig) -> dict[str, Any]:
    cfg = llama_core(hf)
    cfg["attention"]["qk_norm"] = "per_head"
    hf.expect("mlp_bias", (False,), "Qwen3-MoE MLPs have no bias")
    n = cfg["n_layers"]
    # read either way (released files carry it, null, unused); 4096 is the config class default, null means none
    sliding_window = get_present(hf, "sliding_window", 4096)
    window = sliding_window if hf.flag("use_sliding_window", False) else None
    hf.get("max_window_layers")  # read by Qwen2; transformers' Qwen3-MoE ignores it (window on all layers)
    if window is not None:
        cfg["attention"]["window"] = check_window(hf, window)
    n_experts = one_of(hf, ("num_experts", "num_local_experts"), 0)
    dense = cfg["mlp"]
    step = hf.get("decoder_sparse_step", 1)
    only = hf.get("mlp_only_layers", [])
    dense_layers = list(range(n))
    if n_experts:
        if not isinstance(step, int) or step < 1:
            raise ConfigError(f"{hf.source}: decoder_sparse_step must be an integer >= 1, got {step!r}")
        if not isinstance(only, list) or any(not isinstance(i, int) or not 0 <= i < n for i in only):
            raise ConfigError(f"{hf.source}: mlp_only_layers must list layer indices in [0, {n}), got {only!r}")
        dense_layers = [i for i in dense_layers if i in only or (i + 1) % step != 0]
    if len(dense_layers) == n:  # no MoE layer: the experts' fields describe nothing (as in transformers)
        for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef"):
            hf.get(key)
        return cfg
    cfg["mlp"] = {
        "type": "moe",
        "n_experts": n_experts,
        "top_k": hf.require("num_experts_per_tok"),
        "hidden_dim": hf.require("moe_intermediate_size"),
        "activation": dense["activation"],
        "router": "softmax",
        "normalize": hf.flag("norm_topk_prob", False),
        "aux_loss_coef": router_aux_loss_coef(hf),
    }
    cfg["overrides"] = moe_dense_overrides(dense_layers, dense)
    return cfg


def moe_rules(router: str = "gate", correction: str | None = None, shared: str | None = None) -> list[Rule]:
    """Per-expert checkpoint tensors (``mlp.experts.{e}.{gate,up,down}_proj.weight``) stacked into
    ``(E, out, in)`` parameters; the router (``mlp.<router>.weight``), an optional selection-bias
    buffer and optional shared experts."""
    rules: list[Rule] = [
        Rename("model.layers.{i}.mlp.experts.{e}.{p}_proj.weight", "layers.{i}.mlp.experts.{p}_proj[{e}]"),
        Rename(f"model.layers.{{i}}.mlp.{router}.weight", "layers.{i}.mlp.router.weight"),
    ]
    if correction:
        rules.append(Rename(f"model.layers.{{i}}.mlp.{router}.{correction}", "layers.{i}.mlp.router.correction_bias"))
    if shared:
        rules.append(Rename(f"model.layers.{{i}}.mlp.{shared}.{{p}}_proj.weight", "layers.{i}.mlp.shared.{p}_proj.weight"))
    return rules


QWEN3_MOE = register_family(
    Family(
        model_types=("qwen3_moe",),
        config_from_hf=qwen3_moe_from_hf,
        weight_rules=lambda cfg: moe_rules() + llama_rules(cfg["tie_embeddings"], qk_norm=True),
    )
)
