#!/usr/bin/env bash
# Run pnode's test suite (sets everything up first, idempotently). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest tests -q "$@"
