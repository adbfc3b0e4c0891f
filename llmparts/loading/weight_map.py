"""Declarative weight maps: checkpoint tensor names -> llmparts parameter names.

A family's map is a list of rules, pure data. ``Rename(src, dst)`` templates use ``{i}`` (layer),
``{e}`` (expert), ``{path}`` (any remainder, dots included) or any ``{name}`` placeholder; ``Ignore(src, reason)`` drops a tensor on purpose and
says why (``empty=True``: only a tensor without elements). Beyond renaming, a closed set of tensor operations covers how checkpoints pack weights:

* a destination ending in ``[{e}]`` fills one slice of a stacked parameter (per-expert checkpoint
  tensors -> ``(E, out, in)`` experts); every slice must be filled exactly once;
* ``ops`` applied in order to the checkpoint tensor: ``transpose`` (swap the last two dims: ``x @ W``
  storage -> ``(out, in)``), ``even`` / ``odd`` (every other column of the last dim: interleaved
  fused projections such as GPT-OSS's gate/up). A tensor may feed several parameters when each rule
  takes a part of it (``even`` / ``odd``). :func:`plan_assignment` matches every checkpoint key against the rules and checks the
result against the model's parameters *before anything is loaded*: every tensor consumed or
explicitly ignored, every parameter filled, every shape equal. Problems are reported grouped by
template (``layers.{i}.attn.q_norm.weight missing for i in 0..27``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern[str]:
    out, pos = "", 0
    for m in _PLACEHOLDER.finditer(template):
        out += re.escape(template[pos : m.start()])
        name = m.group(1)
        if name == "path":  # any remainder, dots included (whole sub-trees, e.g. an ignored layer)
            out += rf"(?P<{name}>.+)"
        else:
            out += rf"(?P<{name}>\d+)" if name in ("i", "e") else rf"(?P<{name}>[A-Za-z0-9_]+)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + r"\Z")


# name -> (tensor op, shape op); the only transformations a weight map may apply
_OPS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[tuple[int, ...]], tuple[int, ...]]]] = {
    "transpose": (lambda t: t.transpose(-1, -2), lambda s: (*s[:-2], s[-1], s[-2])),
    "even": (lambda t: t[..., 0::2], lambda s: (*s[:-1], (s[-1] + 1) // 2)),
    "odd": (lambda t: t[..., 1::2], lambda s: (*s[:-1], s[-1] // 2)),
}
_PARTS = {"even", "odd"}
_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


@dataclass(frozen=True)
class Target:
    """Where (part of) one checkpoint tensor goes: a parameter, optionally one slice of it, after ``ops``."""

    param: str
    index: int | None = None
    ops: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.param + ("" if self.index is None else f"[{self.index}]")

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            tensor = _OPS[op][0](tensor)
        return tensor

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for op in self.ops:
            shape = _OPS[op][1](shape)
        return tuple(shape)


@dataclass(frozen=True)
class Rename:
    """Checkpoint tensor ``src`` becomes parameter ``dst`` (both templates, same placeholders).

    ``dst`` ending in ``[{e}]`` fills slice ``e`` of a stacked parameter; ``ops`` (``transpose``,
    ``even``, ``odd``) are applied to the tensor first.
    """

    src: str
    dst: str
    ops: tuple[str, ...] = ()
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in _OPS]
        if bad:
            raise ValueError(f"unknown weight-map op(s) {bad}; known: {', '.join(_OPS)}")
        object.__setattr__(self, "pattern", _compile(self.src))

    @property
    def is_part(self) -> bool:
        return any(op in _PARTS for op in self.ops)

    def target(self, key: str) -> Target | None:
        m = self.pattern.match(key)
        if not m:
            return None
        name = self.dst.format(**m.groupdict())
        idx = _INDEX.match(name)
        if idx:
            return Target(idx.group(1), int(idx.group(2)), self.ops)
        return Target(name, None, self.ops)

    def match(self, key: str) -> str | None:
        t = self.target(key)
        return None if t is None else str(t)

    def reverse(self, name: str) -> str | None:
        """The checkpoint name of parameter ``name`` (plain renames only; packed tensors have none)."""
        if self.ops or "[" in self.dst:
            return None
        m = _compile(self.dst).match(name)
        return self.src.format(**m.groupdict()) if m else None


@dataclass(frozen=True)
class Ignore:
    """Checkpoint tensors matching ``src`` are skipped on purpose, for ``reason``; with ``empty``, only
    tensors without elements (a matching tensor that holds values is reported as having no target)."""

    src: str
    reason: str
    empty: bool = False
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile(self.src))

    def match(self, key: str) -> bool:
        return bool(self.pattern.match(key))


Rule = Rename | Ignore


def template_of(name: str) -> tuple[str, str | None]:
    """``"model.layers.3.mlp.w"`` -> ``("model.layers.{i}.mlp.w", "3")``."""
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        return name, None
    return name[: m.start()] + ".{i}." + name[m.end() :], m.group(1)


def group_names(names: Iterable[str]) -> list[str]:
    """Collapse per-layer names into one line per template with the indices it covers."""
    groups: dict[str, list[int]] = defaultdict(list)
    singles: list[str] = []
    for n in names:
        t, i = template_of(n)
        if i is None:
            singles.append(n)
        else:
            groups[t].append(int(i))
    out = sorted(singles)
    for t, idx in sorted(groups.items()):
        out.append(f"{t} for i in {_span(idx)}")
    return out


@dataclass
class Assignment:
    """The result of matching a checkpoint against a model: what goes where, what is skipped."""

    targets: dict[str, tuple[Target, ...]]  # checkpoint key -> where its tensor (or its parts) go
    ignored: dict[str, str]  # checkpoint key -> reason


def _span(idx: list[int]) -> str:
    idx = sorted(set(idx))
    if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}..{idx[-1]}"
    return ",".join(map(str, idx))


def match_key(rules: list[Rule], key: str) -> tuple[Target, ...] | Ignore | None:
    """Targets of checkpoint ``key``; the Ignore rule that skips it; or None when no rule matches.

    The first matching rule decides, except that rules taking a part (``even``/``odd``) of a
    tensor collect every other matching part rule too.
    """
    found: list[Target] = []
    for rule in rules:
        if isinstance(rule, Ignore):
            if not found and rule.match(key):
                return rule
            continue
        t = rule.target(key)
        if t is None or (found and not rule.is_part):
            continue
        found.append(t)
        if not rule.is_part:
            break
    return tuple(found) if found else None


def plan_assignment(
    rules: list[Rule],
    checkpoint: dict[str, tuple[int, ...]],
    params: dict[str, tuple[int, ...]],
    hints: dict[str, str] | None = None,
    optional: set[str] | frozenset[str] = frozenset(),
) -> Assignment:
    """Match checkpoint keys (with shapes) to parameters; raise one grouped CheckpointError on any problem.

    ``hints`` maps a parameter name to an explanation appended when it is missing; ``optional``
    parameters (second names of tied weights) may be absent.
    """
    targets: dict[str, tuple[Target, ...]] = {}
    ignored: dict[str, str] = {}
    unexpected: list[str] = []
    no_param: list[str] = []
    bad_shape: list[str] = []
    filled: dict[str, str] = {}  # param name, or "param[index]" for one slice -> checkpoint key
    slices: dict[str, list[int]] = defaultdict(list)
    mismatched: set[str] = set()
    for key, shape in checkpoint.items():
        found = match_key(rules, key)
        if found is None:
            unexpected.append(key)
            continue
        if isinstance(found, Ignore):
            if found.empty and math.prod(shape) > 0:
                no_param.append(f"{key} {tuple(shape)} -> nothing: only an empty tensor is expected here ({found.reason})")
            else:
                ignored[key] = found.reason
            continue
        ok = []
        for t in found:
            if t.param not in params:
                no_param.append(f"{key} -> {t}")
                continue
            full = tuple(params[t.param])
            want = full if t.index is None else full[1:]
            if t.index is not None and not (len(full) >= 1 and t.index < full[0]):
                no_param.append(f"{key} -> {t} (the parameter has {full[0] if full else 0} slices)")
                continue
            got = t.shape(tuple(shape))
            if got != want:
                mismatched.add(t.param)
                how = f" ({'+'.join(t.ops)}: {got})" if t.ops else ""
                bad_shape.append(f"{key}: checkpoint {tuple(shape)}{how} vs parameter {t} {want}")
                continue
            slot = str(t)
            clash = filled.get(slot) or (filled.get(t.param) if t.index is not None else None)
            if clash is None and t.index is None and slices.get(t.param):
                clash = filled[f"{t.param}[{slices[t.param][0]}]"]
            if clash is not None:
                bad_shape.append(f"{key} and {clash} both map to {slot}")
                continue
            filled[slot] = key
            if t.index is not None:
                slices[t.param].append(t.index)
            ok.append(t)
        if ok:
            targets[key] = tuple(ok)
    missing = []
    for p, shape in params.items():
        if p in filled or p in optional or p in mismatched:
            continue
        if p in slices:
            absent = sorted(set(range(shape[0])) - set(slices[p]))
            if absent:
                missing.append(f"{p}[{_span(absent)}]")
            continue
        missing.append(p)
    problems: list[str] = []
    if unexpected:
        problems.append("unexpected tensors (no rule maps them):\n    " + "\n    ".join(group_names(unexpected)))
    if no_param:
        problems.append(
            "tensors whose target parameter does not exist in this model (config and weights disagree):\n    "
            + "\n    ".join(_group_pairs(no_param))
        )
    if bad_shape:
        problems.append("shape mismatches:\n    " + "\n    ".join(_group_pairs(bad_shape)))
    if missing:
        lines = group_names(missing)
        extra = sorted({hints[p] for p in missing if hints and p in hints})
        problems.append("parameters missing from the checkpoint:\n    " + "\n    ".join(lines + extra))
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return Assignment(targets, ignored)


def _group_pairs(lines: list[str]) -> list[str]:
    """Group messages that differ only by layer index; a message alone in its group stays as is."""
    groups: dict[str, list[tuple[str, int | None]]] = defaultdict(list)
    for line in lines:
        idx = re.findall(r"\.(\d+)\.", line)
        groups[re.sub(r"\.(\d+)\.", ".{i}.", line)].append((line, int(idx[0]) if idx else None))
    out = []
    for t, members in groups.items():
        if len(members) == 1:
            out.append(members[0][0])
            continue
        idx = sorted({i for _, i in members if i is not None})
        span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))
        out.append(f"{t}  (i in {span})")
    return out
