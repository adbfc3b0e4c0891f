"""Qwen3 dense (``model_type: qwen3``): Llama plus per-head QK-norm before RoPE, explicit head_dim.

Differences from Llama: ``head_dim`` defaults to 128 whatever d_model / n_heads is; q/k are
RMS-normalised over head_dim (one weight shared by all heads) before RoPE; optional sliding window
on layers ``>= max_window_layers`` (``layer_types`` when present); never biased projections.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from . import Family, HFConfig, register_family
from .common import get_present, layer_types_from_hf, llama_rules, sliding_overrides
from .llama import llama_core, llama_to_hf


def qwen3_from_hf(hf: HFConfig) -> dict[str, Any]:
    hf.data.setdefault("head_dim", 128)  # Qwen3Config's default, not hidden / heads
    cfg = llama_core(hf)
    cfg["attention"]["qk_norm"] = "per_head"
    hf.expect("mlp_bias", (False,), "Qwen3 MLPs have no bias")
    n = cfg["n_layers"]
    # transformers: sliding_window is forced to None unless use_sliding_window is true
    sliding_window = get_present(hf, "sliding_window", 4096)  # (null: no window)
    window = sliding_window if hf.flag("use_sliding_window", False) else None
    max_window_layers = hf.get("max_window_layers", 28)
    default = ["sliding_attention" if window and i >= max_window_layers else "full_attention" for i in range(n)]
    types = layer_types_from_hf(hf, n, default)
    cfg["overrides"] = sliding_overrides(hf, types, window, no_window_reason="use_sliding_window is false")
    return cfg


def qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = llama_to_hf(cfg)
    out.pop("mlp_bias")
    windows = [layer.attention.window for layer in cfg.layers]
    sliding = next((w for w in windows if w is not None), None)
    out.update(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        use_sliding_window=sliding is not None,
        sliding_window=sliding,
        layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
    )
    return out


QWEN3 = register_family(
    Family(
        model_types=("qwen3",),
        config_from_hf=qwen3_from_hf,
        weight_rules=lambda cfg: llama_rules(cfg["tie_embeddings"], qk_norm=True),
        config_to_hf=qwen3_to_hf,
    )
)
