"""Pieces shared by family adapters: RoPE parameters, layer types, the Llama-style tensor names."""

from __future__ import annotations

import math

from typing import Any

from ...errors import ConfigError, UnsupportedModelError
from ..weight_map import Ignore, Rename, Rule
from . import HFConfig

# HF rope_type -> {HF key: llmparts key} for the scaling fields each type accepts.
_ROPE_KEYS: dict[str, dict[str, str]] = {
    "default": {},
    "linear": {"factor": "factor"},
    "llama3": {
        "factor": "factor",
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
        "original_max_position_embeddings": "original_max_seq_len",
    },
    "yarn": {
        "factor": "factor",
        "original_max_position_embeddings": "original_max_seq_len",
        "beta_fast": "beta_fast",
        "beta_slow": "beta_slow",
        "mscale": "mscale",
        "mscale_all_dim": "mscale_all_dim",
        "attention_factor": "attention_factor",
        "truncate": "truncate",
    },
}
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}


def rope_from_hf(hf: HFConfig, default_theta: float, params: dict[str, Any] | None = None,
                 where: str | None = None, default_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The llmparts ``position`` dict from either config layout.

    transformers 5.x writes ``rope_parameters: {rope_type, rope_theta, ...}``; 4.x checkpoints carry
    ``rope_theta`` plus ``rope_scaling: {type | rope_type, ...}`` (or null). Unknown rope types and
    unknown keys fail; nothing falls back to default RoPE silently. ``default_params``: the family's
    ``rope_parameters`` when config.json has neither key (transformers' config class default).
    """
    src = hf.source
    if params is None:
        # As transformers 5's convert_rope_params_to_dict: a non-empty legacy rope_scaling replaces
        # rope_parameters; a rope_theta missing from the chosen dict comes from the top-level
        # rope_theta, then the family's default.
        rp, rs = hf.get("rope_parameters"), hf.get("rope_scaling")
        for name, value in (("rope_parameters", rp), ("rope_scaling", rs)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{src}: {name} must be an object or null, got {value!r}")
        if rs:
            params, where = dict(rs), where or "rope_scaling"
        elif not rp and default_params is not None:
            params, where = dict(default_params), where or "rope_parameters (the family default)"
        else:
            params, where = dict(rp or {}), where or ("rope_parameters" if rp is not None else "rope_scaling")
        top_theta = hf.get("rope_theta")
        params.setdefault("rope_theta", top_theta if top_theta is not None else default_theta)
    if not isinstance(params, dict):
        raise ConfigError(f"{src}: {where} must be an object, got {params!r}")
    params = dict(params)
    rope_type = params.pop("rope_type", None)
    legacy_type = params.pop("type", None)
    rope_type = rope_type or legacy_type or "default"
    if rope_type not in _ROPE_KEYS:
        raise UnsupportedModelError(
            f"{src}: {where}.rope_type {rope_type!r} is not supported; supported: {', '.join(_ROPE_KEYS)}"
        )
    theta = params.pop("rope_theta", default_theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"{src}: {where}.rope_theta must be a finite number > 0, got {theta!r}")
    prf = params.pop("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise UnsupportedModelError(
            f"{src}: {where}.partial_rotary_factor={prf} is not supported for this family "
            "(transformers ignores it for these models, so the intended rotation is ambiguous)"
        )
    allowed = _ROPE_KEYS[rope_type]
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if key not in params:
            raise ConfigError(f"{src}: {where} of rope_type {rope_type!r} requires {key!r}")
    scaling: dict[str, Any] = {"type": rope_type}
    for key, value in params.items():
        if key not in allowed:
            raise UnsupportedModelError(
                f"{src}: {where}: key {key!r} is not valid for rope_type {rope_type!r}; "
                f"valid keys: {', '.join(['rope_type', 'rope_theta', *allowed]) }"
            )
        if value is not None:
            scaling[allowed[key]] = value
    if rope_type in ("llama3", "yarn") and "original_max_seq_len" not in scaling:
        # transformers fills it from the top-level field, else from max_position_embeddings
        scaling["original_max_seq_len"] = hf.get("original_max_position_embeddings") or hf.require(
            "max_position_embeddings"
        )
    return {"type": "rope", "theta": float(theta), "scaling": scaling}


def sizes_from_hf(hf: HFConfig, pad_default: int | None = None) -> dict[str, Any]:
    """The top-level sizes every family reads alike: vocabulary, width, depth, context, tying; and the
    embedding (:func:`embedding_from_hf`, ``pad_default`` the family's default ``pad_token_id``)."""
    return {
        "vocab_size": hf.require("vocab_size"),
        "d_model": hf.require("hidden_size"),
        "n_layers": hf.require("num_hidden_layers"),
        "max_seq_len": hf.require("max_position_embeddings"),
        "tie_embeddings": hf.flag("tie_word_embeddings", False),
        "embedding": embedding_from_hf(hf, pad_default),
    }


def embedding_from_hf(hf: HFConfig, pad_default: int | None, **spec: Any) -> dict[str, Any]:
    """The embedding spec (``spec`` plus its padding row). transformers builds every family's embedding
    as ``nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)``: that row is zero at random
    init and gets no gradient from the lookup. An absent ``pad_token_id`` is the config class default
    ``pad_default`` (Gemma 3: 0, OLMo 2/3: 1, SmolLM3: 128004), dropped when it does not fit the
    vocabulary (transformers could not build that model); ``null`` is none; a negative id counts from
    the end of the vocabulary, as ``nn.Embedding`` does."""
    vocab = hf.data.get("vocab_size")  # a peek: sizes_from_hf consumes (and checks) it
    if isinstance(vocab, float) and vocab.is_integer():
        vocab = int(vocab)
    explicit = "pad_token_id" in hf.data and hf.data["pad_token_id"] is not None
    pad = get_present(hf, "pad_token_id", pad_default)
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, int):
            raise ConfigError(f"{hf.source}: pad_token_id must be a token id (an integer) or null, got {pad!r}")
        if isinstance(vocab, int) and not isinstance(vocab, bool):
            if -vocab <= pad < 0:
                pad += vocab
            if not 0 <= pad < vocab:
                if explicit:
                    raise ConfigError(
                        f"{hf.source}: pad_token_id {pad} is outside the vocabulary (vocab_size {vocab}); "
                        f"transformers cannot build this embedding either: set it below {vocab}, or null"
                    )
                pad = None
    return {"type": "standard", **spec, "padding_idx": pad}


def layer_types_from_hf(hf: HFConfig, n_layers: int, default_types: list[str]) -> list[str]:
    """The validated ``layer_types`` list (one of full_attention / sliding_attention per layer)."""
    types = hf.get("layer_types", default_types)
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(
            f"{hf.source}: layer_types must list one entry per layer ({n_layers}), got "
            f"{len(types) if isinstance(types, list) else types!r}"
        )
    allowed = ("full_attention", "sliding_attention")
    for i, t in enumerate(types):
        if t not in allowed:
            raise UnsupportedModelError(f"{hf.source}: layer_types[{i}] = {t!r} is not one of {allowed}")
    return types


def sliding_overrides(hf: HFConfig, types: list[str], window: int | None, extra: dict[str, Any] | None = None,
                      no_window_reason: str = "sliding_window is not set") -> list[dict[str, Any]]:
    """One per-layer override giving ``sliding_attention`` layers their window (and ``extra`` specs)."""
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return []
    if not window:
        raise ConfigError(
            f"{hf.source}: layer_types marks layers {sliding} as sliding_attention but {no_window_reason} "
            "(contradictory fields)"
        )
    return [{"layers": sliding, "attention": {"window": check_window(hf, window)}, **(extra or {})}]


def check_window(hf: HFConfig, window: Any, key: str = "sliding_window") -> int:
    """A validated sliding window: an integer >= 1, at most ``max_position_embeddings``.

    A wider window (transformers' config classes default to 4096 or more whatever the context, so
    small checkpoints carry one) sees every earlier key of any sequence the model accepts, exactly as
    a window as wide as the context does: it is read as that width, and the layer keeps its window
    (its cache a ring of that many slots; Gemma 3's sliding layers their local RoPE base).
    """
    if isinstance(window, float) and window.is_integer():
        window = int(window)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"{hf.source}: {key} must be an integer >= 1 (or null for full attention), got {window!r}")
    context = hf.data.get("max_position_embeddings")  # a peek: the adapter consumes it itself
    if isinstance(context, int) and not isinstance(context, bool) and 1 <= context < window:
        return context
    return window


def llama_rules(tied: bool, qk_norm: bool = False) -> list[Rule]:
    """Tensor names of the Llama layout (also Qwen3, Mistral, SmolLM3): pre-norm blocks."""
    rules: list[Rule] = [
        Rename("model.embed_tokens.weight", "embed.weight"),
        Rename("model.norm.weight", "final_norm.weight"),
        Rename("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
        Rename("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        Rename("model.layers.{i}.self_attn.{p}_proj.{w}", "layers.{i}.attn.{p}_proj.{w}"),
        Rename("model.layers.{i}.mlp.{p}_proj.{w}", "layers.{i}.mlp.{p}_proj.{w}"),
        Ignore("model.layers.{i}.self_attn.rotary_emb.inv_freq", "RoPE tables are recomputed, never loaded"),
    ]
    if qk_norm:
        rules.append(Rename("model.layers.{i}.self_attn.{p}_norm.weight", "layers.{i}.attn.{p}_norm.weight"))
    rules.append(Rename("lm_head.weight", "head.weight"))
    return rules


def get_present(hf: HFConfig, key: str, default: Any) -> Any:
    """``hf[key]`` where a written ``null`` stays ``None``; ``default`` only when the key is absent.

    (``HFConfig.get`` maps null to the default, which is wrong for fields whose default is a value
    but whose null means "off", such as Mistral's ``sliding_window``.)
    """
    if key in hf.data:
        return hf.get(key)
    hf.used.add(key)
    return default


def written_spec(cfg: Any, i: int, kind: str) -> Any:
    """Layer ``i``'s ``kind`` spec as written (defaults plus its overrides), before derived fields are filled.

    Exporting these rather than the resolved specs keeps ``config_from_hf(config_to_hf(cfg)) == cfg``
    exact: a YaRN attention factor left to be derived stays unwritten instead of becoming a number.
    """
    from ...config import deep_merge, parse_spec, spec_to_dict

    raw = spec_to_dict(getattr(cfg, kind))
    for ov in cfg.overrides:
        if i in ov.layers and kind in ov.parts:
            raw = deep_merge(raw, ov.parts[kind])
    return parse_spec(kind, raw, f"layer {i}.{kind}")


def export_rope(cfg: Any, i: int) -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` for layer ``i`` of ``cfg``; a non-RoPE layer fails."""
    from .llama import rope_to_hf

    resolved = cfg.layers[i].position
    if getattr(resolved, "type", None) != "rope":
        raise UnsupportedModelError(
            f"layer {i} uses position type {getattr(resolved, 'type', resolved)!r}; this family's config.json "
            "can only describe RoPE there"
        )
    out = rope_to_hf(written_spec(cfg, i, "position"))
    if out.get("factor") is None and getattr(resolved.scaling, "factor", None) is not None:
        out["factor"] = resolved.scaling.factor  # YaRN's factor derived from max_seq_len: HF needs the number
    return out


def dense_to_hf(cfg: Any) -> dict[str, Any]:
    """The config.json fields every Llama-like family writes the same way (sizes, eps, tying)."""
    a, m = cfg.attention, cfg.mlp
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": m.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "hidden_act": m.activation,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.embedding.padding_idx,
    }


def one_of(hf: HFConfig, keys: tuple[str, ...], default: Any) -> Any:
    """The value of the first of several alias keys present (``num_experts`` / ``num_local_experts``);
    all aliases are consumed, and two present with different values is an error."""
    present = [(k, hf.get(k)) for k in keys if k in hf]
    for k in keys:
        hf.get(k)
    if len({repr(v) for _, v in present}) > 1:
        raise ConfigError(
            f"{hf.source}: {' and '.join(f'{k}={v!r}' for k, v in present)} are aliases of one field but disagree"
        )
    return present[0][1] if present else default


def moe_dense_overrides(layers: list[int], dense_mlp: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-layer override that gives the dense layers of a mixture-of-experts model their MLP."""
    return [{"layers": layers, "mlp": dense_mlp}] if layers else []


def router_aux_loss_coef(hf: HFConfig) -> float:
    """The load-balancing loss coefficient training adds: ``router_aux_loss_coef`` when
    ``output_router_logits`` is true, else 0 -- transformers adds the loss only with router logits
    on, and released configs leave them off (``mlp.aux_loss_coef`` overrides it)."""
    coef = hf.number("router_aux_loss_coef", 0.001)
    return coef if hf.flag("output_router_logits", False) else 0.0

