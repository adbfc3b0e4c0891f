"""llmparts: a readable, composable PyTorch reference implementation of modern LLM components."""

from .config import LayerSpec, ModelConfig, apply_cli_overrides, load_config, shipped_configs
from .describe import describe
from .errors import (
    CacheError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    InputError,
    LLMPartsError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from .generation import generate
from .kv_cache import KVCache
from .model import CausalLM, build_model

__all__ = [
    "CacheError", "CausalLM", "CheckpointError", "ConfigError", "ContextLengthError", "InputError", "KVCache", "LLMPartsError", "LayerSpec",
    "ModelConfig", "ModelNotFoundError", "UnsupportedModelError", "apply_cli_overrides", "build_model",
    "Tokenizer", "describe", "generate", "load_config", "load_pretrained", "shipped_configs",
]


def __getattr__(name: str):  # loading pulls in safetensors; import it on first use
    if name == "load_pretrained":
        from .loading import load_pretrained

        return load_pretrained
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)
