"""Quantized HF checkpoints (MXFP4, block FP8) presented as ordinary, dequantized tensors.

Two formats, exactly as transformers reads them when it dequantizes on load:

* **MXFP4** (GPT-OSS experts, ``quant_method: mxfp4``): ``X_blocks`` uint8 ``(E, out, G, 16)`` holds
  two FP4 (e2m1) codes per byte, low nibble first; ``X_scales`` uint8 ``(E, out, G)`` holds one E8M0
  exponent per 32 values: ``value = FP4[code] * 2**(scale - 127)``. The dequantized ``(E, out, in)``
  tensor is transposed to ``(E, in, out)``, the layout of transformers' parameter ``X``
  (``integrations/mxfp4.py::_convert_moe_packed_tensors``).
* **Block FP8** (DeepSeek-V3, ``quant_method: fp8``): ``X`` float8_e4m3fn ``(out, in)`` plus
  ``X_scale_inv`` float32 ``(ceil(out/bo), ceil(in/bi))``:
  ``W[r, c] = X[r, c] * scale_inv[r // bo, c // bi]``, computed in float32, then cast
  (``integrations/finegrained_fp8.py::Fp8Dequantize``; edge blocks may be partial).

:class:`QuantizedCheckpoint` wraps a checkpoint reader and shows the logical tensors only, so the
weight maps never see blocks, scales or float8. It knows formats, not model families. All pairing
and shape checks run at construction, before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .checkpoint import DTYPES

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values per E8M0 scale (16 bytes of blocks)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEQUANT_CHUNK = 1 << 22  # values dequantized at a time (bounds the float32 temporaries to ~16 MiB)


# --------------------------------------------------------------------------------------------- MXFP4
def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                     device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 ``blocks (..., out, G, 16)`` + ``scales (..., out, G)`` (uint8) -> ``(..., out, G*32)``.

    Byte ``k`` of a block holds element ``2k`` in its low nibble and ``2k+1`` in its high nibble.
    The scale is applied with ``ldexp`` in float32 (float64 for a float64 result) and cast once, so
    the result is bit-identical to transformers' conversion in every dtype (and exact in bf16/fp32
    for in-range scales). Works in row chunks on ``device`` (default: ``out``'s or the blocks'), so
    only the uint8 input and the output are ever whole.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                              "(expected blocks (..., G, 16) and scales (..., G))")
    shape = (*blocks.shape[:-2], blocks.shape[-2] * MXFP4_GROUP)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device if device is not None else blocks.device)
    elif tuple(out.shape) != shape:
        raise CheckpointError(f"MXFP4 output has shape {tuple(out.shape)}, expected {shape}")
    device = out.device
    work = torch.float64 if out.dtype == torch.float64 else torch.float32
    dst = out if out.is_contiguous() else torch.empty(shape, dtype=out.dtype, device=device)
    flat_b, flat_s, flat_o = blocks.reshape(-1, 16), scales.reshape(-1, 1), dst.view(-1, MXFP4_GROUP)
    lut = torch.tensor(FP4_VALUES, dtype=work, device=device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([lut[byte & 0x0F], lut[byte >> 4]], -1)  # byte -> (element 2k, element 2k+1)
    step = max(1, DEQUANT_CHUNK // MXFP4_GROUP)
    with torch.no_grad():
        for r0 in range(0, flat_b.shape[0], step):
            v = pairs[flat_b[r0 : r0 + step].to(device).long()].view(-1, MXFP4_GROUP)
            torch.ldexp(v, flat_s[r0 : r0 + step].to(device, torch.int32) - 127, out=v)
            flat_o[r0 : r0 + step] = v
        if dst is not out:
            out.copy_(dst)
    return out


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MXFP4 quantizer: ``w (..., in)`` with ``in % 32 == 0`` -> ``(blocks, scales)``.

    Each group of 32 gets the smallest power-of-two scale with ``amax / scale <= 6`` (no clipping),
    then every value rounds to the nearest FP4 code (ties to the even code). Values already of the
    form ``FP4 * 2**k`` per group come back exactly.
    """
    if w.shape[-1] % MXFP4_GROUP:
        raise ValueError(f"last dim {w.shape[-1]} is not a multiple of {MXFP4_GROUP}")
    x = w.detach().to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // MXFP4_GROUP, MXFP4_GROUP)
    amax = x.abs().amax(-1)
    mant, exp = torch.frexp(amax / 6.0)  # amax/6 = mant * 2**exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)  # ceil(log2(amax / 6))
    e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(-127, 127)
    mag = torch.ldexp(x.abs(), -e.unsqueeze(-1)).contiguous()
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    code = torch.bucketize(mag, mids)  # a midpoint rounds down here ...
    tie = (code < 7) & (mag == mids[code.clamp(max=6)])
    code = code + (tie & (code % 2 == 1)).long()  # ... then up when the lower code is odd (ties to even)
    code = code | (torch.signbit(x).long() << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (e + 127).to(torch.uint8)


# ----------------------------------------------------------------------------------------- block FP8
def _fp8_grid(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    if block is None:
        return ()
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None = (128, 128),
                          dtype: torch.dtype = torch.bfloat16, *, device: torch.device | str | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Block FP8 ``weight (..., out, in)`` with ``scale_inv (..., ceil(out/bo), ceil(in/bi))`` -> ``(..., out, in)``.

    ``W[r, c] = weight[r, c] * scale_inv[r // bo, c // bi]`` in float32, cast once to ``dtype``;
    blocks on the last row/column may be partial. ``block=None`` means one scale for the tensor.
    Works in row chunks (whole row blocks) on ``device`` (default: ``out``'s or the weight's).
    """
    if not weight.dtype.is_floating_point or weight.element_size() != 1:
        raise CheckpointError(f"FP8 weight must be a float8 tensor, got {weight.dtype}")
    if weight.ndim < 2:
        raise CheckpointError(f"FP8 weight must have at least 2 dims, got shape {tuple(weight.shape)}")
    if block is None:
        if scale_inv.numel() != 1:
            raise CheckpointError(f"per-tensor FP8 scale must have one element, got shape {tuple(scale_inv.shape)}")
        bo, bi = weight.shape[-2], weight.shape[-1]
        scale_inv = scale_inv.reshape(1, 1, 1).expand(math.prod(weight.shape[:-2]), 1, 1)
    else:
        bo, bi = block
        grid = _fp8_grid(tuple(weight.shape), block)
        if tuple(scale_inv.shape) != grid:
            raise CheckpointError(f"FP8 scale_inv has shape {tuple(scale_inv.shape)}, but weight "
                                  f"{tuple(weight.shape)} with blocks {tuple(block)} needs {grid}")
    rows, cols = weight.shape[-2:]
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=device if device is not None else weight.device)
    elif out.shape != weight.shape:
        raise CheckpointError(f"FP8 output has shape {tuple(out.shape)}, expected {tuple(weight.shape)}")
    device = out.device
    w3, s3 = weight.reshape(-1, rows, cols), scale_inv.reshape(-1, *scale_inv.shape[-2:])
    step = max(1, DEQUANT_CHUNK // max(1, cols * bo)) * bo  # whole row blocks per chunk
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=device)
    o3 = dst.view(-1, rows, cols)
    with torch.no_grad():
        for i in range(w3.shape[0]):
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                s = s3[i, r0 // bo : math.ceil(r1 / bo)].to(device, torch.float32)
                s = s.repeat_interleave(bo, 0)[: r1 - r0].repeat_interleave(bi, 1)[:, :cols]
                o3[i, r0:r1] = w3[i, r0:r1].to(device).to(torch.float32) * s
        if dst is not out:
            out.copy_(dst)
    return out


def quantize_fp8_blocks(w: torch.Tensor,
                        block: tuple[int, int] | None = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block FP8 quantizer: ``w (..., out, in)`` -> ``(float8_e4m3fn weight, float32 scale_inv)``.

    ``scale_inv = amax / 448`` per block (1 for an all-zero block); ``weight = round(w / scale_inv)``
    (round to nearest even). Partial edge blocks are handled by padding.
    """
    x = w.detach().to(torch.float32)
    rows, cols = x.shape[-2:]
    bo, bi = (rows, cols) if block is None else block
    pr, pc = -rows % bo, -cols % bi
    padded = torch.nn.functional.pad(x, (0, pc, 0, pr))
    tiles = padded.reshape(*x.shape[:-2], (rows + pr) // bo, bo, (cols + pc) // bi, bi)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(padded.shape)[..., :rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), (scale_inv.reshape(()) if block is None else scale_inv).contiguous()


# -------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class QuantConfig:
    """A config.json ``quantization_config`` llmparts can dequantize."""

    method: str  # "mxfp4" | "fp8"
    weight_block_size: tuple[int, int] | None = None  # fp8: (rows, cols) per scale; None = per tensor
    modules_to_not_convert: tuple[str, ...] = ()  # informational: which modules stay unquantized
    source: str = "config.json"


# key -> allowed values (None: any value of the right type, checked below)
_MXFP4_KEYS: dict[str, tuple[Any, ...] | None] = {
    "quant_method": ("mxfp4",), "modules_to_not_convert": None, "dequantize": (True, False),
}
_FP8_KEYS: dict[str, tuple[Any, ...] | None] = {
    "quant_method": ("fp8",), "fmt": ("e4m3",), "activation_scheme": ("dynamic",), "weight_block_size": None,
    "modules_to_not_convert": None, "ignored_layers": None, "modules_to_convert": None,
    "dequantize": (True, False), "scale_fmt": ("float",), "expert_dtype": ("fp8",),
}
_METHODS = {"mxfp4": _MXFP4_KEYS, "fp8": _FP8_KEYS}


def parse_quant_config(data: dict[str, Any] | None, source: str = "config.json") -> QuantConfig | None:
    """Validate a config.json's ``quantization_config`` value (``None`` -> ``None``).

    Supported: ``{quant_method: mxfp4}`` (released GPT-OSS) and ``{quant_method: fp8, fmt: e4m3,
    activation_scheme: dynamic, weight_block_size: [bo, bi]}`` (released DeepSeek-V3), plus the keys
    transformers itself writes for them. Anything else raises :class:`UnsupportedModelError` naming
    the field, its value and what is supported.
    """
    if data is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    method = data.get("quant_method")
    if method not in _METHODS:
        raise UnsupportedModelError(f"{where}.quant_method={method!r} is not supported; llmparts dequantizes "
                                    f"{' and '.join(map(repr, _METHODS))} checkpoints")
    allowed = _METHODS[method]
    for key, value in data.items():
        if key not in allowed:
            raise UnsupportedModelError(f"{where}.{key}={value!r} is not a field llmparts knows for "
                                        f"quant_method={method!r}; known: {', '.join(sorted(allowed))}")
        if allowed[key] is not None and value is not None and value not in allowed[key]:
            raise UnsupportedModelError(f"{where}.{key}={value!r} is not supported for quant_method={method!r}; "
                                        f"supported: {', '.join(map(repr, allowed[key]))}")
    skip = data.get("modules_to_not_convert") or data.get("ignored_layers") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"{where}.modules_to_not_convert={skip!r} must be a list of module names")
    block = None
    if method == "fp8":
        block = data.get("weight_block_size", [128, 128])
        if block is not None:
            if (not isinstance(block, (list, tuple)) or len(block) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
                raise ConfigError(f"{where}.weight_block_size={block!r} must be two positive integers or null")
            block = (block[0], block[1])
    return QuantConfig(method, block, tuple(skip), source)


# ---------------------------------------------------------------------------------------- checkpoint
def stored_dtype(ckpt: Any, key: str) -> torch.dtype | None:
    d = getattr(ckpt, "dtypes", {}).get(key)
    return d if isinstance(d, torch.dtype) else DTYPES.get(d) if isinstance(d, str) else None


def _is_fp8(d: torch.dtype | None) -> bool:
    return d is not None and d.is_floating_point and d.itemsize == 1


def detect_quantization(ckpt: Any) -> str | None:
    """``"mxfp4"``, ``"fp8"`` or ``None``: which quantized tensors a checkpoint holds (by dtype and
    the ``_blocks``/``_scales``/``_scale_inv`` names), so a loader can refuse a quantized checkpoint
    whose config.json has no ``quantization_config``."""
    keys = ckpt.shapes
    if any(k.endswith(("_blocks", "_scales")) and stored_dtype(ckpt, k) in (torch.uint8, None) for k in keys):
        return "mxfp4"
    if any(_is_fp8(stored_dtype(ckpt, k)) or k.endswith("_scale_inv") for k in keys):
        return "fp8"
    return None


def wrap_quantized(ckpt: Any, quant: QuantConfig | None, source: str = "checkpoint",
                   dtype: torch.dtype | None = None) -> Any:
    """The loader's one call: ``ckpt`` unchanged when it is not quantized, a
    :class:`QuantizedCheckpoint` (dequantizing to ``dtype`` in :meth:`~QuantizedCheckpoint.tensors`)
    when ``quant`` says how; a clear error when tensors and config disagree."""
    if quant is None:
        found = detect_quantization(ckpt)
        if found:
            examples = [k for k in ckpt.shapes if k.endswith(("_blocks", "_scales", "_scale_inv"))
                        or _is_fp8(stored_dtype(ckpt, k))][:3]
            raise CheckpointError(f"{source}: the checkpoint holds {found} quantized tensors (e.g. {examples}) but "
                                  "config.json has no quantization_config saying how to dequantize them")
        return ckpt
    return QuantizedCheckpoint(ckpt, quant, dtype=dtype, source=source)


class QuantizedCheckpoint:
    """A checkpoint reader that shows quantized tensors as the dequantized tensors transformers holds.

    MXFP4: ``X_blocks`` + ``X_scales`` -> ``X`` of shape ``(E, in, out)``; FP8: float8 ``X`` +
    ``X_scale_inv`` -> ``X`` of shape ``(..., out, in)``. Other keys pass through. Same protocol as
    :class:`~llmparts.loading.checkpoint.SafetensorsCheckpoint`: ``shapes``, ``dtypes``,
    ``tensors``, ``read_into``, ``ordered``, ``dominant_dtype``. ``dtype`` is what :meth:`tensors`
    dequantizes to (default: :meth:`dominant_dtype`, else float32); :meth:`read_into` uses ``out``'s.
    """

    detect = staticmethod(detect_quantization)

    def __init__(self, inner: Any, quant: QuantConfig, dtype: torch.dtype | None = None,
                 source: str = "checkpoint") -> None:
        self.inner, self.quant, self.source = inner, quant, source
        self._packed: dict[str, tuple[str, str]] = {}  # logical key -> (data key, scale key)
        shapes = dict(inner.shapes)
        if quant.method == "mxfp4":
            self._pair_mxfp4(shapes)
        elif quant.method == "fp8":
            self._pair_fp8(shapes)
        else:
            raise UnsupportedModelError(f"{source}: quantization method {quant.method!r} is not supported")
        hidden = {k for pair in self._packed.values() for k in pair}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for k, s in shapes.items():  # keep the inner order; a logical key takes its data tensor's place
            if k not in hidden:
                self.shapes[k] = tuple(s)
            elif k in self._data_of:
                self.shapes[self._data_of[k]] = self._logical_shape(self._data_of[k], shapes)
        self.dtype = dtype or self.dominant_dtype() or torch.float32
        if hasattr(inner, "dtypes"):
            strings = any(isinstance(d, str) for d in inner.dtypes.values())
            name = {v: n for n, v in DTYPES.items()}.get(self.dtype) if strings else self.dtype
            self.dtypes = {k: name if k in self._packed else inner.dtypes[k] for k in self.shapes}

    # -- pairing (all checks happen here, before anything is read)
    def _fail(self, what: str, keys: list[str]) -> None:
        more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
        raise CheckpointError(f"{self.source}: {what}: {', '.join(sorted(keys)[:5])}{more}")

    def _pair_mxfp4(self, shapes: dict[str, tuple[int, ...]]) -> None:
        fp8 = [k for k in shapes if _is_fp8(stored_dtype(self.inner, k))]
        if fp8:
            self._fail("float8 tensors in a checkpoint whose quantization_config says mxfp4", fp8)
        blocks = {k[: -len("_blocks")] for k in shapes if k.endswith("_blocks")}
        scales = {k[: -len("_scales")] for k in shapes if k.endswith("_scales")}
        if blocks - scales:
            self._fail("MXFP4 _blocks without their _scales", [f"{b}_blocks" for b in blocks - scales])
        if scales - blocks:
            self._fail("MXFP4 _scales without their _blocks", [f"{b}_scales" for b in scales - blocks])
        for x in sorted(blocks):
            b, s = f"{x}_blocks", f"{x}_scales"
            bad = [k for k in (b, s) if stored_dtype(self.inner, k) not in (torch.uint8, None)]
            if bad:
                self._fail(f"MXFP4 tensors must be uint8, got {[str(stored_dtype(self.inner, k)) for k in bad]}", bad)
            bs, ss = tuple(shapes[b]), tuple(shapes[s])
            if len(bs) != 4 or bs[-1] != 16 or bs[:-1] != ss:
                self._fail(f"MXFP4 shapes blocks {bs} / scales {ss} are not (E, out, G, 16) / (E, out, G)", [b, s])
            if x in shapes:
                self._fail("both a tensor and its MXFP4 _blocks/_scales", [x, b])
            self._packed[x] = (b, s)
        self._data_of = {b: x for x, (b, _) in self._packed.items()}

    def _pair_fp8(self, shapes: dict[str, tuple[int, ...]]) -> None:
        mx = [k for k in shapes if k.endswith(("_blocks", "_scales")) and stored_dtype(self.inner, k) == torch.uint8]
        if mx:
            self._fail("MXFP4 tensors in a checkpoint whose quantization_config says fp8", mx)
        weights = [k for k in shapes if _is_fp8(stored_dtype(self.inner, k))]
        bad = [k for k in weights if stored_dtype(self.inner, k) != torch.float8_e4m3fn]
        if bad:
            self._fail(f"FP8 tensors must be float8_e4m3fn (fmt e4m3), got {stored_dtype(self.inner, bad[0])}", bad)
        lone = [k for k in weights if f"{k}_scale_inv" not in shapes]
        if lone:
            self._fail("float8 tensors without their _scale_inv", lone)
        orphans = [k for k in shapes if k.endswith("_scale_inv") and k[: -len("_scale_inv")] not in weights]
        if orphans:
            self._fail("_scale_inv tensors without a float8 tensor to scale", orphans)
        block = self.quant.weight_block_size
        for w in weights:
            s = f"{w}_scale_inv"
            if stored_dtype(self.inner, s) not in (torch.float32, None):
                self._fail(f"FP8 scales must be float32, got {stored_dtype(self.inner, s)}", [s])
            ws, ss = tuple(shapes[w]), tuple(shapes[s])
            if len(ws) < 2:
                self._fail(f"FP8 tensor of shape {ws} (need at least 2 dims)", [w])
            want = _fp8_grid(ws, block)
            if (ss != want) if block is not None else math.prod(ss) != 1:
                self._fail(f"FP8 scale shape {ss} does not match weight {ws} with weight_block_size "
                           f"{list(block) if block else None} (expected {want or 'one element'})", [w, s])
            self._packed[w] = (w, s)
        self._data_of = {w: w for w in self._packed}

    def _logical_shape(self, key: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        data = tuple(shapes[self._packed[key][0]])
        if self.quant.method == "mxfp4":
            e, rows, g, _ = data
            return (e, g * MXFP4_GROUP, rows)
        return data

    # -- the checkpoint protocol
    def dominant_dtype(self) -> torch.dtype | None:
        """The dtype most pass-through floating tensors have (never uint8 or float8)."""
        hidden = {k for pair in self._packed.values() for k in pair}
        counts: dict[torch.dtype, int] = {}
        for k in self.inner.shapes:
            d = stored_dtype(self.inner, k)
            if k not in hidden and d is not None and d.is_floating_point and not _is_fp8(d):
                counts[d] = counts.get(d, 0) + 1
        if counts:
            return max(counts, key=counts.__getitem__)
        d = self.inner.dominant_dtype() if hasattr(self.inner, "dominant_dtype") else None
        return None if d is None or _is_fp8(d) else d

    def ordered(self, keys: set[str] | None = None) -> list[str]:
        """Logical keys in the file order of the tensors they are read from."""
        chosen = [k for k in self.shapes if keys is None or k in keys]
        phys = {self._packed[k][0] if k in self._packed else k: k for k in chosen}
        if hasattr(self.inner, "ordered"):
            return [phys[p] for p in self.inner.ordered(set(phys))]
        return chosen

    def tensors(self, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` in file order; quantized tensors dequantized to ``self.dtype`` on CPU."""
        chosen = self.ordered(keys)
        if not hasattr(self.inner, "read_into"):  # pass-through keys straight from the inner reader
            yield from self.inner.tensors({k for k in chosen if k not in self._packed})
            chosen = [k for k in chosen if k in self._packed]
        for key in chosen:
            if key in self._packed:
                out = torch.empty(self.shapes[key], dtype=self.dtype, device="cpu")
            else:
                out = torch.empty(self.shapes[key], dtype=stored_dtype(self.inner, key) or self.dtype, device="cpu")
            self.read_into(key, out)
            yield key, out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read (and dequantize) ``key`` into ``out``, casting to ``out``'s dtype on ``out``'s device."""
        if key not in self._packed:
            if hasattr(self.inner, "read_into"):
                self.inner.read_into(key, out)
            else:
                with torch.no_grad():
                    out.copy_(self._raw(key))
            return
        if tuple(out.shape) != self.shapes[key]:
            raise CheckpointError(f"{self.source}: {key} has shape {self.shapes[key]}, not {tuple(out.shape)}")
        data_key, scale_key = self._packed[key]
        data, scale = self._raw(data_key), self._raw(scale_key)
        with torch.no_grad():
            if self.quant.method == "mxfp4":  # one expert at a time: (out, in) -> transposed into (in, out)
                for e in range(data.shape[0]):
                    out[e].copy_(dequantize_mxfp4(data[e], scale[e], out.dtype, device=out.device).t())
            else:
                dequantize_fp8_blocks(data, scale, self.quant.weight_block_size, out=out)

    def _raw(self, key: str) -> torch.Tensor:
        """One stored tensor, as stored, on CPU."""
        d = stored_dtype(self.inner, key)
        if d is not None and hasattr(self.inner, "read_into"):
            t = torch.empty(self.inner.shapes[key], dtype=d, device="cpu")
            self.inner.read_into(key, t)
            return t
        for _, t in self.inner.tensors({key}):
            return t
        raise CheckpointError(f"{self.source}: tensor {key!r} could not be read")
