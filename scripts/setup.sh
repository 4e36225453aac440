#!/usr/bin/env bash
# Create ./.venv and install sparse-ffn into it (idempotent). torch goes first: pinned to the CPU
# build, so that no dependency resolves to a newer torch with gigabytes of CUDA packages.
# Users with CUDA: install the torch build for your CUDA first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
echo ".venv ready: $(.venv/bin/python -c 'import torch, transformers, lm_eval, sparse_ffn; print("torch", torch.__version__, "transformers", transformers.__version__, "lm_eval", lm_eval.__version__, "sparse-ffn", sparse_ffn.__version__)')" >&2
