"""Where a model comes from: a local directory, a ``.gguf`` file, or a Hugging Face Hub repo id.

Hub downloads go through ``huggingface_hub.snapshot_download`` and fetch only what llmparts reads
(config, generation config, tokenizer files, safetensors). The standard environment is honoured at
call time: ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelNotFoundError

HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
    "*.safetensors",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.startswith((".", "/", "~"))


def resolve_source(source: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local path for ``source``: an existing directory or ``.gguf`` file, or a Hub snapshot."""
    if not isinstance(source, (str, os.PathLike)):
        raise ModelNotFoundError(f"the model source must be a path or a Hub repo id (str), got {type(source).__name__}")
    text = os.fspath(source)
    if not text.strip():
        raise ModelNotFoundError("the model source is empty: pass a directory, a .gguf file or a Hub repo id")
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.endswith(".gguf"):
        raise ModelNotFoundError(f"{text}: no such GGUF file")
    if not looks_like_repo_id(text):
        raise ModelNotFoundError(
            f"{text!r} is not an existing directory, a .gguf file or a Hugging Face repo id (owner/name)"
        )
    return download(text, revision=revision)


def download(repo_id: str, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """Fetch (or find in the cache) the files llmparts needs from Hub repo ``repo_id``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline() if local_files_only is None else local_files_only
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_PATTERNS,
            cache_dir=hub_cache_dir(),
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline,
        )
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local path nor a valid Hub repo id ({e})") from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id}: the repository is gated; accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"{repo_id}: not found on the Hugging Face Hub ({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise ModelNotFoundError(
            f"{repo_id}: not in the local Hugging Face cache ({hub_cache_dir() or '~/.cache/huggingface/hub'}) "
            f"and {why}. Download it once while online (`llmparts download {repo_id}`), or pass the path "
            "of a local model directory or .gguf file instead."
        ) from None
    except OSError as e:  # network errors surface as requests/httpx OSErrors
        raise ModelNotFoundError(
            f"{repo_id}: download failed ({type(e).__name__}: {e}). Pass a local directory or .gguf path, "
            "or set HF_HUB_OFFLINE=1 to use the local cache only."
        ) from None
    return Path(path)
