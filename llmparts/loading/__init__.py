"""``load_pretrained``: a Hugging Face checkpoint directory -> a :class:`~llmparts.model.CausalLM`.

Steps, each failing before any weights are read if something is wrong:

0. the source (Hub repo id, directory or ``.gguf`` file) is resolved to a local path;
1. ``config.json`` (or GGUF metadata) -> the family adapter for its ``model_type`` -> a validated :class:`ModelConfig`;
2. the safetensors headers (single file or sharded; MXFP4 / block-FP8 tensors presented dequantized,
   per ``quantization_config``) -> the family's weight map -> an assignment
   checked against the model's parameters (built on the meta device): every tensor consumed or
   ignored with a reason, every parameter filled, every shape equal;
3. parameters allocated once on the target device and filled tensor by tensor, each cast to the
   requested dtype on the way (no second copy of the weights).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, ModelNotFoundError
from ..model import CausalLM, allocate_empty, resolve_device, resolve_dtype
from .checkpoint import PickleCheckpoint, SafetensorsCheckpoint
from .hub import resolve_source
from .quant import QuantizedCheckpoint, parse_quant_config, stored_dtype, wrap_quantized
from .families import Family, HFConfig, family_for
from .weight_map import Target, plan_assignment


def read_hf_config(directory: Path, strict: bool = True) -> tuple[ModelConfig, dict[str, Any], Family]:
    """Parse ``directory/config.json`` (or ``directory`` itself, a JSON file) into a ModelConfig
    through its family adapter."""
    path = directory if directory.is_file() else directory / "config.json"
    directory = path.parent
    if not path.is_file():
        raise ModelNotFoundError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    data = _json_object(path)
    for key in ("dtype", "torch_dtype"):  # (informational: the weights' own dtype is the default)
        v = data.get(key)
        if v not in (None, "auto") and not (
                isinstance(v, str) and isinstance(getattr(torch, v.removeprefix("torch."), None), torch.dtype)):
            raise ConfigError(f"{path}: {key} must name a torch dtype (e.g. \"bfloat16\"), \"auto\" or be null, got {v!r}")
    hf = HFConfig(data, str(path))
    quant = parse_quant_config(hf.get("quantization_config"), str(path))
    family = family_for(hf.get("model_type"), str(path))
    raw = family.config_from_hf(hf)
    raw.setdefault("weights", {})["quantization"] = quant
    hf.finish(strict)
    raw.setdefault("name", directory.name)
    try:
        cfg = ModelConfig.from_dict(_model_fields(raw))
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
    return cfg, raw, family


def _model_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """An adapter's output minus ``weights``: facts about the checkpoint (e.g. which layers hold a
    training-only module) that its weight map needs but the model config does not describe."""
    return {k: v for k, v in raw.items() if k != "weights"}


def load_pretrained(source: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, strict_config: bool = True,
                    allow_pickle: bool = False, revision: str | None = None) -> CausalLM:
    """Load pretrained weights from a Hub repo id, a local HF directory or a ``.gguf`` file.

    Args:
        source: ``"Qwen/Qwen3-0.6B"`` (downloaded or taken from the HF cache; ``HF_TOKEN``,
            ``HF_HUB_OFFLINE``, ``HF_HOME`` honoured), a directory with config.json + safetensors,
            or a GGUF file.
        dtype: parameter dtype; default: the dtype the checkpoint stores its weights in (float32
            for GGUF, whose quantized weights are dequantized).
        device: where parameters live (``"cpu"``, ``"cuda"``, ...); default CPU.
        strict_config: fail on config.json fields llmparts does not know (default), or only warn.
        allow_pickle: read ``pytorch_model.bin`` checkpoints (with ``weights_only=True``) when no
            safetensors exist. Off by default: pickles can execute code.
        revision: Hub revision (branch, tag or commit) for repo ids.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device, weights=True)  # (before any download)
    path = resolve_source(source, revision)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{source}: a file must be a .gguf model; otherwise pass a model directory"
                                     + (f" ({path.parent})" if path.name == "config.json" else ""))
        return load_gguf(path, dtype, device)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype, device)
    cfg, raw, family = read_hf_config(path, strict_config)
    generation = _generation_config(path)  # (checked before any weight is read)
    try:
        ckpt: Any = SafetensorsCheckpoint(path)
    except CheckpointError:
        if not allow_pickle or not any(path.glob("*.bin")):
            raise
        ckpt = PickleCheckpoint(path)
    ckpt = wrap_quantized(ckpt, raw["weights"]["quantization"], str(path), dtype)
    dtype = dtype or ckpt.dominant_dtype() or torch.float32
    if isinstance(ckpt, QuantizedCheckpoint):
        ckpt.dtype = dtype  # dequantize straight to the target dtype
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to(dtype)
    model = fill_model(model, ckpt, family.weight_rules(raw), device, source=str(path))
    model.hf_model_type = family.model_types[0]
    model.generation_config = generation
    return model


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # a config's ids a generation config takes


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # (RecursionError: nested deeper than the parser goes)
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def checked_token_ids(gen: Any, source: Path) -> dict[str, Any]:
    """``gen`` (a generation config read from ``source``) after checking its token ids."""
    if not isinstance(gen, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    for key in TOKEN_ID_KEYS:
        ids = gen.get(key)
        # (only the type: old configs carry -1 for "none"; generate() checks the ids against the vocabulary)
        if not all(isinstance(i, int) and not isinstance(i, bool)
                   for i in (ids if isinstance(ids, list) else [] if ids is None else [ids])):
            raise ConfigError(f"{source}: {key} must be a token id (an integer), a list of them or null, got {ids!r}")
    return gen


def _generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json, or else the token ids config.json names (as transformers derives a
    generation config from the model config)."""
    if (directory / "generation_config.json").is_file():
        return checked_token_ids(_json_object(directory / "generation_config.json"), directory / "generation_config.json")
    data = _json_object(directory / "config.json")
    return checked_token_ids({k: data[k] for k in TOKEN_ID_KEYS if data.get(k) is not None}, directory / "config.json")


def config_of(source: str | Path) -> ModelConfig:
    """The ModelConfig of a Hub repo id, HF directory, config.json or GGUF file, without reading any weights."""
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".json":  # a config.json on its own
        return read_hf_config(path)[0]
    if path.is_file():
        from .gguf import GGUFFile

        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{source}: a file must be a .gguf model or a config.json; otherwise pass "
                                     "a model directory")

        return _gguf_config(GGUFFile(path))[0]
    return read_hf_config(path)[0]


def _gguf_config(f: Any) -> tuple[ModelConfig, dict[str, Any], Family]:
    hf = HFConfig(dict(f.config), f"{f.path} (GGUF metadata)")
    family = family_for(hf.get("model_type"), hf.source)
    raw = family.config_from_hf(hf)
    hf.finish(strict=True)
    raw.setdefault("name", Path(f.path).stem)
    try:
        return ModelConfig.from_dict(_model_fields(raw)), raw, family
    except ConfigError as e:
        raise type(e)(f"{hf.source}: {e}") from None


def load_gguf(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> CausalLM:
    """Load a GGUF file: metadata -> HF-style config -> family adapter; tensors dequantized per tensor."""
    from .gguf import GGUFFile

    dtype, device = resolve_dtype(dtype), resolve_device(device, weights=True)
    f = GGUFFile(path)
    cfg, raw, family = _gguf_config(f)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to(dtype or torch.float32)
    model = fill_model(model, f, family.weight_rules(raw), device, source=str(path))
    model.hf_model_type = family.model_types[0]
    model.generation_config = {k: f.config[k] for k in TOKEN_ID_KEYS if k in f.config}
    return model


def fill_model(model: CausalLM, ckpt: Any, rules: list[Any], device: torch.device | str | None,
               source: str) -> CausalLM:
    """Check the assignment, then allocate the meta-built ``model`` on ``device`` and stream tensors in.

    ``ckpt`` has ``shapes`` (key -> shape), ``tensors(keys)`` yielding ``(key, tensor)``, and
    optionally ``read_into(key, param)``, which reads straight into the parameter's memory.
    """
    shapes = ckpt.shapes
    params = dict(model.named_parameters())
    aliases = {  # tied parameters: a second name for a parameter already loaded under its first name
        name: next(n for n, q in params.items() if q is p)
        for name, p in model.named_parameters(remove_duplicate=False)
        if name not in params
    }
    shapes_all = {n: tuple(p.shape) for n, p in params.items()}
    shapes_all.update({a: shapes_all[c] for a, c in aliases.items()})
    hints = {}
    if "head.weight" in params:
        hints["head.weight"] = (
            "(the config says the head is untied: tie_word_embeddings=false, but the checkpoint has no "
            "lm_head weight; if it is tied, set tie_word_embeddings to true)"
        )
    try:
        plan = plan_assignment(rules, shapes, shapes_all, hints=hints, optional=set(aliases))
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    for key, targets in plan.targets.items():  # (before any memory is allocated)
        d = stored_dtype(ckpt, key)
        if d is not None and not d.is_floating_point:
            raise CheckpointError(f"{source}: tensor {key!r} is stored as {d}, but {targets[0].param} is a "
                                  "floating-point parameter; integer or bool data is not a weight (a quantized "
                                  "checkpoint needs its quantization_config in config.json)")
    # aliases are optional in the checkpoint: they are cross-checked when present
    alias_keys = {k: ts[0].param for k, ts in plan.targets.items() if ts[0].param in aliases}
    allocate_empty(model, device)
    model.tie_weights()
    params = dict(model.named_parameters())  # new parameter objects

    def dest(t: Target) -> torch.Tensor:
        p = params[t.param]
        return p if t.index is None else p[t.index]

    with torch.no_grad():
        own = [k for k in plan.targets if k not in alias_keys]
        direct = getattr(ckpt, "read_into", None)
        plain = {k for k in own if direct is not None and len(plan.targets[k]) == 1 and not plan.targets[k][0].ops}
        if plain:  # into the parameters' memory, in file order
            def read(key: str) -> None:
                with torch.no_grad():  # (grad mode is per thread)
                    direct(key, dest(plan.targets[key][0]))

            # Reads that need no temporary (same dtype, CPU) run on a few threads: file reads release
            # the GIL, so the copies and the page faults of fresh memory proceed in parallel (Qwen3-0.6B
            # float32, 2.4 GB: 1.6 -> 0.7 s on 2 cores). Casting or dequantizing reads stay one at a time,
            # so that at most one temporary exists.
            in_place = getattr(ckpt, "in_place", lambda key, out: False)
            keys = ckpt.ordered(plain)
            fast = {k for k in keys if in_place(k, dest(plan.targets[k][0]))}
            with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
                for _ in pool.map(read, [k for k in keys if k in fast]):
                    pass  # (re-raises the first error)
            for key in keys:
                if key not in fast:
                    read(key)
        rest = set(own) - plain
        if rest:
            for key, tensor in ckpt.tensors(rest):
                for t in plan.targets[key]:
                    dest(t).copy_(t.apply(tensor))  # copy_ casts dtype and moves device per tensor
        if alias_keys:
            for key, tensor in ckpt.tensors(set(alias_keys)):
                canon = params[aliases[alias_keys[key]]]
                if not torch.equal(tensor.to(canon.device, canon.dtype), canon):
                    raise CheckpointError(
                        f"{source}: {key} differs from the tensor it is tied to ({aliases[alias_keys[key]]}); "
                        "the config says the embeddings are tied (tie_word_embeddings=true) but the "
                        "checkpoint has a distinct head: set tie_word_embeddings to false"
                    )
    return model.eval()
