"""Family adapters: Hugging Face ``config.json`` -> llmparts config, plus the family's weight map.

An adapter is data: which ``model_type`` values it handles, how HF fields become spec fields, and the
rename/ignore rules for checkpoint tensors. Model code never asks which family it runs.
:class:`HFConfig` reads a config.json strictly: every key an adapter does not consume must be a
known metadata key, or loading fails naming it.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError, UnsupportedModelError, closest
from ..weight_map import Rule

# Keys every transformers config carries that do not change the network's function.
METADATA_KEYS: dict[str, str] = {
    k: "metadata"
    for k in (
        "transformers_version", "architectures", "model_type", "dtype", "torch_dtype", "_name_or_path",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "use_cache", "initializer_range", "output_hidden_states", "output_attentions", "return_dict",
        "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
        "tokenizer_class", "torchscript", "tf_legacy_loss", "use_bfloat16", "pruned_heads",
        "finetuning_task", "prefix", "task_specific_params", "cross_attention_hidden_size",
        "add_cross_attention", "tie_encoder_decoder", "is_decoder", "output_scores",
        "return_dict_in_generate", "max_length", "min_length", "do_sample", "early_stopping",
        "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
        "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_logits",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "unsloth_fixed", "unsloth_version",
    )
}
METADATA_KEYS["attention_dropout"] = "dropout only acts in training"
METADATA_KEYS["auto_map"] = "remote-code class names; llmparts never runs remote code"
METADATA_KEYS["output_router_logits"] = "whether transformers returns router logits (MoE families: and adds the load-balancing loss); no effect on the logits"
METADATA_KEYS["pretraining_tp"] = "tensor-parallel hint of the original training; forward is unchanged"


class HFConfig:
    """A config.json dict read strictly: :meth:`finish` fails on keys nobody consumed."""

    def __init__(self, data: dict[str, Any], source: str = "config.json") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        self.data, self.source = data, source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def number(self, key: str, default: float) -> float:
        """A numeric field as float (``default`` when absent or null); anything else is a ConfigError."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.source}: {key} must be a finite number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool, null: bool | None = None) -> bool:
        """A true/false field (``default`` when absent, and when null unless ``null`` is given: for
        the fields transformers types ``bool | None``, whose null it keeps and tests as false); a
        string such as "false" is a ConfigError."""
        if null is not None and key in self.data and self.data[key] is None:
            self.used.add(key)
            return null
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: {key} must be true or false, got {value!r}")
        return value

    def require(self, key: str) -> Any:
        self.used.add(key)
        if self.data.get(key) is None:
            raise ConfigError(f"{self.source}: required field {key!r} is missing")
        return self.data[key]

    def expect(self, key: str, allowed: tuple[Any, ...], why: str) -> Any:
        """Read a field this family supports only with the given values."""
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise UnsupportedModelError(f"{self.source}: {key}={value!r} is not supported ({why})")
        return value

    def finish(self, strict: bool = True) -> None:
        unknown = [k for k in self.data if k not in self.used and k not in METADATA_KEYS]
        if unknown and strict:
            raise UnsupportedModelError(
                f"{self.source}: unknown field(s) {', '.join(map(repr, sorted(unknown)))} for model_type "
                f"{self.data.get('model_type')!r}; llmparts does not know what they change. Pass "
                "strict_config=False to load anyway (they are then reported as a warning)."
            )
        if unknown:
            import warnings

            warnings.warn(f"{self.source}: ignoring unknown field(s) {sorted(unknown)}", stacklevel=3)


@dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` maps onto llmparts."""

    model_types: tuple[str, ...]
    config_from_hf: Callable[[HFConfig], dict[str, Any]]
    weight_rules: Callable[[dict[str, Any]], list[Rule]]
    config_to_hf: Callable[[Any], dict[str, Any]] | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for t in family.model_types:
        _FAMILIES[t] = family
    return family


def family_for(model_type: Any, source: str = "config.json") -> Family:
    from . import deepseek, gemma3, gpt_oss, llama, mistral, olmo2, olmo3, qwen3, qwen3_moe, smollm3  # noqa: F401

    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported"
            f"{closest(str(model_type), _FAMILIES)}; supported: {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[model_type]


def supported_model_types() -> list[str]:
    family_for("llama")
    return sorted(_FAMILIES)
