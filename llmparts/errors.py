"""One exception hierarchy for everything a user can get wrong.

Every error raised on bad input derives from :class:`LLMPartsError`, so callers can catch one type.
Messages name the field, the value and what would be valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LLMPartsError(Exception):
    """Base class of every error llmparts raises on bad input."""


class ConfigError(LLMPartsError, ValueError):
    """A model config (YAML, override or HF config.json) is malformed or inconsistent."""


class UnsupportedModelError(ConfigError):
    """A checkpoint's family, rope type or other feature is not supported."""


class CheckpointError(LLMPartsError):
    """Checkpoint tensors do not match the model: missing, unexpected or wrongly shaped."""


class ModelNotFoundError(LLMPartsError, FileNotFoundError):
    """A model name, path or file does not exist."""


class InputError(LLMPartsError, ValueError):
    """A call's runtime input is invalid (shapes, positions, sampling parameters, empty prompt)."""


class ContextLengthError(InputError):
    """A sequence does not fit the model's context or the cache's capacity."""


class CacheError(LLMPartsError, ValueError):
    """A KV cache is used beyond its capacity or with the wrong shape."""


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
