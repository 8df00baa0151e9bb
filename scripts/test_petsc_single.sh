#!/usr/bin/env bash
# Run pnode's precision-independent tests against a single-precision PETSc (float32 states and
# times). Builds it first, once, into .venv-single (PETSC_PRECISION=single scripts/setup.sh, about
# ten minutes on two cores). The float64 round-off tests of the main suite do not apply there.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch comes from .venv (scripts/test.sh's) through links where that venv exists: a copy is 6 GB.
if [ -x .venv/bin/python ]; then export TORCH_FROM=.venv; fi
PETSC_PRECISION=single VENV=.venv-single bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PNODE_EXPECT_PETSC_PRECISION=single
exec .venv-single/bin/python -m pytest -q tests/test_precision.py tests/test_errors.py "$@"
