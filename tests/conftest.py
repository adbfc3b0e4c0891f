"""Shared helpers: tiny random transformers models saved to disk, then loaded through llmparts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def save_hf(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def to_legacy_layout(directory: Path, rope_key: str = "rope_type") -> dict:
    """Rewrite a transformers-5 config.json into the 4.x layout found on most Hub checkpoints:
    ``rope_theta`` + ``rope_scaling`` (``type`` or ``rope_type``), no ``layer_types``."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {rope_key: kind, **rope}
    cfg.pop("layer_types", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def hf_reference(directory: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def requantize(directory: Path, quant_cfg: dict, convert) -> None:
    """Rewrite a saved checkpoint's tensors with ``convert(key, state_dict) -> {key: tensor}`` (pop
    keys to drop them) and add ``quantization_config`` to its config.json."""
    from safetensors.torch import load_file, save_file

    sd = load_file(directory / "model.safetensors")
    for k in list(sd):
        sd.update(convert(k, sd))
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = quant_cfg
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
