"""Mistral (``model_type: mistral``): Llama with an optional sliding window on every layer.

Differences from Llama:
* ``sliding_window`` (default 4096 when the key is absent; ``null`` = full attention): when set,
  **every** layer attends to that many keys (Mistral-7B-v0.1: 4096; v0.2/v0.3: null). There is no
  per-layer pattern: transformers' Mistral ignores ``layer_types`` (that is Ministral), so a
  ``layer_types`` list that disagrees with the window is rejected;
* ``head_dim`` field (null -> d_model / n_heads); q/k/v/o and the MLP never have biases.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...errors import ConfigError, UnsupportedModelError
from . import Family, HFConfig, register_family
from .common import dense_to_hf, check_window, export_rope, get_present, llama_rules
from .llama import llama_core


def mistral_from_hf(hf: HFConfig) -> dict[str, Any]:
    hf.expect("attention_bias", (False,), "Mistral's attention projections never have biases")
    hf.expect("mlp_bias", (False,), "Mistral's MLP never has biases")
    cfg = llama_core(hf, default_eps=1e-6, default_theta=10000.0)
    window = get_present(hf, "sliding_window", 4096)
    if window is not None:
        window = check_window(hf, window)
    types = hf.get("layer_types")
    if types is not None:
        want = "full_attention" if window is None else "sliding_attention"
        if not isinstance(types, list) or len(types) != cfg["n_layers"] or any(t != want for t in types):
            raise ConfigError(
                f"{hf.source}: layer_types {types!r} contradicts sliding_window={window!r}: Mistral applies "
                f"the window to every layer (all {want!r}); per-layer patterns are model_type 'ministral'"
            )
    cfg["attention"]["window"] = window
    return cfg


def mistral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    windows = {layer.attention.window for layer in cfg.layers}
    if len(windows) > 1:
        raise UnsupportedModelError(
            "mistral config.json applies one sliding_window to every layer; this config mixes "
            f"{sorted(windows, key=str)}"
        )
    a = cfg.attention
    out = {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        **dense_to_hf(cfg),
        "head_dim": a.head_dim,
        "sliding_window": windows.pop(),
        "rope_parameters": export_rope(cfg, 0),
    }
    return out


MISTRAL = register_family(
    Family(
        model_types=("mistral",),
        config_from_hf=mistral_from_hf,
        weight_rules=lambda cfg: llama_rules(cfg["tie_embeddings"]),
        config_to_hf=mistral_to_hf,
    )
)
