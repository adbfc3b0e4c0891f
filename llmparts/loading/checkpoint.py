"""Reading safetensors checkpoints (single file or sharded) one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsCheckpoint:
    """The tensors of a HF checkpoint directory, read lazily from one or more safetensors files.

    ``shapes`` comes from the file headers only; :meth:`tensors` streams ``(key, tensor)`` pairs
    shard by shard so at most one tensor is materialised at a time.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{directory}: shard(s) listed in {INDEX} are missing: {', '.join(missing)}")
            self.files = [directory / s for s in shards]
        elif (directory / SINGLE).is_file():
            self.files = [directory / SINGLE]
            weight_map = None
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            if len(found) >= 1 and not any(p.endswith(".bin") for p in found):
                self.files = [directory / f for f in found]
                weight_map = None
            else:
                pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
                hint = (
                    f" It has pickle checkpoint(s) {pickles}: pickles can run code when loaded, so they are read "
                    "only with allow_pickle=True (and then with torch.load(weights_only=True))."
                    if pickles
                    else ""
                )
                raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX} found.{hint}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._file_of: dict[str, Path] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for key in h.keys():
                        sl = h.get_slice(key)
                        if key in self._file_of:
                            raise CheckpointError(f"tensor {key!r} appears in both {self._file_of[key].name} and {f.name}")
                        self.shapes[key] = tuple(sl.get_shape())
                        self.dtypes[key] = sl.get_dtype()
                        self._file_of[key] = f
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(f"{f}: cannot read safetensors header ({type(e).__name__}: {e})") from None
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.shapes))
            if absent:
                raise CheckpointError(
                    f"{index}: {len(absent)} tensor(s) listed in the index are not in the shards, e.g. {absent[:3]}"
                )

    def dominant_dtype(self) -> torch.dtype | None:
        """The dtype most floating-point tensors are stored in."""
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        counts: dict[torch.dtype, int] = {}
        for key, d in self.dtypes.items():
            if d in names:
                counts[names[d]] = counts.get(names[d], 0) + 1
        return max(counts, key=counts.__getitem__) if counts else None

    def tensors(self, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    if keys is not None and key not in keys:
                        continue
                    try:
                        tensor = h.get_tensor(key)
                    except Exception as e:
                        raise CheckpointError(f"{f}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None
                    yield key, tensor

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self._file_of[key]), framework="pt") as h:
            return h.get_tensor(key)


class PickleCheckpoint:
    """``pytorch_model.bin`` checkpoints (single or sharded), read only on request, with
    ``torch.load(weights_only=True, mmap=True)``: no arbitrary code runs and tensors stay on disk."""

    def __init__(self, directory: Path) -> None:
        index = directory / "pytorch_model.bin.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index ({e})") from None
        else:
            names = sorted(p.name for p in directory.glob("*.bin"))
        missing = [n for n in names if not (directory / n).is_file()]
        if not names or missing:
            raise CheckpointError(f"{directory}: pickle checkpoint file(s) missing: {missing or 'pytorch_model.bin'}")
        self.shards: dict[str, dict[str, torch.Tensor]] = {}
        for n in names:
            try:
                sd = torch.load(directory / n, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{directory / n}: cannot be read safely ({type(e).__name__}: {e})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{directory / n}: expected a state dict, got {type(sd).__name__}")
            self.shards[n] = sd
        self.shapes = {k: tuple(v.shape) for sd in self.shards.values() for k, v in sd.items()}
        self.dtypes = {k: v.dtype for sd in self.shards.values() for k, v in sd.items()}

    def dominant_dtype(self) -> torch.dtype | None:
        floats = [d for d in self.dtypes.values() if d.is_floating_point]
        return max(set(floats), key=floats.count) if floats else None

    def tensors(self, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for sd in self.shards.values():
            for k, v in sd.items():
                if keys is None or k in keys:
                    yield k, v
