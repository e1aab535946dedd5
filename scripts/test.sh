#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite offline on CPU.
# Two pytest workers with one thread each keep both cores busy: most tests run a recipe script in a
# subprocess, and a single-threaded process uses a core better than two threads fighting for it.
# Whole files go to a worker (their module fixtures are built once), longest first (tests/conftest.py).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -n 0 -k packing` for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "$@"
