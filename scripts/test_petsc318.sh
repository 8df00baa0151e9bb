#!/usr/bin/env bash
# Run pnode's core tests against Debian's PETSc/petsc4py 3.18 (the second supported version).
# Uses Debian's own Python (/usr/bin/python3) in .venv318 with system site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv318
need=()
for pkg in python3-petsc4py python3-mpi4py python3-venv openmpi-bin; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's petsc4py.pth looks for petsc4py under $PETSC_DIR/lib/python3/dist-packages
init_py=$(dpkg -L python3-petsc4py-real3.18 | grep -m1 '/lib/python3/dist-packages/petsc4py/__init__.py$')
export PETSC_DIR=${init_py%/lib/python3/dist-packages/petsc4py/__init__.py}
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [ ! -f "$VENV/.pnode-setup-done" ]; then
    # torch comes from .venv (scripts/test.sh's) through links where that venv has it: a copy is 6 GB
    if [ -x .venv/bin/python ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        .venv/bin/python scripts/link_torch.py "$VENV" || true
    fi
    # petsc4py 3.18 is compiled against NumPy 1.x
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "numpy<2" "scipy<1.14" pytest \
        torch==2.14.1
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
    touch "$VENV/.pnode-setup-done"
fi
"$VENV/bin/python" -c 'import petsc4py; print("petsc4py", petsc4py.__version__)'
exec "$VENV/bin/python" -m pytest -q tests/test_gradients.py tests/test_errors.py tests/test_options.py \
    tests/test_checkpoint.py tests/test_reuse.py tests/test_precision.py "$@"
