#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and run the whole test suite, SmolLM2 tests included.
# Data: ../shared/data beside the checkout, or SPARSE_FFN_DATA=DIR; tests that need it skip without it.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the quick unit tests only).
# Test files run in PYTEST_WORKERS processes (default 2; each file stays on one worker), one torch
# thread each (OMP_NUM_THREADS): many tests are lm_eval subprocesses whose start-up is single-threaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" tests
