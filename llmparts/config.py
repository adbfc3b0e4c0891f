"""Model configs: strict YAML/dict parsing, CLI-style overrides, per-layer override resolution.

Data flows one way: YAML (or an HF config.json through a family adapter) -> raw dict ->
:class:`ModelConfig` with typed specs -> one resolved :class:`LayerSpec` per layer -> modules.

A config file looks like::

    vocab_size: 151936
    d_model: 1024
    n_layers: 28
    max_seq_len: 40960
    tie_embeddings: true
    attention: {type: gqa, n_heads: 16, n_kv_heads: 8, head_dim: 128, qk_norm: per_head}
    position:  {type: rope, theta: 1000000.0}
    norm:      {type: rmsnorm, eps: 1.0e-6}
    mlp:       {type: gated, hidden_dim: 3072, activation: silu}
    overrides:                       # optional, applied in order, deep-merged onto the defaults
      - {layers: "3::4", position: {type: none}}
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, ModelNotFoundError, closest
from .registry import spec_class, types_of
from .specs import DEFAULT_TYPES, Spec

LAYER_KINDS = ("attention", "position", "norm", "mlp", "block")


# ------------------------------------------------------------------------------ typed parsing
class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key repeated in one mapping is an error (PyYAML keeps the last)."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def yaml_load(text: str) -> Any:
    """Parse YAML safely, rejecting duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _check_value(value: Any, annotation: Any, path: str, hints_kind: str | None = None) -> Any:
    """Check ``value`` against a type annotation; return it (ints widened to float where declared)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_value(value, opt, path, hints_kind)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} is not a valid {_type_name(annotation)}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or isinstance(value, bool):
            hint = closest(value, [str(a) for a in allowed]) if isinstance(value, str) else ""
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(f"{path}: expected an integer, got {value!r}")
            value = int(value)
        if not -(2**63) <= value < 2**63:  # (torch sizes and indices are 64-bit)
            raise ConfigError(f"{path}: {value} does not fit a 64-bit integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, int) and not -(2**1023) < value < 2**1023:
            raise ConfigError(f"{path}: {value} is beyond a float's range")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        if hints_kind is None:
            raise TypeError(f"spec field at {path} needs metadata kind")
        if isinstance(value, Spec):
            return value
        return parse_spec(hints_kind, value, path)
    raise TypeError(f"unsupported annotation {annotation!r} at {path}")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def parse_spec(kind: str, data: Any, path: str) -> Spec:
    """Build a typed spec of ``kind`` from a dict, strictly: unknown keys and bad types raise."""
    if isinstance(data, Spec):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping for {kind}, got {data!r}")
    cls = spec_class(kind, data.get("type", DEFAULT_TYPES[kind]), path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{path}: unknown key {key!r} for {kind} type {cls.type if hasattr(cls, 'type') else ''!r}"
                f"{closest(str(key), fields)}; allowed keys: {', '.join(fields)}"
            )
        f = fields[key]
        kwargs[key] = _check_value(value, hints[key], f"{path}.{key}", f.metadata.get("kind"))
    return cls(**kwargs)


def _fields_of(kind: str, data: dict[str, Any], path: str) -> dict[str, Any]:
    """``data`` without the keys its ``type`` does not have."""
    fields = {f.name for f in dataclasses.fields(spec_class(kind, data.get("type", DEFAULT_TYPES[kind]), path))}
    return {k: v for k, v in data.items() if k in fields}


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The spec as a plain dict (nested specs included), suitable for YAML."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        out[f.name] = spec_to_dict(v) if isinstance(v, Spec) else v
    return out


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Merge ``patch`` onto ``base``; a patch that changes ``type`` replaces the sub-spec entirely."""
    if "type" in patch and patch["type"] != base.get("type"):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------- layer selection
def select_layers(selector: Any, n_layers: int, path: str) -> tuple[int, ...]:
    """Resolve ``"5::6"``, ``"0:3"``, ``"all"``, an int or a list of ints to sorted layer indices."""
    if isinstance(selector, bool):
        raise ConfigError(f"{path}: invalid layer selector {selector!r}")
    if isinstance(selector, int):
        selector = [selector]
    if isinstance(selector, str):
        s = selector.strip()
        if s == "all":
            return tuple(range(n_layers))
        if ":" not in s:
            try:
                selector = [int(s)]
            except ValueError:
                raise ConfigError(
                    f"{path}: invalid layer selector {selector!r}; use a slice like '5::6' or '0:3', "
                    "an index, a list of indices or 'all'"
                ) from None
        else:
            parts = s.split(":")
            if len(parts) > 3:
                raise ConfigError(f"{path}: invalid slice {selector!r}")
            try:
                nums = [int(p) if p.strip() else None for p in parts]
            except ValueError:
                raise ConfigError(f"{path}: invalid slice {selector!r}: parts must be integers") from None
            if len(nums) == 3 and nums[2] is not None and nums[2] <= 0:
                raise ConfigError(f"{path}: slice step must be > 0 in {selector!r}")
            idx = tuple(range(n_layers)[slice(*nums)])
            # A stepped slice is a pattern ("every 6th layer from 5"): a model shorter than its first
            # layer has none of them (a 4-layer Gemma 3 is all local). A range that selects nothing
            # names layers the model does not have.
            if not idx and not (len(nums) == 3 and nums[2] is not None and nums[2] > 1):
                raise ConfigError(
                    f"{path}: slice {selector!r} selects no layer of {n_layers}; give a range within "
                    f"0:{n_layers} (a stepped pattern such as '5::6' may select none)"
                )
            return idx
    if not isinstance(selector, (list, tuple)) or not selector:
        raise ConfigError(f"{path}: invalid layer selector {selector!r}")
    out = set()
    for i in selector:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigError(f"{path}: layer index {i!r} is not an integer")
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"{path}: layer index {i} out of range for n_layers={n_layers}")
        out.add(j)
    return tuple(sorted(out))


# --------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class LayerSpec:
    """The fully resolved specs of one block: what is built for layer ``index``."""

    attention: Spec
    position: Spec
    norm: Spec
    mlp: Spec
    block: Spec


@dataclass(frozen=True)
class LayerOverride:
    layers: tuple[int, ...]
    selector: Any
    parts: dict[str, dict[str, Any]]


_TOP_FIELDS = {
    "name": (str, None),
    "vocab_size": (int, None),
    "d_model": (int, None),
    "n_layers": (int, None),
    "max_seq_len": (int, None),
    "tie_embeddings": (bool, False),
    "logit_softcap": (float, None),
    "init_std": (float, 0.02),
}
_TOP_SPECS = ("embedding", "attention", "position", "norm", "mlp", "block")
TOP_KEYS = (*_TOP_FIELDS, *_TOP_SPECS, "overrides")


@dataclass(frozen=True)
class ModelConfig:
    """A complete, validated model description. Build it with :meth:`from_dict` or :func:`load_config`.

    ``attention``, ``position``, ``norm``, ``mlp``, ``block`` are the defaults for every layer as
    written; ``layers`` holds one resolved :class:`LayerSpec` per layer after ``overrides``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    max_seq_len: int
    attention: Spec
    position: Spec
    norm: Spec
    mlp: Spec
    block: Spec
    embedding: Spec
    tie_embeddings: bool = False
    logit_softcap: float | None = None
    init_std: float = 0.02
    name: str | None = None
    overrides: tuple[LayerOverride, ...] = ()
    layers: tuple[LayerSpec, ...] = field(default=(), compare=False, repr=False)
    final_norm: Spec | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        for key in data:
            if key not in TOP_KEYS:
                raise ConfigError(
                    f"{path}: unknown key {key!r}{closest(str(key), TOP_KEYS)}; allowed keys: {', '.join(TOP_KEYS)}"
                )
        kwargs: dict[str, Any] = {}
        for key, (typ, default) in _TOP_FIELDS.items():
            if key not in data or data[key] is None:
                if default is None and key not in ("name", "logit_softcap"):
                    raise ConfigError(f"{path}.{key} is required")
                kwargs[key] = default
                continue
            kwargs[key] = _check_value(data[key], typ, f"{path}.{key}")
        for key in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            if kwargs[key] <= 0:
                raise ConfigError(f"{path}.{key} must be > 0, got {kwargs[key]}")
        if kwargs["logit_softcap"] is not None and kwargs["logit_softcap"] <= 0:
            raise ConfigError(f"{path}.logit_softcap must be > 0, got {kwargs['logit_softcap']}")
        if kwargs["init_std"] < 0:
            raise ConfigError(f"{path}.init_std must be >= 0, got {kwargs['init_std']}")
        for key in _TOP_SPECS:
            if key in ("attention", "mlp") and key not in data:
                raise ConfigError(f"{path}.{key} is required")
            kwargs[key] = parse_spec(key, data.get(key, {}), f"{path}.{key}")

        n_layers = kwargs["n_layers"]
        raw_overrides = data.get("overrides") or []
        if not isinstance(raw_overrides, list):
            raise ConfigError(f"{path}.overrides: expected a list of {{layers: ..., <kind>: {{...}}}}")
        overrides = []
        for k, ov in enumerate(raw_overrides):
            opath = f"{path}.overrides[{k}]"
            if not isinstance(ov, dict) or "layers" not in ov:
                raise ConfigError(f"{opath}: expected a mapping with 'layers' and component specs, got {ov!r}")
            parts = {}
            for key, value in ov.items():
                if key == "layers":
                    continue
                if key not in LAYER_KINDS:
                    raise ConfigError(
                        f"{opath}: unknown key {key!r}{closest(str(key), LAYER_KINDS)}; "
                        f"per-layer overrides may set: layers, {', '.join(LAYER_KINDS)}"
                    )
                if not isinstance(value, dict):
                    raise ConfigError(f"{opath}.{key}: expected a mapping, got {value!r}")
                parts[key] = copy.deepcopy(value)
            if not parts:
                raise ConfigError(f"{opath}: overrides nothing; add one of {', '.join(LAYER_KINDS)}")
            layers = select_layers(ov["layers"], n_layers, f"{opath}.layers")
            overrides.append(LayerOverride(layers, ov["layers"], parts))
        cfg = cls(**kwargs, overrides=tuple(overrides))
        object.__setattr__(cfg, "layers", cfg._resolve_layers(path))
        ctx = {"d_model": cfg.d_model, "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size}
        object.__setattr__(cfg, "final_norm", cfg.norm.resolve(ctx, f"{path}.norm"))
        cfg.embedding.resolve(ctx, f"{path}.embedding")  # (checks only)
        return cfg

    def _resolve_layers(self, path: str) -> tuple[LayerSpec, ...]:
        base = {k: spec_to_dict(getattr(self, k)) for k in LAYER_KINDS}
        touched: dict[int, dict[str, str]] = {i: {} for i in range(self.n_layers)}
        untyped: dict[int, dict[str, set[str]]] = {i: {} for i in range(self.n_layers)}  # keys set without a type
        per_layer = [copy.deepcopy(base) for _ in range(self.n_layers)]
        for k, ov in enumerate(self.overrides):
            for i in ov.layers:
                for kind, patch in ov.parts.items():
                    start = per_layer[i][kind]
                    if "type" in patch and patch["type"] != start.get("type") and patch["type"] == base[kind].get("type"):
                        start = base[kind]  # back to the model's own type: its settings, not the type's defaults
                    elif "type" in patch and patch["type"] == start.get("type", DEFAULT_TYPES[kind]):
                        # Naming the type the layer has keeps its settings of that type, but not those an
                        # earlier override wrote for another type (`position.type=none` on Gemma 3, whose
                        # own override sets the global layers' RoPE theta, then `layers[5::6].position.type=none`).
                        start = _fields_of(kind, start, f"{path}.overrides[{k}].{kind}")
                    per_layer[i][kind] = deep_merge(start, patch)
                    touched[i][kind] = f"{path}.overrides[{k}].{kind}"
                    untyped[i][kind] = set() if "type" in patch else untyped[i].get(kind, set()) | set(patch)
        cache: dict[str, LayerSpec] = {}
        out = []
        for i, raw in enumerate(per_layer):
            key = repr(raw)
            if key not in cache:  # most layers share their specs: resolve each distinct one once
                cache[key] = self._resolve_one(raw, touched[i], untyped[i], path, i)
            out.append(cache[key])
        if any(all(raw[kind] != base[kind] for raw in per_layer) for kind in LAYER_KINDS):
            # A default that every layer overrides is checked too: a bad value there is not ignored
            # (deepseek-v3 with n_layers=3 has only dense layers; its MoE settings must still be valid).
            self._resolve_one(base, {}, {}, path, None)
        return tuple(out)

    def _resolve_one(self, raw: dict[str, Any], touched: dict[str, str], untyped: dict[str, set[str]], path: str,
                     i: int | None) -> LayerSpec:
        """Layer ``i``'s specs; ``i=None`` checks the defaults (``raw`` is then the top-level specs)."""
        where = f" (layer {i})" if i is not None else " (the default, though every layer overrides it in part)"

        def p(kind: str) -> str:
            return touched.get(kind, f"{path}.{kind}") + where

        ctx: dict[str, Any] = {"d_model": self.d_model, "max_seq_len": self.max_seq_len}
        specs = {}
        for kind in LAYER_KINDS:
            try:
                specs[kind] = parse_spec(kind, raw[kind], p(kind))
            except ConfigError as e:
                kind_type = raw[kind].get("type", DEFAULT_TYPES[kind]) if isinstance(raw[kind], dict) else None
                if kind not in touched or not isinstance(kind_type, str) or "unknown key" not in str(e):
                    raise
                # the keys were set by overrides that did not name a type, and another type has them
                foreign = set(raw[kind]) - set(_fields_of(kind, raw[kind], p(kind)))
                other_types = [spec_class(kind, t, p(kind)) for t in types_of(kind) if t != kind_type]
                if not foreign <= untyped.get(kind, set()) or not any(
                        foreign <= {f.name for f in dataclasses.fields(c)} for c in other_types):
                    raise
                raise ConfigError(
                    f"{e}; an override wrote it for another {kind} type. To keep type {kind_type!r} on this "
                    f"layer, add the override 'layers[{i}].{kind}.type={kind_type}': naming the type drops "
                    "the settings it does not have"
                ) from None
        ctx["position"] = specs["position"]  # as written: MLA's softmax scale depends on YaRN's mscale
        attn = specs["attention"].resolve(ctx, p("attention"))
        ctx["attention"] = attn
        ctx["rope_head_dim"] = getattr(attn, "rope_head_dim", None) or attn.head_dim
        return LayerSpec(
            attention=attn,
            position=specs["position"].resolve(ctx, p("position")),
            norm=specs["norm"].resolve(ctx, p("norm")),
            mlp=specs["mlp"].resolve(ctx, p("mlp")),
            block=specs["block"].resolve(ctx, p("block")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict that :meth:`from_dict` reads back to an equal config."""
        out: dict[str, Any] = {}
        for key in _TOP_FIELDS:
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        for key in _TOP_SPECS:
            out[key] = spec_to_dict(getattr(self, key))
        if self.overrides:
            out["overrides"] = [{"layers": ov.selector, **copy.deepcopy(ov.parts)} for ov in self.overrides]
        return out

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "ModelConfig":
        """A new config with CLI-style overrides applied (see :func:`apply_cli_overrides`)."""
        return ModelConfig.from_dict(apply_cli_overrides(self.to_dict(), overrides))


# ------------------------------------------------------------------------- CLI-style overrides
def _parse_override(text: str) -> tuple[str, Any]:
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(
            f"override {text!r}: expected 'path.to.field=value', e.g. 'attention.window=512' or "
            "'layers[3::4].position.type=none'"
        )
    key, _, value = text.partition("=")
    key = key.strip()
    try:
        parsed = yaml_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key, parsed


def apply_cli_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` strings to a raw config dict (values parsed as YAML).

    ``"layers[SEL].kind.field=value"`` appends a per-layer override for the layers ``SEL`` selects
    (``"layers[3::4].position.type=none"`` makes every 4th layer NoPE). Setting ``X.type`` to a new
    type replaces the sub-spec ``X`` (in a per-layer override, by the model's own ``X`` when that has
    the new type: :meth:`ModelConfig._resolve_layers`). Unknown fields are reported when the result
    is validated.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    data = copy.deepcopy(data)
    for text in overrides or ():
        key, value = _parse_override(text)
        if key.startswith("layers["):
            sel, _, rest = key[len("layers[") :].partition("]")
            rest = rest.lstrip(".")
            if not rest:
                raise ConfigError(f"override {text!r}: expected layers[SEL].kind.field=value")
            patch: dict[str, Any] = {}
            _set_path(patch, rest.split("."), value, text)
            data.setdefault("overrides", []).append({"layers": sel, **patch})
            continue
        _set_path(data, key.split("."), value, text)
    return data


def _set_path(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = data
    for j, part in enumerate(parts[:-1]):
        if not part:
            raise ConfigError(f"override {text!r}: empty path component")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[: j + 1])} is {nxt!r}, not a mapping")
        node = nxt
    last = parts[-1]
    if last == "type" and node:
        parent = parts[-2] if len(parts) > 1 else ""
        current = node.get("type", DEFAULT_TYPES.get("rope_scaling" if parent == "scaling" else parent))
        if current is not None and current != value:  # (a type left out is its kind's default type)
            node.clear()  # a new component type starts from its own defaults
    node[last] = value


# ------------------------------------------------------------------------------ finding configs
def shipped_configs() -> dict[str, Path]:
    """Name -> path of every YAML config shipped with the package (``configs/`` in the repo)."""
    root = resources.files("llmparts.configs")
    out: dict[str, Path] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith("_"):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith((".yaml", ".yml")):
                out[prefix + child.name.rsplit(".", 1)[0]] = Path(str(child))

    walk(root, "")
    return out


def load_config(source: str | Path | dict[str, Any] | ModelConfig, overrides: list[str] | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from a shipped name (``"qwen3-0.6b"``), a YAML path, a dict or a config."""
    if isinstance(source, ModelConfig):
        data = source.to_dict()
        origin = source.name or "config"
    elif isinstance(source, dict):
        data, origin = source, "config"
    elif not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config must be a shipped config name, a YAML path, a dict or a ModelConfig, "
                          f"got {type(source).__name__}")
    else:
        path = Path(source)
        if not path.is_file():
            names = shipped_configs()
            if str(source) not in names:
                raise ModelNotFoundError(
                    f"config {str(source)!r} is neither a file nor a shipped config name"
                    f"{closest(str(source), names)}; shipped: {', '.join(sorted(n for n in names if '/' not in n))}"
                )
            path = names[str(source)]
        try:
            data = yaml_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML config (not text); a checkpoint (a .gguf file or a model "
                              f"directory) loads with load_pretrained") from None
        if isinstance(data, dict) and "name" not in data:
            data["name"] = path.stem
        origin = str(path)
    data = apply_cli_overrides(data, overrides)
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        if origin == "config":
            raise
        raise type(e)(f"{origin}: {e}") from None
