#!/usr/bin/env bash
# The main job: set up (idempotently), then train the ODE-Net classifier on scikit-learn's bundled
# handwritten digits (real data, offline): two ODE blocks with forward Euler (step 0.25), gradients by
# PETSc's discrete adjoint.
# Extra arguments go to examples/cifar_odenet.py (e.g. -ts_type cn, --epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/cifar_odenet.py --dataset digits --arch odenet --out runs/demo "$@"
