"""The decoder-only language model: embedding, blocks, final norm, head.

``CausalLM(config)`` builds every layer from its resolved spec. The model holds no hidden state:
an optional :class:`~llmparts.kv_cache.KVCache` is passed to ``forward`` explicitly.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .allocator import long_lived
from .config import LayerSpec, ModelConfig, load_config
from .errors import ConfigError, ContextLengthError, InputError
from .kv_cache import KVCache, StepPlan, plan_without_cache
from .modules import build
from .modules.linear import MATVEC_MAX_ROWS, UPCAST_MIN_ROWS, Linear
from .modules.position import Tables


class Embedding(nn.Module):
    """Token embedding; Gemma multiplies by sqrt(d_model), rounded to the weight dtype first. The
    ``padding_idx`` row gets no gradient from the lookup (``nn.Embedding``'s ``padding_idx``)."""

    def __init__(self, vocab_size: int, d_model: int, scale: float | str, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.scale = d_model**0.5 if scale == "sqrt_d_model" else (None if scale == "none" else float(scale))
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight, self.padding_idx)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=self.weight.dtype, device=x.device)
        return x


class Block(nn.Module):
    """Attention then MLP, each in a residual branch with norms where ``norm_placement`` puts them.

    ``pre``: ``x + f(norm(x))``; ``post``: ``x + norm(f(x))`` (OLMo2); ``sandwich``:
    ``x + norm_out(f(norm_in(x)))`` (Gemma3). Norm names: ``attn_norm``/``mlp_norm`` on the branch
    input, ``attn_out_norm``/``mlp_out_norm`` on the branch output.
    """

    def __init__(self, spec: LayerSpec, d_model: int, index: int) -> None:
        super().__init__()
        self.spec, self.index = spec, index
        self.attn = build(spec.attention, d_model=d_model, norm=spec.norm)
        self.mlp = build(spec.mlp, d_model=d_model)
        placement = spec.block.norm_placement  # type: ignore[attr-defined]
        self.pre = placement in ("pre", "sandwich")
        self.post = placement in ("post", "sandwich")
        if self.pre:
            self.attn_norm = build(spec.norm, dim=d_model)
            self.mlp_norm = build(spec.norm, dim=d_model)
        if self.post:
            self.attn_out_norm = build(spec.norm, dim=d_model)
            self.mlp_out_norm = build(spec.norm, dim=d_model)

    def forward(self, x: torch.Tensor, position: nn.Module, tables: Tables, plan: StepPlan,
                kv: Any = None, start: int = 0) -> torch.Tensor:
        h = self.attn(self.attn_norm(x) if self.pre else x, position, tables, plan, kv, start)
        x = x + (self.attn_out_norm(h) if self.post else h)
        return _mlp_branch(self, x)

    def decode(self, x: torch.Tensor, position: nn.Module, tables: Tables, plan: StepPlan, kv: Any, start: int,
               parts: dict[str, Any]) -> torch.Tensor:
        """:meth:`forward` for one decode step, running the projections through compiled ``parts``.

        Attention modules with ``project``/``attend`` (GQA, MLA) have their projections compiled;
        others run eagerly. An MLP with ``compilable = False`` runs eagerly, with ``"decode"`` (MoE,
        whose prefill dispatch is data-dependent) only single-token steps are compiled.
        """
        mlp_compiles = getattr(self.mlp, "compilable", True)  # True, False, or "decode": single steps only
        if mlp_compiles == "decode":
            mlp_compiles = parts.get("single_step", False)
        if not mlp_compiles and not parts.get("single_step", False):  # an eager MLP in a prefill
            return self.forward(x, position, tables, plan, kv, start)
        if hasattr(self.attn, "project"):
            if kv is not None and x.shape[1] == 1 and "block_step" in parts and _steps_whole(self):
                return parts["block_step"](self, x, position, tables, *_step_inputs(kv, plan, start, {}))
            q, k, v = parts["attn_in"](self, x, position, tables)
            attn = self.attn.attend(q, k, v, plan, kv, start)
            if mlp_compiles:  # one graph for the rest of the block
                return parts["attn_out_mlp"](self, x, attn)
            x = parts["attn_out"](self, x, attn)
        else:
            h = self.attn(self.attn_norm(x) if self.pre else x, position, tables, plan, kv, start)
            x = x + (self.attn_out_norm(h) if self.post else h)
        return parts["mlp"](self, x) if mlp_compiles else _mlp_branch(self, x)


# ------------------------------------------------------------------ compiled decode-step parts
# Module-level functions of (block, tensors): torch.compile traces each once and reuses the graph for
# every block with the same structure (parameters are graph inputs), so a 28-layer model compiles
# a few small graphs, not one per layer. A decode step runs each block as one call (`_block_step`:
# the cache write and attention inside, the cache length a dynamic dimension); prefill compiles the
# pieces around an eager attention.
def _attn_in(block: "Block", x: torch.Tensor, position: nn.Module, tables: Tables) -> tuple[torch.Tensor, ...]:
    return block.attn.project(block.attn_norm(x) if block.pre else x, position, tables)


def _attn_out(block: "Block", x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    h = block.attn.o_proj(attn)
    return x + (block.attn_out_norm(h) if block.post else h)


def _mlp_branch(block: "Block", x: torch.Tensor) -> torch.Tensor:
    h = block.mlp(block.mlp_norm(x) if block.pre else x)
    return x + (block.mlp_out_norm(h) if block.post else h)


def _attn_out_mlp(block: "Block", x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return _mlp_branch(block, _attn_out(block, x, attn))


def _block_step(block: "Block", x: torch.Tensor, position: nn.Module, tables: Tables, k_buf: torch.Tensor,
                v_buf: torch.Tensor, write: torch.Tensor, seen: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A whole block for one decode token, the cache write and attention included: one compiled call
    per layer. The token's key and value go to slot ``write`` of the layer's cache buffers, and it
    attends over their first ``n`` slots (:meth:`~llmparts.kv_cache.LayerKV.step_buffers`)."""
    q, k, v = _attn_in(block, x, position, tables)
    k_buf.index_copy_(2, write, k)
    v_buf.index_copy_(2, write, v)
    n = seen.shape[1]  # <= the slots: the cache refuses a step past its capacity (KVCache.begin)
    if not _VIEW_SLOTS:
        torch._check(n <= k_buf.shape[2])  # so that the slices below are n long, not min(n, slots)
    if mask is not None:
        torch._check(mask.shape[-1] == n)
    if _VIEW_SLOTS:  # the first n slots, as views exactly n long (see _VIEW_SLOTS)
        k_seen = k_buf.as_strided((*k_buf.shape[:2], n, k_buf.shape[3]), k_buf.stride())
        v_seen = v_buf.as_strided((*v_buf.shape[:2], n, v_buf.shape[3]), v_buf.stride())
    else:
        k_seen, v_seen = k_buf[:, :, :n], v_buf[:, :, :n]
    attn = block.attn.attention(q, k_seen, v_seen, mask, False)
    return _attn_out_mlp(block, x, attn)


def _step_inputs(kv: Any, plan: StepPlan, start: int, seen_of: dict[Any, tuple[Any, Any]]) -> tuple[Any, ...]:
    """The cache inputs of :func:`_block_step` for one layer: its buffers, the slot to write,
    ``seen``, a (B, n) view whose length n is how many slots the token attends over, and the mask
    (None, or (B, 1, 1, n)). For a full buffer n grows every step: the buffers' slot dimension is
    marked dynamic and n *unbacked* (no specialisation and no range guard), so one graph serves
    every cache length and capacity. A ring is attended whole (n = its size, a constant of the
    model). ``seen_of`` shares one ``seen`` and mask view per window kind between the layers of a
    step that run the same block region (one symbolic length, not one per layer). Regions do not
    share them: with one length for NoPE and RoPE layers, inductor (torch 2.13) placed a check of
    that length against another region's cache size inside the NoPE region's code, where that size
    is undefined (``NameError: name 's80' is not defined``), and the whole-step compile failed."""
    k_buf, v_buf, write, n = kv.step_buffers(plan, start)
    if plan.window is None and not kv.marked_dynamic:  # (a mark stays on the tensor)
        for t in (k_buf, v_buf):
            torch._dynamo.maybe_mark_dynamic(t, 2)
        kv.marked_dynamic = True
    if plan.window not in seen_of:
        seen, mask = plan.k_pos[:, :n], None if plan.mask is None else plan.mask[..., :n]
        if plan.window is None:
            torch._dynamo.decorators.mark_unbacked(seen, 1)
            if mask is not None:
                torch._dynamo.decorators.mark_unbacked(mask, 3)
        seen_of[plan.window] = seen, mask
    return (k_buf, v_buf, write, *seen_of[plan.window])


# Outside torch.compile a no-op; inside, every layer's block step is one nested region, compiled once
# per distinct block structure and called for each layer (a torch without nested_compile_region
# keeps one call per block: tracing every layer into one graph takes close to a minute to compile).
_HAS_REGIONS = hasattr(torch.compiler, "nested_compile_region")
# How a compiled decode step reads the first n (unbacked) slots of a cache buffer. A slice is min(n, slots)
# long: with torch._check(n <= slots) it is n long, and torch 2.5 and 2.8 compile that; torch 2.11's
# inductor lost the length a slice binds (AssertionError: failed OrderedSet([]) >= OrderedSet([u7])) or
# placed that check where the slots' symbol is undefined (NameError: name 's80' is not defined). From 2.11
# an as_strided view exactly n long, which 2.5 and 2.8 reject (their contiguity test guards on n). 2.13
# compiles either; 2.9 and 2.10 were not tried (a failure there falls back: CausalLM.forward). The
# slicing stays inline in _block_step: moved into a helper function, 2.8 failed on it.
_VIEW_SLOTS = torch.torch_version.TorchVersion(torch.__version__) >= "2.11"
_block_regions: dict[Any, Any] = {}


def _block_region(spec: Any) -> Any:
    """The nested compile region for blocks of this :class:`~llmparts.config.LayerSpec`: blocks of
    one structure share a region; blocks of different ones (NoPE and RoPE layers, as in SmolLM3;
    GQA and MLA layers; dense and MoE MLPs) get regions of their own, and cache lengths of their own
    (:func:`_step_inputs`). Regions are made before tracing (:meth:`CausalLM.compile_decode`): dynamo
    cannot trace ``nested_compile_region`` itself, and a region made inside the traced step made
    dynamo skip the whole step, which then ran eagerly, one compiled call and guard check per block."""
    if spec not in _block_regions:  # dynamo tells regions apart by code objects that compare unequal
        fn = _own_copy(_block_step, name=f"_block_step_{len(_block_regions)}")
        _block_regions[spec] = torch.compiler.nested_compile_region(fn)
    return _block_regions[spec]


def _model_step(model: "CausalLM", x: torch.Tensor, tables: dict[str, Tables],
                layer_inputs: list[tuple[Any, ...]]) -> torch.Tensor:
    """A whole one-token decode step, every block and the head, as one compiled graph: one call and
    one guard check per token instead of one per layer (each block in its :func:`_block_region`)."""
    for i, block in enumerate(model.layers):
        key = model._position_key[i]
        x = model._step_regions[i](block, x, model.positions[key], tables[key], *layer_inputs[i])
    return _head(model, x)


def _steps_whole(block: "Block") -> bool:
    """Whether a decode step runs this block as one :func:`_block_step`: attention with
    ``project``/``attention`` (GQA; MLA, whose cache "key" is its latent) and an MLP compilable in
    decode steps."""
    return hasattr(block.attn, "project") and getattr(block.mlp, "compilable", True) in (True, "decode")


def _own_copy(fn: Any, name: str | None = None) -> Any:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and its limit of 8 variants
    (``recompile_limit``) after which it silently runs a function eagerly, per code object: without a
    copy per :meth:`CausalLM.compile_decode` call, every model in a process would share one cache, and
    after a few models of other shapes their decode steps would no longer be compiled. The copy
    compares equal to the original unless ``name`` renames it."""
    code = fn.__code__.replace() if name is None else fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name or fn.__name__, fn.__defaults__, fn.__closure__)


def _head(model: "CausalLM", x: torch.Tensor) -> torch.Tensor:
    return model.head(model.final_norm(x)).float()


# Inductor's generated code re-checks the size and stride of every input of every call (``size_asserts``)
# after dynamo's guards have checked them: for Qwen3-0.6B's decode step (376 inputs, 28 nested blocks)
# that was about 1 ms a token (measured with 28 layers of tiny width: 3.2-4.3 -> 2.0-3.0 ms a step).
_COMPILE_OPTIONS = {"size_asserts": False}

_DECODE_PARTS = {"attn_in": _attn_in, "attn_out": _attn_out, "mlp": _mlp_branch, "attn_out_mlp": _attn_out_mlp,
                 "head": _head}


class CausalLM(nn.Module):
    """A decoder-only transformer language model built from a :class:`ModelConfig`.

    ``model(ids)`` -> float32 logits (B, T, vocab_size). With ``labels`` it returns the mean
    next-token cross-entropy (labels shifted by one inside; -100 is ignored). With a cache from
    :meth:`make_cache` it decodes incrementally: ``model(ids, cache=cache)`` continues where the
    cache stopped; ``pos`` (int start or (B, T) positions, -1 for padding) overrides that.
    ``last_only=True`` returns only the last position's logits (B, 1, V), as generation needs.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.d_model, config.embedding.scale,  # type: ignore[attr-defined]
                               config.embedding.padding_idx)  # type: ignore[attr-defined]
        self.layers = nn.ModuleList(Block(spec, config.d_model, i) for i, spec in enumerate(config.layers))
        self.final_norm = build(config.final_norm, dim=config.d_model)
        self.head = Linear(config.d_model, config.vocab_size, bias=False)
        # One position module per distinct spec: layers sharing it share the cos/sin tables.
        self.positions = nn.ModuleDict()
        self._position_key: list[str] = []
        keys: dict[Any, str] = {}
        for spec in config.layers:
            if spec.position not in keys:
                keys[spec.position] = str(len(keys))
                self.positions[keys[spec.position]] = build(spec.position)
            self._position_key.append(keys[spec.position])
        self.tie_weights()
        self._decode_parts: dict[str, Any] | None = None  # set by compile_decode()
        self._prefill_parts: dict[str, Any] | None = None
        # Modules told before and after each use of the compiled parts (``compiled_step(active)``).
        self._step_modules: list[nn.Module] = []
        self._step_regions: list[Any] = []  # compile_decode: each layer's block region
        self._in_trial = False  # compile_decode: its trial of the compiled parts is running
        # generation_config.json of a loaded checkpoint (eos ids, sampling defaults), for generate()
        # without a tokenizer; {} for a built model
        self.generation_config: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ parameters
    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init: N(0, init_std) for embeddings, projections and stacked experts; zero biases
        (and sinks, router correction biases) and the embedding's padding row; norms to identity."""
        std = self.config.init_std
        done: set[int] = set()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()
            else:
                continue
            done.update(id(p) for p in module.parameters(recurse=False))
        for p in self.parameters():  # the rest: stacked expert weights (E, out, in), biases, sinks
            if id(p) not in done:
                p.normal_(0.0, std, generator=generator) if p.dim() >= 2 else p.zero_()
        if self.embed.padding_idx is not None:  # as nn.Embedding / transformers: the pad row starts at zero
            self.embed.weight[self.embed.padding_idx].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) parameters counted once

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all of them minus the experts a mixture-of-experts router skips."""
        return self.num_parameters() - sum(getattr(b.mlp, "inactive_parameters", lambda: 0)() for b in self.layers)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---------------------------------------------------------------------------------- caches
    def make_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """A preallocated KV cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens
        (default: the model's context)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"make_cache: batch_size must be an int >= 1, got {batch_size!r}")
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len < 1):
            raise InputError(f"make_cache: max_seq_len must be an int >= 1 or None (the model's context), "
                             f"got {max_seq_len!r}")
        dtype = resolve_dtype(dtype, "make_cache: dtype")
        device = resolve_device(device)
        if device is not None and device.type == "meta" and self.device.type != "meta":
            raise InputError("make_cache: a cache on the meta device holds no data; leave device unset (the model's)")
        if dtype is not None and dtype != self.dtype:
            raise InputError(f"make_cache: dtype {dtype} differs from the model's {self.dtype}; attention "
                             "reads the cache with the model's dtype (leave dtype unset)")
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ContextLengthError(
                f"max_seq_len {max_seq_len} exceeds the model's context ({self.config.max_seq_len})"
            )
        return KVCache(
            [b.attn.spec.window for b in self.layers],
            [b.attn.cache_dims() for b in self.layers],
            batch_size, max_seq_len, dtype or self.dtype, device or self.device,
        )

    def cache_values_per_token(self) -> int:
        """Values the KV cache stores per token over all layers (MLA: its latent; window layers
        stop growing at ``window`` tokens)."""
        return sum(n * (k + v) for n, k, v in (b.attn.cache_dims() for b in self.layers))

    # ---------------------------------------------------------------------------- compilation
    def compile_decode(self, check: bool = True) -> bool:
        """Compile the generation step with ``torch.compile`` (inductor): a single-token decode
        step becomes one call for the whole model (:func:`_model_step`: every block's projections,
        cache write, attention and MLP, then the head; each block a nested compile region, compiled
        once and reused by every layer; MLA blocks attend in latent space, absorbed). For prefill
        (dynamic length), the pieces around an eager attention are compiled, and the head.

        Decode multiplies every weight by one vector: compiled, those products become streaming
        reductions near the memory bandwidth (:mod:`llmparts.modules.linear`); in prefill the matmuls
        stay BLAS calls and the elementwise ops between them (norms, RoPE, activations, residuals)
        fuse. Only inference (no gradients) uses the compiled parts; training runs eagerly. Trial
        steps run at once (compiling takes seconds to a minute); if compilation fails here (no C++
        compiler, unsupported platform) or, with ``check``, its logits differ from the eager ones, a
        warning is given and the model stays eager. Returns whether the compiled parts are in use.
        The parts are compiled for ``torch.no_grad()`` (as :func:`~llmparts.generate` runs);
        ``torch.inference_mode()`` tensors, a new batch size or a first padded batch each trigger one
        more compilation on first use (dynamo keeps up to 8 variants of each part, per model: every
        call compiles its own copies; beyond that the whole-model step runs one compiled block at a
        time, with a warning, and the other parts eagerly). Modules with a
        ``compiled_step(active)`` method (MoE experts, to hand their joint gate/up tensor to the
        step) are called with True before and False after every use of the compiled parts.
        """
        self._decode_parts = self._prefill_parts = None
        self._step_modules = [m for m in self.modules() if hasattr(m, "compiled_step")]
        def compiled(fn: Any, dynamic: bool | None, fullgraph: bool = False) -> Any:
            return torch.compile(_own_copy(fn), dynamic=dynamic, fullgraph=fullgraph, options=_COMPILE_OPTIONS)

        decode: dict[str, Any] = {name: compiled(fn, False) for name, fn in _DECODE_PARTS.items()}
        prefill: dict[str, Any] = {name: compiled(fn, True) for name, fn in _DECODE_PARTS.items()}
        decode["block_step"] = compiled(_block_step, None)  # dynamic where marked: the cache length
        decode["single_step"], prefill["single_step"] = True, False
        decode["over_limit"] = set()  # step variants past dynamo's recompile limit (_blocks)
        if _HAS_REGIONS and all(_steps_whole(b) for b in self.layers):
            self._step_regions = [_block_region(spec) for spec in self.config.layers]
            # Every block + head: one call. fullgraph: a graph break in the step is an error, and
            # _blocks falls back to a compiled call per block with a warning; without it dynamo ran
            # the step's loop eagerly, a compiled call and a guard check per block, silently.
            decode["model_step"] = compiled(_model_step, False, fullgraph=True)
        if any(getattr(b.mlp, "compilable", True) is not True for b in self.layers):
            prefill = None  # MoE: prefill dispatch is data-dependent; compiled pieces around it measured slower

        def trial() -> list[torch.Tensor]:  # a prefill of more than MATVEC_MAX_ROWS and UPCAST_MIN_ROWS
            n = max(MATVEC_MAX_ROWS, UPCAST_MIN_ROWS) + 2  # rows (as most prompts), then two decode steps
            ids = torch.arange(n + 2, device=self.device)[None] % self.config.vocab_size
            cache = self.make_cache(1, n + 2)
            return [self(ids[:, :n], cache=cache, last_only=True), self(ids[:, n : n + 1], cache=cache),
                    self(ids[:, n + 1 :], cache=cache)]  # last_only: as generation calls the prefill

        try:
            with torch.no_grad():
                eager = trial()
                self._decode_parts, self._prefill_parts = decode, prefill
                self._in_trial = True  # (a failing part raises here: forward does not fall back)
                try:
                    compiled = trial()
                finally:
                    self._in_trial = False
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            self._decode_parts = self._prefill_parts = None
            warnings.warn(f"compile_decode: torch.compile failed here, decoding stays eager ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})", stacklevel=2)
            return False
        # Relative error of the logits. Garbage from a broken compiler is uncorrelated (error ~1.4);
        # in bfloat16 the compiled step's different rounding can legitimately flip an MoE router's
        # choice for a token (error up to ~0.5 on random weights), so half precision gets a wide bound.
        for a, b in zip(eager, compiled):
            tol = 1e-3 if self.dtype == torch.float32 else 0.7
            if check and not ((a - b).norm() / a.norm().clamp_min(1e-6)).item() <= tol:
                self._decode_parts = self._prefill_parts = None
                warnings.warn("compile_decode: compiled logits differ from eager ones; decoding stays eager",
                              stacklevel=2)
                return False
        return True

    # --------------------------------------------------------------------------------- forward
    def _positions(self, input_ids: torch.Tensor, cache: KVCache | None, pos: Any,
                   attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        """(B, T) absolute positions (-1 for padding) and whether they continue contiguously."""
        B, T = input_ids.shape
        dev = input_ids.device
        if attention_mask is not None:
            if pos is not None:
                raise InputError("pass either pos or attention_mask, not both")
            if attention_mask.shape != input_ids.shape:
                raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
            m = attention_mask_values(attention_mask).to(dev)
            q = m.cumsum(-1) - 1
            if cache is not None and cache.length:
                raise InputError("attention_mask with a non-empty cache: pass explicit pos instead")
            return q.masked_fill(m == 0, -1), bool((m == 1).all())
        if pos is None:
            start = 0 if cache is None else (cache.next_pos if cache.next_pos >= 0 else cache.length)
            if cache is not None and cache.next_pos < 0:
                raise InputError("the cache holds padded or non-contiguous positions: pass pos explicitly")
            pos = start
        if isinstance(pos, bool) or not isinstance(pos, (int, torch.Tensor, list, tuple)):
            raise InputError(f"pos must be an int (the first token's position) or (B, T) / (T,) integer "
                             f"positions, got {type(pos).__name__}")
        if isinstance(pos, int):
            if pos < 0:
                raise InputError(f"pos must be >= 0, got {pos}")
            return torch.arange(pos, pos + T, device=dev).expand(B, T), True
        pos = torch.as_tensor(pos, device=dev)
        if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
            raise InputError(f"pos must hold integer positions, got dtype {pos.dtype}")
        pos = pos.to(torch.long)
        if pos.dim() == 1:
            pos = pos.expand(B, T)
        if pos.shape != (B, T):
            raise InputError(f"pos shape {tuple(pos.shape)} does not match input_ids {(B, T)}")
        return pos, False

    def _check_cache(self, cache: Any) -> None:
        """An InputError unless ``cache`` is a KVCache laid out for this model's layers, dtype and device
        (checked once per model and cache)."""
        if not isinstance(cache, KVCache):
            raise InputError(f"cache must be a KVCache (model.make_cache(batch_size)), got {type(cache).__name__}")
        if cache.fits is not None and cache.fits() is self:
            return
        want = [(b.attn.spec.window, tuple(b.attn.cache_dims())) for b in self.layers]
        have = [(kv.window, (kv.k.shape[1], kv.k.shape[3], kv.v.shape[3])) for kv in cache.layers]
        if have != want:
            raise InputError(f"this cache was made for another model ({len(have)} layers, windows and "
                             f"(kv heads, key dim, value dim) {have[0]}... against {len(want)} layers, {want[0]}...); "
                             "make one with this model's make_cache")
        k = cache.layers[0].k
        if (k.dtype, k.device) != (self.dtype, self.device):
            raise InputError(f"the cache holds {k.dtype} on {k.device}, the model {self.dtype} on {self.device}; "
                             "make one with this model's make_cache")
        cache.fits = weakref.ref(self)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, pos: Any = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"input_ids must be a (B, T) tensor of token ids, got {type(input_ids).__name__}")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise InputError(f"attention_mask must be a (B, T) tensor, got {type(attention_mask).__name__}")
        if cache is not None:
            self._check_cache(cache)
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, "input_ids")
        B, T = input_ids.shape
        if B == 0:
            raise InputError("input_ids has no sequences (batch size 0)")
        if labels is not None:  # (before the cache records anything)
            if tuple(labels.shape) != (B, T):
                raise InputError(f"labels shape {tuple(labels.shape)} != input_ids {(B, T)}")
            check_token_ids(labels, "labels (or -100 to ignore)")
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))]
            if bad.numel():
                raise InputError(f"label {bad[0].item()} is outside the vocabulary [0, {self.config.vocab_size}) "
                                 "(use -100 for positions to ignore)")
        q_pos, contiguous = self._positions(input_ids, cache, pos, attention_mask)
        if T == 0:
            raise InputError("input_ids is empty (T == 0)")
        top = int(q_pos.max()) if not contiguous else int(q_pos[0, -1])
        if top >= self.config.max_seq_len:
            raise ContextLengthError(
                f"position {top} is beyond the model's context (max_seq_len {self.config.max_seq_len})"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size})")
        if last_only and labels is not None:  # (before the cache records anything)
            raise InputError("last_only=True computes no logits for the labels; drop one of them")
        x = self.embed(input_ids)
        safe_pos = q_pos.clamp(min=0)
        tables = {key: mod.tables(safe_pos, x.dtype) for key, mod in self.positions.items()}
        windows = {b.attn.spec.window for b in self.layers}
        if cache is not None:
            plans = cache.begin(q_pos, contiguous)
            start = cache.length
        else:
            plans = {w: plan_without_cache(q_pos, w, contiguous) for w in windows}
            start = 0
        parts = None  # compiled parts (compile_decode) serve inference only
        if self._decode_parts is not None and not torch.is_grad_enabled():
            if T == 1 and B <= MATVEC_MAX_ROWS:
                parts = self._decode_parts
            elif B * T > MATVEC_MAX_ROWS:  # (a few rows in between run eagerly: no third specialisation)
                parts = self._prefill_parts  # None for MoE models: eager prefill
        for m in self._step_modules if parts is not None else ():
            m.compiled_step(True)
        failed = None
        try:
            logits = self._blocks(x, tables, plans, cache, start, parts, last_only)
        except Exception as e:  # noqa: BLE001 - a compiled part failed to compile a new variant
            if parts is None or self._in_trial:
                raise
            failed = e
        finally:
            for m in self._step_modules if parts is not None else ():
                m.compiled_step(False)
        if failed is not None:
            # Some torch versions fail on a variant the trial in compile_decode did not meet (a padded
            # batch, a new batch size): decode eagerly from now on. Running every block again rewrites
            # the cache slots the compiled ones wrote, except where a sliding-window ring was read
            # before this forward's writes (a prefill of several tokens): that cache stays unusable.
            self._decode_parts = self._prefill_parts = None
            warnings.warn(f"compile_decode: a compiled part failed for this input; the model runs eagerly from now "
                          f"on ({type(failed).__name__}: {str(failed).splitlines()[0] if str(failed) else ''})",
                          stacklevel=2)
            if cache is not None and T > 1 and any(kv.window is not None for kv in cache.layers):
                raise failed
            logits = self._blocks(x, tables, plans, cache, start, None, last_only)
        if cache is not None:
            cache.commit(q_pos)
        if self.config.logit_softcap is not None:
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).long(),
                               ignore_index=-100)
        if self.training:  # (padding, position -1, is left out of the load-balancing loss)
            loss = loss + self.aux_loss(None if contiguous else q_pos >= 0)
        return loss

    def _blocks(self, x: torch.Tensor, tables: dict[str, Tables], plans: dict[Any, StepPlan], cache: KVCache | None,
                start: int, parts: dict[str, Any] | None, last_only: bool) -> torch.Tensor:
        """The blocks and the head: eagerly, or through the compiled parts (one call for a decode step)."""
        logits = None
        whole = parts is not None and "model_step" in parts and cache is not None and x.shape[1] == 1
        if whole:  # (what dynamo specialises the step on, besides the model's own shapes)
            variant = (x.shape[0], tuple(p.mask is None for p in plans.values()), torch.is_inference_mode_enabled())
            whole = variant not in parts["over_limit"]
        if whole:
            import torch._dynamo.exc as dynamo_exc

            seen_of: dict[int, dict[Any, tuple[Any, Any]]] = {}  # per block region (id: hashing specs is slow)
            inputs = [_step_inputs(kv, plans[b.attn.spec.window], start, seen_of.setdefault(id(region), {}))
                      for region, b, kv in zip(self._step_regions, self.layers, cache.layers)]
            try:
                logits = parts["model_step"](self, x, tables, inputs)
            except getattr(dynamo_exc, "FailOnRecompileLimitHit", ()):  # (fullgraph: raised, not eager)
                parts["over_limit"].add(variant)  # (not tried again: each try recompiles, and fails)
                warnings.warn("compile_decode: dynamo's limit of compiled variants of the decode step (batch sizes, "
                              "padding) is reached; new variants run one block at a time", stacklevel=3)
            except Exception as e:  # noqa: BLE001 - compiling a new variant failed
                del parts["model_step"]  # (the per-block step below rewrites any cache slot it wrote)
                warnings.warn(f"compile_decode: compiling the whole decode step failed for this input; decoding "
                              f"continues one block at a time ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                              stacklevel=3)
        if logits is None:
            for i, block in enumerate(self.layers):
                key = self._position_key[i]
                kv = cache.layers[i] if cache is not None else None
                plan = plans[block.attn.spec.window]
                if parts is None:
                    x = block(x, self.positions[key], tables[key], plan, kv, start)
                else:
                    x = block.decode(x, self.positions[key], tables[key], plan, kv, start, parts)
            if last_only:  # generation needs only the next token's logits: skip the head on the rest
                x = x[:, -1:]
            logits = (parts["head"] if parts is not None else _head)(self, x)
        return logits

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor | float:
        """The mixture-of-experts load-balancing loss of the last training forward, weighted by
        ``aux_loss_coef``: as transformers computes it, over the router logits of all MoE layers at
        once (token fractions and mean probabilities averaged over every layer's rows, then
        multiplied), not a sum of per-layer losses, and over the tokens ``attention_mask`` (that
        forward's (B, T) mask; ``forward`` passes it) marks real. 0 without MoE layers or in eval mode."""
        from .modules.moe import load_balancing_loss

        valid = None if attention_mask is None else attention_mask.reshape(-1) != 0
        groups: dict[tuple[float, int], list[torch.Tensor]] = {}
        for b in self.layers:
            logits = getattr(b.mlp, "router_logits", None)
            if logits is not None:
                if valid is not None and valid.shape[0] != logits.shape[0]:
                    raise InputError(f"attention_mask has {valid.shape[0]} tokens; the last forward routed "
                                     f"{logits.shape[0]}")
                groups.setdefault((b.mlp.spec.aux_loss_coef, b.mlp.spec.top_k), []).append(logits)
        return sum((coef * load_balancing_loss(lg, k, valid) for (coef, k), lg in groups.items()), 0.0)


def allocate_empty(model: nn.Module, device: torch.device | str | None) -> None:
    """Give every parameter and buffer of a meta-built model uninitialised memory on ``device``
    (default CPU): ``nn.Module.to_empty``, without its ``empty_like`` on meta tensors, whose first
    use in a process imports torch's Python meta kernels (half a second of every load). On the CPU it
    also makes the C heap keep freed activation memory for reuse, the weights themselves being mapped
    on their own (:mod:`llmparts.allocator`). A tensor held by several modules (tied embeddings) gets
    one allocation: a GPU allocates eagerly, and a second one was 26% of Qwen3-0.6B's weights at the
    load's peak. Other allocations are not held here: a module that replaces its new tensors while
    converting (MoE experts join gate and up into one) frees them at once."""
    dev = torch.device(device or "cpu")
    held = Counter(id(t) for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())
                   if t is not None)
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (the shared meta tensor, its allocation)

    def empty(t: torch.Tensor) -> torch.Tensor:
        if held[id(t)] < 2:
            return torch.empty(t.shape, dtype=t.dtype, device=dev)
        if id(t) not in made:
            made[id(t)] = t, torch.empty(t.shape, dtype=t.dtype, device=dev)
        return made[id(t)][1]

    with long_lived(dev):
        model._apply(empty)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: torch.dtype | str | None, what: str = "dtype") -> torch.dtype | None:
    """A floating-point ``torch.dtype`` from a dtype or its name ("bfloat16", "torch.float32"); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPES:
            raise ConfigError(f"{what} {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{what} must be a floating-point torch dtype or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def resolve_device(device: torch.device | str | None, weights: bool = False) -> torch.device | None:
    """``torch.device(device)``, or a ConfigError naming the value when it is not one this torch can use
    (with ``weights``, for loading them: not ``meta``, which holds no data)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device ({e}); use e.g. 'cpu' or 'cuda:0'") from None
    if weights and dev.type == "meta":
        raise ConfigError(f"device {device!r} holds no data, so weights cannot be loaded onto it; for a model "
                          "without weights use build_model(config, device='meta') (or llmparts.config_of)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r}: this torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                          "CUDA device(s) (torch.cuda.is_available() is "
                          f"{torch.cuda.is_available()}); use 'cpu' or another device")
    if dev.type not in ("cpu", "cuda", "meta"):  # mps, xpu, ...: whether this build and machine have it
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            raise ConfigError(f"device {device!r} is not available in this torch build or on this machine "
                              f"({str(e).splitlines()[0].split('. ')[0]}); use 'cpu'") from None
    return dev


def check_token_ids(t: torch.Tensor, what: str) -> None:
    """An InputError unless ``t`` holds integer token ids (not floats, complex numbers or bools)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InputError(f"{what} must hold integer token ids, got dtype {t.dtype}")


def attention_mask_values(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as int64 after checking it holds only 0 (padding) and 1 (token), as ints or bools."""
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise InputError(f"attention_mask must hold integers or bools (1 = token, 0 = padding), got dtype {mask.dtype}")
    m = mask.long()
    bad = m[(m != 0) & (m != 1)]
    if bad.numel():
        raise InputError(f"attention_mask values must be 0 (padding) or 1 (token), got {bad[0].item()}")
    return m


def check_seed(seed: Any) -> None:
    """A seed for ``torch.Generator.manual_seed``: an int in [0, 2**64)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise InputError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")


def build_model(config: str | ModelConfig | dict[str, Any], overrides: list[str] | None = None,
                dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                seed: int | None = 0) -> CausalLM:
    """Build a randomly initialised model from a shipped config name, a YAML path, a dict or a config.

    ``overrides`` are CLI-style (``"attention.n_kv_heads=1"``, ``"layers[3::4].position.type=none"``).
    ``device="meta"`` builds without allocating memory (for counting parameters or loading).
    """
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    check_seed(seed)
    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if dtype is not None:
        model.to(dtype)
    if device is not None and torch.device(device).type == "meta":
        return model
    allocate_empty(model, device)
    model.tie_weights()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(seed)
    model.init_weights(gen)
    return model
