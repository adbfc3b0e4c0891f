"""Declarative weight maps: checkpoint tensor names -> llmparts parameter names.

A family's map is a list of rules, pure data. ``Rename(src, dst)`` templates use ``{i}`` (layer),
``{e}`` (expert) or any ``{name}`` placeholder; ``Ignore(src, reason)`` drops a tensor on purpose and
says why. :func:`plan_assignment` matches every checkpoint key against the rules and checks the
result against the model's parameters *before anything is loaded*: every tensor consumed or
explicitly ignored, every parameter filled, every shape equal. Problems are reported grouped by
template (``layers.{i}.attn.q_norm.weight missing for i in 0..27``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import CheckpointError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern[str]:
    out, pos = "", 0
    for m in _PLACEHOLDER.finditer(template):
        out += re.escape(template[pos : m.start()])
        name = m.group(1)
        out += rf"(?P<{name}>\d+)" if name in ("i", "e") else rf"(?P<{name}>[A-Za-z0-9_]+)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + r"\Z")


@dataclass(frozen=True)
class Rename:
    """Checkpoint tensor ``src`` becomes parameter ``dst`` (both templates, same placeholders)."""

    src: str
    dst: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile(self.src))

    def match(self, key: str) -> str | None:
        m = self.pattern.match(key)
        return self.dst.format(**m.groupdict()) if m else None

    def reverse(self, name: str) -> str | None:
        m = _compile(self.dst).match(name)
        return self.src.format(**m.groupdict()) if m else None


@dataclass(frozen=True)
class Ignore:
    """Checkpoint tensors matching ``src`` are skipped on purpose, for ``reason``."""

    src: str
    reason: str
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
        idx = sorted(set(idx))
        span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
        out.append(f"{t} for i in {span}")
    return out


@dataclass
class Assignment:
    """The result of matching a checkpoint against a model: what goes where, what is skipped."""

    targets: dict[str, str]  # checkpoint key -> parameter name
    ignored: dict[str, str]  # checkpoint key -> reason


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
    targets: dict[str, str] = {}
    ignored: dict[str, str] = {}
    unexpected: list[str] = []
    no_param: list[str] = []
    bad_shape: list[str] = []
    filled: dict[str, str] = {}
    mismatched: set[str] = set()
    for key, shape in checkpoint.items():
        for rule in rules:
            if isinstance(rule, Ignore):
                if rule.match(key):
                    ignored[key] = rule.reason
                    break
                continue
            dst = rule.match(key)
            if dst is None:
                continue
            if dst not in params:
                no_param.append(f"{key} -> {dst}")
            elif tuple(shape) != tuple(params[dst]):
                mismatched.add(dst)
                bad_shape.append(f"{key}: checkpoint {tuple(shape)} vs parameter {dst} {tuple(params[dst])}")
            elif dst in filled:
                bad_shape.append(f"{key} and {filled[dst]} both map to {dst}")
            else:
                targets[key] = dst
                filled[dst] = key
            break
        else:
            unexpected.append(key)
    missing = [p for p in params if p not in filled and p not in optional and p not in mismatched]
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
