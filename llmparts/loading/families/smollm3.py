"""SmolLM3 (``model_type: smollm3``): Llama with NoPE on every 4th layer, tied embeddings.

Differences from Llama:
* ``no_rope_layers``: one flag per layer, **1 = the layer uses RoPE**, 0 = NoPE (q and k not rotated);
  default from ``no_rope_layer_interval`` (4): layer i is NoPE iff ``(i + 1) % 4 == 0``. NoPE layers
  become the per-layer override ``{position: {type: none}}``;
* optional sliding window of ``sliding_window`` on the layers ``layer_types`` marks
  ``sliding_attention``; without ``layer_types``, the NoPE layers when ``use_sliding_window`` is true
  (off in the release). An explicit ``layer_types`` decides alone, as in transformers, whose masks
  window those layers whatever ``use_sliding_window`` says (only its flash-attention path reads it);
* no ``head_dim`` field (d_model / n_heads), RoPE base default 2e6, ``tie_word_embeddings`` default true.
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from ...errors import ConfigError, UnsupportedModelError
from . import Family, HFConfig, register_family
from .common import dense_to_hf, export_rope, layer_types_from_hf, llama_rules, sliding_overrides
from .llama import llama_core


def no_rope_flags(hf: HFConfig, n: int) -> list[int]:
    """The validated ``no_rope_layers`` list (1 = RoPE, 0 = NoPE), explicit or from the interval."""
    interval = hf.get("no_rope_layer_interval", 4)
    flags = hf.get("no_rope_layers")
    if flags is None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"{hf.source}: no_rope_layer_interval must be an integer >= 1, got {interval!r}")
        return [int((i + 1) % interval != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) != n:
        raise ConfigError(
            f"{hf.source}: no_rope_layers must list one flag per layer (num_hidden_layers={n}), got "
            f"{len(flags) if isinstance(flags, list) else flags!r}"
        )
    for i, f in enumerate(flags):
        if isinstance(f, bool) or f not in (0, 1):
            raise ConfigError(
                f"{hf.source}: no_rope_layers[{i}] = {f!r}; each flag must be 1 (the layer uses RoPE) or 0 (NoPE)"
            )
    return list(flags)


def smollm3_from_hf(hf: HFConfig) -> dict[str, Any]:
    cfg = llama_core(hf, default_eps=1e-6, default_theta=2_000_000.0, pad_default=128004)
    cfg["tie_embeddings"] = hf.flag("tie_word_embeddings", True)  # SmolLM3Config ties by default
    n = cfg["n_layers"]
    flags = no_rope_flags(hf, n)
    use_window = hf.flag("use_sliding_window", False)
    window = hf.get("sliding_window")
    default = [
        "sliding_attention" if use_window and window is not None and not flags[i] else "full_attention"
        for i in range(n)
    ]
    types = layer_types_from_hf(hf, n, default)
    cfg["overrides"] = sliding_overrides(hf, types, window, no_window_reason="sliding_window is null")
    nope = [i for i, f in enumerate(flags) if not f]
    if nope:
        cfg["overrides"].append({"layers": nope, "position": {"type": "none"}})
    return cfg


def smollm3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    layers = cfg.layers
    roped = [i for i, layer in enumerate(layers) if layer.position.type != "none"]
    windows = sorted({layer.attention.window for layer in layers if layer.attention.window is not None})
    if len(windows) > 1:
        raise UnsupportedModelError(f"smollm3 config.json has one sliding_window; this config uses {windows}")
    a, m = cfg.attention, cfg.mlp
    out: dict[str, Any] = {
        "model_type": "smollm3",
        "architectures": ["SmolLM3ForCausalLM"],
        **dense_to_hf(cfg),
        "attention_bias": a.qkv_bias,
        "mlp_bias": m.bias,
        "rope_parameters": export_rope(cfg, roped[0]) if roped
        else {"rope_type": "default", "rope_theta": 2_000_000.0},
    }
    if a.head_dim is not None:  # honoured by transformers' SmolLM3 although not a declared field
        out["head_dim"] = a.head_dim
    out.update(
        no_rope_layers=[int(layer.position.type != "none") for layer in layers],
        no_rope_layer_interval=4,
        use_sliding_window=bool(windows),
        sliding_window=windows[0] if windows else None,
        layer_types=["full_attention" if layer.attention.window is None else "sliding_attention" for layer in layers],
    )
    # SmolLM3Config's default bos / eos ids (128000, 128001) do not fit a smaller vocabulary: say there
    # are none (pad_token_id, the embedding's padding row, is always written)
    for key, default in (("bos_token_id", 128000), ("eos_token_id", 128001)):
        if default >= cfg.vocab_size:
            out.setdefault(key, None)
    return out


SMOLLM3 = register_family(
    Family(
        model_types=("smollm3",),
        config_from_hf=smollm3_from_hf,
        weight_rules=lambda cfg: llama_rules(cfg["tie_embeddings"]),
        config_to_hf=smollm3_to_hf,
    )
)
