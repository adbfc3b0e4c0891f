"""Building blocks. Each module takes its own resolved spec plus the little context it needs."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import module_class
from ..specs import Spec


def build(spec: Spec, **ctx: Any) -> nn.Module:
    """Instantiate the module registered for ``spec``'s kind and type."""
    return module_class(spec.kind, spec.type)(spec, **ctx)


from . import attention, mla, mlp, moe, norm, position  # noqa: E402,F401  (registration side effects)
