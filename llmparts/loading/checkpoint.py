"""Reading safetensors checkpoints (single file or sharded) one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

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
        if index.is_file() and (directory / SINGLE).is_file():
            raise CheckpointError(f"{directory}: has both {SINGLE} and {INDEX} (sharded), so which weights are "
                                  f"meant is ambiguous (transformers reads {SINGLE}); remove the stale one")
        if index.is_file():
            weight_map = read_index(index)
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
        self._where: dict[str, tuple[Path, int, int]] = {}  # key -> (file, byte offset, byte length)
        for f in self.files:
            for key, (dtype, shape, start, length) in read_header(f).items():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key][0].name} and {f.name}")
                self.shapes[key], self.dtypes[key] = shape, dtype
                self._where[key] = (f, start, length)
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.shapes))
            if absent:
                raise CheckpointError(
                    f"{index}: {len(absent)} tensor(s) listed in the index are not in the shards, e.g. {absent[:3]}"
                )
            elsewhere = sorted(k for k, (f, _, _) in self._where.items() if weight_map.get(k) != f.name)
            if elsewhere:  # (an index that disagrees with its shards is a broken checkpoint: which is right?)
                k = elsewhere[0]
                raise CheckpointError(
                    f"{index}: {len(elsewhere)} tensor(s) of the shards are missing from the index or listed in "
                    f"another shard, e.g. {k!r} is in {self._where[k][0].name}, the index says {weight_map.get(k)!r}"
                )

    def dominant_dtype(self) -> torch.dtype | None:
        """The dtype most floating-point tensors are stored in."""
        counts: dict[torch.dtype, int] = {}
        for d in self.dtypes.values():
            if d in ("F32", "F16", "BF16"):
                counts[DTYPES[d]] = counts.get(DTYPES[d], 0) + 1
        return max(counts, key=counts.__getitem__) if counts else None

    def tensors(self, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` in file order, each read into a fresh CPU tensor."""
        for key in self.ordered(keys):
            out = torch.empty(self.shapes[key], dtype=DTYPES[self.dtypes[key]], device="cpu")
            self.read_into(key, out)
            yield key, out

    def in_place(self, key: str, out: torch.Tensor) -> bool:
        """Whether :meth:`read_into` reads ``key`` straight into ``out``'s memory (no temporary)."""
        return out.device.type == "cpu" and out.dtype == DTYPES[self.dtypes[key]] and out.is_contiguous()

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read tensor ``key`` into ``out``: straight into its memory when dtype and device allow
        (no second copy), otherwise through a temporary CPU tensor and ``copy_`` (which casts)."""
        f, start, length = self._where[key]
        src_dtype = DTYPES[self.dtypes[key]]
        direct = self.in_place(key, out)
        buf = out if direct else torch.empty(self.shapes[key], dtype=src_dtype, device="cpu")
        with open(f, "rb") as fh:
            fh.seek(start)
            view = memoryview(buf.view(torch.uint8).numpy()).cast("B") if buf.numel() else memoryview(b"")
            got = fh.readinto(view) if length else 0
        if got != length:
            raise CheckpointError(f"{f}: tensor {key!r} is truncated ({got} of {length} bytes)")
        if not direct:
            out.copy_(buf.view(out.shape) if buf.shape != out.shape else buf)

    def ordered(self, keys: set[str] | None) -> list[str]:
        """Keys in on-disk order (sequential reads)."""
        chosen = [k for k in self._where if keys is None or k in keys]
        return sorted(chosen, key=lambda k: (str(self._where[k][0]), self._where[k][1]))


DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name (a plain file
    name in the index's directory)."""
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid index ({type(e).__name__}: {e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid index: expected a JSON object with a 'weight_map' object")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be the file name of a shard in "
                                  f"{index.parent}, got {shard!r}")
    return weight_map


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"key {dup!r} appears twice in the header")
    return out


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Parse a safetensors header without mapping the file: key -> (dtype, shape, offset, nbytes).

    Checked as the safetensors format requires (its reference implementation refuses the same files):
    well-typed entries, offsets that match each shape and dtype and, in order, tile the data buffer
    exactly (no overlap, gap or trailing bytes). So a truncated or corrupt file fails here, before loading.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file size {size}")
            header = json.loads(fh.read(n), object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None
    base = 8 + n
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: not a valid safetensors file (__metadata__ must map strings to strings)")
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
        if ok:
            dtype, shape, offsets = info.get("dtype"), info["shape"], info["data_offsets"]
            ok = isinstance(dtype, str) and all(map(_natural, shape)) and len(offsets) == 2 and all(map(_natural, offsets))
        if not ok:
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: expected dtype (a string), shape (a list "
                                  f"of integers >= 0) and data_offsets (two integers >= 0), got {info!r}"[:400])
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        itemsize = DTYPES[dtype].itemsize
        if end - begin != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} has inconsistent offsets for shape {tuple(shape)} {dtype}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {key!r} ends at byte {base + end} but the file has {size} bytes"
            )
        out[key] = (dtype, tuple(shape), base + begin, end - begin)
    at = base
    for key, (_, _, start, length) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != at:
            raise CheckpointError(f"{path}: not a valid safetensors file: tensor {key!r} starts at byte {start}, "
                                  f"where {'the previous tensor ends at' if at > base else 'the data begins at'} {at} "
                                  "(tensors must follow each other without overlap or gap)")
        at += length
    if at != size:
        raise CheckpointError(f"{path}: not a valid safetensors file: the tensors end at byte {at} but the file has "
                              f"{size} bytes")
    return out


class PickleCheckpoint:
    """``pytorch_model.bin`` checkpoints (single or sharded), read only on request, with
    ``torch.load(weights_only=True, mmap=True)``: no arbitrary code runs and tensors stay on disk."""

    def __init__(self, directory: Path) -> None:
        index = directory / "pytorch_model.bin.index.json"
        if index.is_file():
            names = sorted(set(read_index(index).values()))
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
