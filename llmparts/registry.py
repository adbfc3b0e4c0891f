"""The component registry: ``(kind, type)`` -> spec class and module class.

Kinds are ``attention``, ``position``, ``rope_scaling``, ``norm``, ``mlp``, ``block`` and ``embedding``.
A spec class is a frozen dataclass describing one component; its module class builds the
``nn.Module`` from that spec. Adding a component means registering both under a new ``type``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError, closest

_SPECS: dict[tuple[str, str], type] = {}
_MODULES: dict[tuple[str, str], type] = {}


def register_spec(kind: str, type_name: str) -> Callable[[type], type]:
    """Class decorator: register a spec dataclass for ``kind`` under ``type: type_name``."""

    def deco(cls: type) -> type:
        key = (kind, type_name)
        if key in _SPECS:
            raise RuntimeError(f"spec {kind}/{type_name} registered twice")
        cls.kind = kind
        _SPECS[key] = cls
        return cls

    return deco


def register_module(kind: str, type_name: str) -> Callable[[type], type]:
    """Class decorator: register the module that implements spec ``kind``/``type_name``."""

    def deco(cls: type) -> type:
        _MODULES[(kind, type_name)] = cls
        return cls

    return deco


def types_of(kind: str) -> list[str]:
    return sorted(t for k, t in _SPECS if k == kind)


def spec_class(kind: str, type_name: Any, path: str) -> type:
    if not isinstance(type_name, str) or (kind, type_name) not in _SPECS:
        known = types_of(kind)
        hint = closest(type_name, known) if isinstance(type_name, str) else ""
        raise ConfigError(f"{path}.type: unknown {kind} type {type_name!r}{hint}; known types: {', '.join(known)}")
    return _SPECS[(kind, type_name)]


def module_class(kind: str, type_name: str) -> type:
    # Module files register themselves on import; importing the package imports them all.
    from . import modules  # noqa: F401

    try:
        return _MODULES[(kind, type_name)]
    except KeyError:
        raise ConfigError(f"no module implements {kind} type {type_name!r}") from None
