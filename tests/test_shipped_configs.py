"""Shipped model configs: each resolves, round-trips, and has the parameter count transformers reports.

Everything is built on the meta device, so even the 70B config costs no memory.
"""

from __future__ import annotations

import pytest
import torch

import llmparts
from llmparts import ModelConfig
from llmparts.loading.families import HFConfig, family_for

SHIPPED = sorted(name for name in llmparts.shipped_configs() if not name.startswith("tiny/"))

# Config-name prefix -> the family adapter (``model_type``) that exports it to transformers.
FAMILY_BY_PREFIX = {"llama-": "llama", "qwen3-": "qwen3"}

# Totals published for the released checkpoints (tied embeddings counted once). Hard-coded so that
# they cannot drift with the adapters: Llama from the Hub's safetensors metadata (Llama-3.3-70B has
# the Llama-3.1-70B architecture), Qwen3 from the keras-hub Qwen3 presets.
KNOWN_TOTALS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "qwen3-32b": 32_762_123_264,
}


def family_of(name: str) -> str:
    for prefix, model_type in FAMILY_BY_PREFIX.items():
        if name.startswith(prefix):
            return model_type
    raise AssertionError(f"shipped config {name!r} has no family in FAMILY_BY_PREFIX; add one")


def test_expected_configs_are_shipped():
    missing = sorted(set(KNOWN_TOTALS) - set(SHIPPED))
    assert not missing, f"missing shipped configs: {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_resolves(name):
    cfg = llmparts.load_config(name)
    assert cfg.name == name
    assert len(cfg.layers) == cfg.n_layers
    family_of(name)


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trips(name):
    cfg = llmparts.load_config(name)
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg
    assert back.layers == cfg.layers


@pytest.mark.parametrize("name", SHIPPED)
def test_hf_config_round_trips(name):
    """config_to_hf then config_from_hf (strict: every key consumed) gives the same config back."""
    cfg = llmparts.load_config(name)
    family = family_for(family_of(name))
    hf = HFConfig(family.config_to_hf(cfg))
    raw = family.config_from_hf(hf)
    hf.finish(strict=True)
    back = ModelConfig.from_dict({**raw, "name": name})
    assert back == cfg
    assert back.layers == cfg.layers


def hf_num_parameters(hf_dict: dict) -> int:
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(**hf_dict)
    assert config.model_type == hf_dict["model_type"]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == hf_dict["architectures"][0]
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", SHIPPED)
def test_parameter_count_matches_transformers(name):
    cfg = llmparts.load_config(name)
    ours = llmparts.build_model(name, device="meta").num_parameters()
    hf_dict = family_for(family_of(name)).config_to_hf(cfg)
    assert hf_dict["tie_word_embeddings"] == cfg.tie_embeddings
    assert ours == hf_num_parameters(hf_dict)


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_parameter_count_matches_published_total(name):
    assert llmparts.build_model(name, device="meta").num_parameters() == KNOWN_TOTALS[name]
