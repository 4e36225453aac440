#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and run the whole test suite, SmolLM2 tests included.
# Data: ../shared/data beside the checkout, or SPARSE_FFN_DATA=DIR; tests that need it skip without it.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the quick unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=12 "$@" tests
