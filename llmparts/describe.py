"""Human-readable summaries of a config: one line per run of identical layers."""

from __future__ import annotations

import dataclasses

from .config import ModelConfig
from .specs import Spec


def spec_summary(spec: Spec) -> str:
    """``type(field=value, ...)`` listing only the fields that differ from the type's defaults."""
    defaults = type(spec)()
    parts = []
    for f in dataclasses.fields(spec):
        if f.name == "type":
            continue
        v, d = getattr(spec, f.name), getattr(defaults, f.name)
        if v != d:
            parts.append(f"{f.name}={spec_summary(v) if isinstance(v, Spec) else _fmt(v)}")
    return f"{spec.type}({', '.join(parts)})" if parts else spec.type


def _fmt(v: object) -> str:
    if isinstance(v, float) and v >= 1e4 and v.is_integer():
        return f"{v:.0e}".replace("e+0", "e").replace("e+", "e")
    return str(v)


def _ranges(idx: list[int]) -> str:
    if len(idx) == 1:
        return f"layer {idx[0]}"
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"layers {idx[0]}-{idx[-1]}"
    return "layers " + ",".join(map(str, idx))


def describe(config: ModelConfig | str, params: bool = True) -> str:
    """Header line, then one line per run of consecutive layers with identical resolved specs.

    ``config``: a ModelConfig, or anything :func:`~llmparts.config.load_config` takes (a shipped name).
    """
    from .config import load_config

    if not isinstance(config, ModelConfig):
        config = load_config(config)
    head = (
        f"{config.name or 'model'}: {config.n_layers} layers, d_model {config.d_model}, "
        f"vocab {config.vocab_size}, max_seq_len {config.max_seq_len}, "
        f"{'tied' if config.tie_embeddings else 'untied'} head"
    )
    if params:
        from .model import build_model

        meta = build_model(config, device="meta")
        n, active = meta.num_parameters(), meta.num_active_parameters()
        head += f", {n:,} parameters" + (f" ({active:,} active per token)" if active != n else "")
    lines = [head, f"  embedding {spec_summary(config.embedding)}; final norm {spec_summary(config.final_norm)}"]
    runs: list[list[int]] = []
    for i, spec in enumerate(config.layers):
        if runs and config.layers[runs[-1][-1]] == spec:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        s = config.layers[run[0]]
        lines.append(
            f"  {_ranges(run)} (x{len(run)}): attention {spec_summary(s.attention)} | position "
            f"{spec_summary(s.position)} | mlp {spec_summary(s.mlp)} | norm {spec_summary(s.norm)} | "
            f"block {s.block.norm_placement}"  # type: ignore[attr-defined]
        )
    return "\n".join(lines)
