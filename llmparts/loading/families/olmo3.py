"""OLMo 3 (``model_type: olmo3``): OLMo 2 plus sliding-window attention on 3 of every 4 layers.

Differences from OLMo 2:
* ``layer_types`` (default: layer i is ``sliding_attention`` iff ``(i + 1) % 4 != 0``, so 3, 7, 11, ...
  are global); sliding layers attend to ``sliding_window`` keys (default 4096);
* RoPE parameters nested per layer type like Gemma 3, but both kinds default to the same base
  (500000); in 4.x config.json files ``rope_theta`` is both bases and ``rope_scaling`` (the released
  models' YaRN) applies to the global layers only.

transformers 5.23 reads 4.x-style OLMo 3 files differently in two corner cases that no release hits:
its ``convert_rope_params_to_dict`` gives the sliding layers 500000 whatever ``rope_theta`` says, and
drops a ``rope_scaling`` written with the legacy ``type`` key. Here both follow the 4.x reading (the
one the checkpoints were written for): ``rope_theta`` is every layer's base, ``type`` means ``rope_type``.
Likewise a YaRN ``truncate`` inside the per-layer-type dicts counts here; transformers looks for it at
the top level of ``rope_parameters`` only (as for Gemma 3).
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...errors import ConfigError, UnsupportedModelError
from . import Family, HFConfig, register_family
from .common import export_rope, get_present, layer_types_from_hf, sliding_overrides
from .olmo2 import olmo_core, olmo_core_to_hf, olmo_rope, olmo_rules

DEFAULT_THETA = 500_000.0
_KINDS = ("full_attention", "sliding_attention")


def nested_rope_params(hf: HFConfig, default_theta: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(full_attention, sliding_attention)`` HF rope dicts from either config layout."""
    src = hf.source
    params = hf.get("rope_parameters")
    if params is None:  # 4.x: one base for every layer, scaling on the global layers only
        theta = hf.get("rope_theta", default_theta)
        scaling = hf.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{src}: rope_scaling must be an object or null, got {scaling!r}")
        return {"rope_theta": theta, **scaling}, {"rope_type": "default", "rope_theta": theta}
    if not isinstance(params, dict) or not params or set(params) - set(_KINDS):
        raise ConfigError(
            f"{src}: rope_parameters must be nested by layer type, {{'full_attention': {{...}}, "
            f"'sliding_attention': {{...}}}}, got {params!r} (transformers ignores a flat dict for this family)"
        )
    for kind in _KINDS:
        if params.get(kind) is not None and not isinstance(params[kind], dict):
            raise ConfigError(f"{src}: rope_parameters.{kind} must be an object, got {params[kind]!r}")
    full = {"rope_theta": default_theta, **(params.get("full_attention") or {})}
    local = {"rope_theta": default_theta, **(params.get("sliding_attention") or {})}
    # a legacy key next to the nested dict is an echo at best, a contradiction at worst
    if hf.get("rope_scaling") is not None:
        raise ConfigError(
            f"{src}: both rope_parameters (nested) and rope_scaling are set; keep one (contradictory fields)"
        )
    theta = hf.get("rope_theta")
    if theta is not None and (theta != full["rope_theta"] or theta != local["rope_theta"]):
        raise ConfigError(
            f"{src}: rope_theta={theta} disagrees with rope_parameters (full_attention {full['rope_theta']}, "
            f"sliding_attention {local['rope_theta']}); keep one (contradictory fields)"
        )
    return full, local


def olmo3_from_hf(hf: HFConfig) -> dict[str, Any]:
    cfg = olmo_core(hf)
    n = cfg["n_layers"]
    full, local = nested_rope_params(hf, DEFAULT_THETA)
    cfg["position"] = olmo_rope(hf, DEFAULT_THETA, full, "rope_parameters.full_attention")
    local_rope = olmo_rope(hf, DEFAULT_THETA, local, "rope_parameters.sliding_attention")
    default = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]
    types = layer_types_from_hf(hf, n, default)
    window = get_present(hf, "sliding_window", 4096)
    extra = {} if local_rope == cfg["position"] else {"position": local_rope}
    cfg["overrides"] = sliding_overrides(hf, types, window, extra, no_window_reason="sliding_window is null")
    return cfg


def olmo3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    layers = cfg.layers
    full = [i for i, layer in enumerate(layers) if layer.attention.window is None]
    sliding = [i for i, layer in enumerate(layers) if layer.attention.window is not None]
    windows = sorted({layers[i].attention.window for i in sliding})
    if len(windows) > 1:
        raise UnsupportedModelError(
            f"olmo3 config.json has one sliding_window; this config uses {windows} on layers {sliding}"
        )
    i_full, i_local = (full or sliding)[0], (sliding or full)[0]
    out = {
        "model_type": "olmo3",
        "architectures": ["Olmo3ForCausalLM"],
        **olmo_core_to_hf(cfg),
        # unused without sliding layers, but transformers' Olmo3 builds a sliding mask regardless
        "sliding_window": windows[0] if windows else min(4096, cfg.max_seq_len),
        "layer_types": ["sliding_attention" if i in sliding else "full_attention" for i in range(len(layers))],
        "rope_parameters": {
            "full_attention": export_rope(cfg, i_full),
            "sliding_attention": export_rope(cfg, i_local),
        },
    }
    return out


OLMO3 = register_family(
    Family(model_types=("olmo3",), config_from_hf=olmo3_from_hf, weight_rules=olmo_rules, config_to_hf=olmo3_to_hf)
)
