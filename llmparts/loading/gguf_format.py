"""A small, fast reader for the GGUF container format (metadata, tensor table, tensor data).

``gguf.GGUFReader`` builds a numpy view per array element, which takes seconds for a 262k-token
vocabulary; this reader parses the same layout (GGUF v2/v3, little-endian) in one pass from a
read-only mapping it then lets go, and reads each tensor's bytes when asked. (Slices of a mapping
would stay in the process's resident memory until the mapping is gone: the whole quantized file on
top of the dequantized weights. Measured for SmolLM2-135M Q4_1 loaded in bfloat16: peak 1.48x the
weight bytes mapped, 1.23x read.) Dequantization itself stays with the ``gguf`` package (plus a torch fast path
for Q8_0, the type of most embeddings).

Layout: magic ``GGUF``, u32 version, u64 tensor count, u64 metadata count; metadata as
(string key, u32 type, value); tensor infos as (string name, u32 n_dims, u64 dims..., u32 type,
u64 offset); tensor data after padding to ``general.alignment`` (default 32).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types -> struct format (8 string, 9 array handled separately)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (innermost, the row length) first
    type: int  # GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFormatError(ValueError):
    pass


class GGUFContainer:
    """Metadata dict and tensor table of a GGUF file; ``data(info)`` reads a tensor's bytes."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        buf = np.memmap(self.path, dtype=np.uint8, mode="r")  # (parsed, then dropped with this frame)
        mv = memoryview(buf)  # type: ignore[arg-type]
        self._pos = 0

        def take(n: int) -> memoryview:
            if self._pos + n > len(mv):
                raise GGUFFormatError(f"file ends inside the header (needed {n} bytes at offset {self._pos})")
            out = mv[self._pos : self._pos + n]
            self._pos += n
            return out

        def scalar(fmt: str) -> Any:
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            n = scalar("<Q")
            return bytes(take(n)).decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            if vtype in _SCALARS:
                return scalar(_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, count = scalar("<I"), scalar("<Q")
                if itype in _NUMPY:
                    size = np.dtype(_NUMPY[itype]).itemsize * count
                    return np.frombuffer(take(size), dtype=_NUMPY[itype]).tolist()
                if itype == 8:
                    out = []
                    for _ in range(count):
                        out.append(string())
                    return out
                return [value(itype) for _ in range(count)]
            raise GGUFFormatError(f"unknown metadata value type {vtype} at offset {self._pos}")

        if bytes(take(4)) != b"GGUF":
            raise GGUFFormatError("bad magic (not a GGUF file)")
        self.version = scalar("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (2, 3)")
        n_tensors, n_kv = scalar("<Q"), scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            self.fields[key] = value(scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = scalar("<I")
            dims = tuple(scalar("<Q") for _ in range(n_dims))
            ttype, offset = scalar("<I"), scalar("<Q")
            infos.append((name, dims, ttype, offset))
        align = self.fields.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"general.alignment must be a non-zero power of two, got {align!r}")
        start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        expected = 0  # llama.cpp's rule: tensor data in table order, each at the aligned end of the previous
        for name, dims, ttype, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name!r} has unknown type {ttype}") from None
            if name in self.tensors:
                raise GGUFFormatError(f"tensor {name!r} appears twice in the tensor table")
            n = math.prod(dims)  # (Python integers: a product past 64 bits is caught below, not wrapped)
            if dims and dims[0] % block:
                raise GGUFFormatError(f"tensor {name!r}: its rows of {dims[0]} values are not whole blocks of {block} "
                                      f"for type {GGMLQuantizationType(ttype).name}")
            nbytes = n // block * type_size
            if offset != expected:
                raise GGUFFormatError(f"tensor {name!r} starts at data offset {offset}, expected {expected} (the "
                                      "aligned end of the previous tensor): the tensor table is corrupt")
            expected += (nbytes + align - 1) // align * align
            info = TensorInfo(name, dims, ttype, start + offset, nbytes)
            if info.offset + nbytes > len(buf):
                raise GGUFFormatError(
                    f"file is truncated: tensor {name!r} ends at byte {info.offset + nbytes}, file has {len(buf)}"
                )
            self.tensors[name] = info
        value = None  # type: ignore[assignment]  # (its closure refers to itself: without this the mapping
        # would live until the cyclic garbage collector ran, not end with this call)

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes, read from the file (a new array)."""
        out = np.fromfile(self.path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if out.size != info.nbytes:  # (the file changed since it was parsed)
            raise GGUFFormatError(f"{self.path}: tensor {info.name!r} is truncated (read {out.size} of "
                                  f"{info.nbytes} bytes): the file changed after it was opened")
        return out
