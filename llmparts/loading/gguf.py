"""GGUF files (llama.cpp): metadata -> an HF-style config, tensors -> HF-named float tensors.

Everything specific to the format is converted once, here at the reader's edge, so the rest of
loading is the same strict path as for safetensors (family adapter, weight map, assignment check):

* tensor names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.;
* quantized blocks are dequantized with the ``gguf`` package (types in :data:`SUPPORTED_TYPES`);
* llama-architecture files store Q and K rows permuted for llama.cpp's interleaved RoPE: undone per
  head (``(n_head, head_dim / 2, 2, in)`` with the two middle axes swapped back);
* gemma3 files store every RMSNorm weight as ``w + 1`` (llama.cpp folds Gemma's ``1 + w``): 1 is
  subtracted so the weights mean what HF checkpoints mean.

Facts a GGUF file does not carry come from the family defaults stated in :data:`ARCHS` (for
gemma3: local RoPE base 10k, 5:1 local/global pattern — transformers' Gemma3TextConfig defaults — and
the attention scale llama.cpp uses: query_pre_attn_scalar = head_dim, or n_embd / n_head for the
62-layer 27B; 256 for every released size but 27B's 168. transformers assumes 256 for all.)
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsupportedModelError
from .gguf_format import GGUFContainer, GGUFFormatError, TensorInfo
from .quant import DEQUANT_CHUNK

_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")


def _supported_types() -> set[Any]:
    from gguf import GGMLQuantizationType as Q

    return {getattr(Q, n) for n in _TYPE_NAMES}


# GGUF tensor name (per block) -> HF name. Norm names depend on the architecture's block layout.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF ``general.architecture`` maps onto an HF model_type."""

    model_type: str
    block_names: dict[str, str]
    config: Callable[["GGUFFile"], dict[str, Any]]
    convert: Callable[["GGUFFile", str, np.ndarray], np.ndarray] = lambda f, name, a: a
    known_keys: tuple[str, ...] = field(default=())
    # GGUF tensor names whose conversion needs all their rows at once; the others are converted (and
    # dequantized) a few rows at a time, straight into the parameter (GGUFFile.read_into)
    whole: Callable[[str], bool] = lambda name: False


def _llama_qk(name: str) -> bool:
    return ".attn_q." in name or ".attn_k." in name


def _llama_unpermute(f: "GGUFFile", name: str, a: np.ndarray) -> np.ndarray:
    # llama.cpp's convert script permutes q/k rows so its interleaved RoPE matches HF's half layout
    if _llama_qk(name):  # (rows regrouped within each head: the whole tensor at once)
        n_head = f.meta(f"{f.arch}.attention.head_count")
        if ".attn_k." in name:
            n_head = f.meta(f"{f.arch}.attention.head_count_kv", n_head)
        rows = a.shape[0]
        return a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    return a


def _gemma3_norms(f: "GGUFFile", name: str, a: np.ndarray) -> np.ndarray:
    return a - 1.0 if name.endswith("norm.weight") else a  # stored as (w + 1)


def _rope_scaling(f: "GGUFFile") -> dict[str, Any] | None:
    kind = f.meta(f"{f.arch}.rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    factor = f.meta_float(f"{f.arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        orig = f.meta_int(f"{f.arch}.rope.scaling.original_context_length", None)
        if orig is not None:
            out["original_max_position_embeddings"] = orig
        return out
    raise UnsupportedModelError(f"{f.path}: {f.arch}.rope.scaling.type {kind!r} is not supported (linear, yarn)")


_COMMON_KEYS = (
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
    "vocab_size", "attention.key_length", "attention.value_length", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length",
)


def _common_config(f: "GGUFFile") -> dict[str, Any]:
    a = f.arch
    n_heads = f.meta_int(f"{a}.attention.head_count")
    d_model = f.meta_int(f"{a}.embedding_length")
    if n_heads <= 0:
        raise CheckpointError(f"{f.path}: GGUF metadata {a}.attention.head_count must be > 0, got {n_heads}")
    head_dim = (f.meta_int(f"{a}.attention.key_length", None) or f.meta_int(f"{a}.rope.dimension_count", None)
                or d_model // n_heads)
    value_dim = f.meta_int(f"{a}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{f.path}: key_length {head_dim} != value_length {value_dim} is not supported")
    rope_dim = f.meta_int(f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{f.path}: partial rotary ({a}.rope.dimension_count={rope_dim} < head_dim {head_dim})")
    if "model.embed_tokens.weight" not in f.shapes or len(f.shapes["model.embed_tokens.weight"]) != 2:
        raise CheckpointError(f"{f.path}: the GGUF file has no two-dimensional token embedding (token_embd.weight)")
    vocab, width = f.shapes["model.embed_tokens.weight"]
    listed = f.meta_int(f"{a}.vocab_size", vocab)
    if listed != vocab:
        raise CheckpointError(f"{f.path}: GGUF metadata {a}.vocab_size is {listed} but the token embedding has "
                              f"{vocab} rows")
    if width != d_model:  # (checked before any module is built from the sizes)
        raise CheckpointError(f"{f.path}: GGUF metadata {a}.embedding_length is {d_model} but the token embedding "
                              f"is {width} wide")
    cfg = {
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "intermediate_size": f.meta_int(f"{a}.feed_forward_length"),
        "num_hidden_layers": f.meta_int(f"{a}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": f.meta_int(f"{a}.attention.head_count_kv", n_heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": f.meta_int(f"{a}.context_length"),
        "rms_norm_eps": f.meta_float(f"{a}.attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": "lm_head.weight" not in f.shapes,
    }
    for key, meta in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if f.meta(meta, None) is not None:
            cfg[key] = f.meta_int(meta)
    pad, vocab = cfg.get("pad_token_id"), cfg.get("vocab_size")
    if pad is not None and isinstance(vocab, int) and not -vocab <= pad < vocab:
        # config.json's pad_token_id makes the embedding's padding row; a GGUF's padding token is tokenizer
        # metadata (transformers refuses such a file). Generation never needs that row: load without one.
        warnings.warn(f"{f.path}: tokenizer.ggml.padding_token_id {pad} is outside the vocabulary ({vocab} tokens); "
                      "the embedding gets no padding row", stacklevel=2)
        del cfg["pad_token_id"]
    return cfg


def _llama_config(f: "GGUFFile") -> dict[str, Any]:
    if "rope_freqs.weight" in f.raw_names:
        raise UnsupportedModelError(
            f"{f.path}: this file stores RoPE frequency factors (rope_freqs, Llama 3.1-style scaling) whose "
            "scaling parameters GGUF does not record; load the original safetensors checkpoint instead"
        )
    cfg = _common_config(f)
    # optional in llama.cpp's llama graph (Qwen2-style exports carry them): present in block 0 or absent
    cfg["attention_bias"] = "blk.0.attn_q.bias" in f.raw_names
    rope = {"rope_type": "default", "rope_theta": f.meta_float("llama.rope.freq_base", 10000.0)}
    rope.update(_rope_scaling(f) or {})
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rope_parameters=rope)
    return cfg


def _gemma3_config(f: "GGUFFile") -> dict[str, Any]:
    cfg = _common_config(f)
    full = {"rope_type": "default", "rope_theta": f.meta_float("gemma3.rope.freq_base", 1_000_000.0)}
    full.update(_rope_scaling(f) or {})
    cfg.update(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=f.meta_int("gemma3.attention.sliding_window", 4096),
        # Not stored in GGUF: transformers' Gemma3TextConfig defaults (local base 10k, pattern 6), and the
        # attention scale as llama.cpp computes it: 1/sqrt(head_dim), except for the 62-layer Gemma 3 27B,
        # 1/sqrt(n_embd / n_head) (168, its released query_pre_attn_scalar; every other size has 256 = head_dim)
        query_pre_attn_scalar=(cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 62
                               else cfg["head_dim"]),
        sliding_window_pattern=6,
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )
    return cfg


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", {**_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"}, _llama_config,
                      _llama_unpermute, _COMMON_KEYS, _llama_qk),
    "gemma3": GGUFArch(
        "gemma3_text",
        {**_BLOCK_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
         "post_ffw_norm": "post_feedforward_layernorm"},
        _gemma3_config, _gemma3_norms, (*_COMMON_KEYS, "attention.sliding_window"),
    ),
}

_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFFile:
    """A GGUF file opened for reading (memory-mapped); tensors come out dequantized, HF-named."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGMLQuantizationType as Q

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.container = GGUFContainer(self.path)
        except (GGUFFormatError, OSError, ValueError, UnicodeDecodeError, struct.error) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.fields = self.container.fields
        arch = self.meta("general.architecture", None)
        if arch not in ARCHS:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
            )
        self.arch, self.spec = arch, ARCHS[arch]
        unknown = [k for k in self.fields if k.startswith(f"{arch}.") and k[len(arch) + 1 :] not in self.spec.known_keys]
        if unknown:
            raise UnsupportedModelError(
                f"{self.path}: GGUF metadata {', '.join(unknown)} is not understood by llmparts for architecture "
                f"{arch!r}; refusing to guess what it changes"
            )
        supported = _supported_types()
        infos = self.container.tensors.values()
        bad = sorted({Q(t.type).name for t in infos if t.type not in supported})
        if bad:
            raise UnsupportedModelError(
                f"{self.path}: quantization type(s) {', '.join(bad)} are not supported; supported: {', '.join(_TYPE_NAMES)}"
            )
        self._tensors: dict[str, TensorInfo] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.raw_names = {t.name for t in infos}
        for t in infos:
            name = self.hf_name(t.name)
            self._tensors[name] = t
            self.shapes[name] = tuple(int(d) for d in reversed(t.shape))
        self.config = self.spec.config(self)

    def meta_int(self, key: str, default: Any = ...) -> Any:
        """An integer metadata value (``default`` when absent); arrays (per-layer values) are refused."""
        value = self.meta(key, default)
        if value is default:
            return value
        if isinstance(value, (list, tuple)):
            raise UnsupportedModelError(f"{self.path}: {key} is a per-layer array ({value!r}); models whose "
                                        "layers differ in this size are not supported")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CheckpointError(f"{self.path}: GGUF metadata {key} must be an integer, got {value!r}")
        return int(value)

    def meta_float(self, key: str, default: Any = ...) -> Any:
        """A numeric metadata value as a float (``default`` when absent)."""
        value = self.meta(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise CheckpointError(f"{self.path}: GGUF metadata {key} must be a number, got {value!r}")
        return float(value)

    def meta(self, key: str, default: Any = ...) -> Any:
        if key not in self.fields:
            if default is ...:
                raise CheckpointError(f"{self.path}: required GGUF metadata {key!r} is missing")
            return default
        return self.fields[key]

    def hf_name(self, name: str) -> str:
        """GGUF tensor name -> HF name (unknown names are kept, so the strict check reports them)."""
        m = _BLOCK.match(name)
        if m:
            i, part, kind = m.groups()
            if part in self.spec.block_names:
                return f"model.layers.{i}.{self.spec.block_names[part]}.{kind}"
            return name
        base, _, kind = name.rpartition(".")
        return f"{_TOP_NAMES[base]}.{kind}" if base in _TOP_NAMES else name

    def tensor(self, hf_name: str) -> torch.Tensor:
        """One tensor, dequantized to float32 and converted to HF conventions."""
        t = self._tensors[hf_name]
        return self._decoded(t, t, self.shapes[hf_name])

    def _decoded(self, t: TensorInfo, part: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
        """The bytes ``part`` (all of tensor ``t``, or some of its rows) dequantized to float32 of
        ``shape`` and converted to HF conventions."""
        a = dequantize(self.container.data(part), t.type, shape)
        return torch.from_numpy(np.ascontiguousarray(self.spec.convert(self, t.name, a), dtype=np.float32))

    def read_into(self, hf_name: str, out: torch.Tensor) -> None:
        """Tensor ``hf_name`` dequantized into ``out`` (which casts and moves it): whole rows of at most
        :data:`~llmparts.loading.quant.DEQUANT_CHUNK` values at a time, so that the float32 temporaries
        stay small next to the weights (a 262k x 640 Q8_0 embedding is 671 MB in float32), except for
        tensors the family converts whole (:attr:`GGUFArch.whole`)."""
        t = self._tensors[hf_name]
        shape = self.shapes[hf_name]
        cols = shape[-1] if shape else 1
        rows = out.numel() // max(1, cols)
        step = max(1, DEQUANT_CHUNK // max(1, cols))
        if rows <= step or self.spec.whole(t.name) or t.nbytes % rows or not out.is_contiguous():
            out.copy_(self.tensor(hf_name).view(out.shape))
            return
        row_bytes = t.nbytes // rows
        flat = out.view(rows, cols)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            part = TensorInfo(t.name, t.shape, t.type, t.offset + r0 * row_bytes, n * row_bytes)
            flat[r0 : r0 + n].copy_(self._decoded(t, part, (n, cols)))

    def ordered(self, keys: set[str] | None) -> list[str]:
        """Keys in file order (sequential reads)."""
        return [k for k in self._tensors if keys is None or k in keys]

    def tensors(self, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.ordered(keys):
            yield name, self.tensor(name)


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF bytes of one tensor -> a new float32 array of ``shape`` (HF order, row-major)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf import dequantize as gguf_dequantize

    q = Q(qtype)
    if q == Q.F32:
        return np.frombuffer(raw, dtype=np.float32).reshape(shape).copy()
    if q == Q.F16:
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32).reshape(shape)
    if q == Q.BF16:
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, size = GGML_QUANT_SIZES[q]
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
    if q == Q.Q8_0:  # fast path: one float16 scale, then 32 int8 values per block
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= blocks[:, :2].copy().view(np.float16).astype(np.float32)
        return out.reshape(shape)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return gguf_dequantize(blocks.reshape(rows, -1), q).reshape(shape)
