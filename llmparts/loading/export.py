"""Writing a model back as a Hugging Face directory (config.json + safetensors) that transformers loads.

Parameter names go back through the family's weight map (its ``Rename`` rules are reversible);
the config through the family's ``config_to_hf``. ``convert`` turns a GGUF file into such a
directory, tokenizer files included.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, LLMPartsError
from ..config import ModelConfig
from ..model import CausalLM, resolve_dtype
from . import TOKEN_ID_KEYS
from .checkpoint import INDEX, SINGLE
from .families import HFConfig, family_for
from .weight_map import Rename

SHARD_BYTES = 2 * 1024**3


def hf_state_names(model: CausalLM, model_type: str) -> dict[str, str]:
    """llmparts parameter name -> HF checkpoint name, for every (deduplicated) parameter."""
    family = family_for(model_type)
    rules = [r for r in family.weight_rules(model.config.to_dict()) if isinstance(r, Rename)]
    out = {}
    for name, _ in model.named_parameters():
        for rule in rules:
            hf = rule.reverse(name)
            if hf is not None:
                out[name] = hf
                break
        else:
            raise LLMPartsError(f"no {model_type} weight-map rule produces parameter {name!r}; cannot export it")
    return out


def _check_expressible(config: ModelConfig, hf: dict[str, Any], model_type: str,
                       extra: dict[str, Any] | None = None) -> None:
    """Read the written config back; refuse to export a model the format cannot describe exactly, or
    whose ``extra`` config.json keys (``save_pretrained``'s ``extra_config``) would change it."""
    _refuse(_config_diffs(config, hf, model_type), f"this model cannot be written as model_type {model_type!r}",
            "pick the family that has these features")
    if extra:
        _refuse(_config_diffs(config, {**hf, **extra}, model_type),
                f"extra_config changes the model when written as model_type {model_type!r}",
                "drop those keys from extra_config (the model's own values are written), or build the model with them")


def _refuse(diffs: list[str], cause: str, fix: str) -> None:
    if diffs:
        raise ConfigError(f"{cause} (the model's value, then what the written config.json means: "
                          f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}); {fix}")


def _config_diffs(config: ModelConfig, hf: dict[str, Any], model_type: str) -> list[str]:
    """Where the network ``hf`` (a config.json dict of ``model_type``) describes differs from ``config``."""
    back = ModelConfig.from_dict(family_for(model_type).config_from_hf(HFConfig(dict(hf), "exported config")))
    fields = ("vocab_size", "d_model", "n_layers", "max_seq_len", "tie_embeddings", "logit_softcap", "embedding", "final_norm")
    diffs = [d for f in fields for d in _spec_diffs(f, getattr(config, f), getattr(back, f))]
    return diffs + [d for i, (ours, written) in enumerate(zip(config.layers, back.layers))
                    for d in _spec_diffs(f"layers[{i}]", ours, written)]


def _spec_diffs(path: str, ours: Any, written: Any) -> list[str]:
    """``path.field: ours -> written`` for every leaf where two config values differ."""
    if ours == written:
        return []
    if dataclasses.is_dataclass(ours) and type(ours) is type(written):
        return [d for f in dataclasses.fields(ours)
                for d in _spec_diffs(f"{path}.{f.name}", getattr(ours, f.name), getattr(written, f.name))]
    describe = lambda v: getattr(v, "type", v) if dataclasses.is_dataclass(v) else v  # noqa: E731
    return [f"{path}: {describe(ours)!r} -> {describe(written)!r}"]


def save_pretrained(model: CausalLM, out_dir: str | Path, model_type: str | None = None,
                    dtype: torch.dtype | None = None, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an HF checkpoint directory for ``model_type`` (default: the one it was loaded as)."""
    model_type = model_type or getattr(model, "hf_model_type", None)
    if model_type is None:
        raise ConfigError("save_pretrained: pass model_type (e.g. 'llama', 'qwen3', 'gemma3_text')")
    family = family_for(model_type)
    if family.config_to_hf is None:
        raise ConfigError(f"family {model_type!r} cannot write a transformers config")
    dtype = resolve_dtype(dtype, "save_pretrained: dtype") or model.dtype
    if model.device.type == "meta":
        raise ConfigError("save_pretrained: the model has no weights (built on the meta device); load or "
                          "allocate it first")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"save_pretrained: {out} exists and is not a directory")
    names = hf_state_names(model, model_type)
    try:
        cfg = family.config_to_hf(model.config)
    except (AttributeError, TypeError) as e:  # a component this family's config.json has no field for
        raise ConfigError(f"save_pretrained: this model cannot be written as model_type {model_type!r}: its "
                          f"config uses components that family does not have ({e})") from None
    _check_expressible(model.config, cfg, model_type, extra_config)
    # the model's generation defaults (generation_config.json, or the token ids of the files it came
    # from): their token ids in config.json too, as transformers writes them; extra_config wins
    generation = dict(getattr(model, "generation_config", None) or {})
    cfg.update({k: generation[k] for k in TOKEN_ID_KEYS if generation.get(k) is not None})
    cfg.update(extra_config or {})
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    # weights of an earlier save in the same directory would be read instead of (single file next to an
    # index) or besides (extra shards) the new ones: remove them, as transformers' save_pretrained does
    for old in [out / INDEX, out / SINGLE, *out.glob("model-*-of-*.safetensors")]:
        if old.is_file():
            old.unlink()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    elif (out / "generation_config.json").is_file():  # (an earlier save's)
        (out / "generation_config.json").unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, p in model.named_parameters():
        t = p.detach().to("cpu", dtype).contiguous()
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][names[name]] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE, metadata={"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map.update({key: fname for key in shard})
            total += sum(t.nbytes for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """GGUF file -> HF directory: config.json, model.safetensors, generation_config.json, tokenizer files."""
    from ..tokenizer import Tokenizer
    from . import load_gguf

    model = load_gguf(gguf_path, dtype or torch.float32)
    tokens = dict(model.generation_config)  # the GGUF's bos / eos / pad ids: config.json's
    tok = Tokenizer.from_gguf(gguf_path)
    if tok.eos_token_ids:  # every stop id the tokenizer knows, in generation_config.json
        model.generation_config["eos_token_id"] = tok.eos_token_ids if len(tok.eos_token_ids) > 1 else tok.eos_token_ids[0]
    out = save_pretrained(model, out_dir, model.hf_model_type, dtype, extra_config=tokens)
    tok.save_pretrained(out)
    return out
