#!/usr/bin/env bash
# Set up everything pnode needs on a fresh Debian machine, idempotently:
#   Debian MPI/BLAS packages (+ patchelf, which PETSc's wheel build calls) -> .venv -> torch 2.14.1 -> PETSc/petsc4py 3.26.1 -> mpi4py -> pnode[test].
# A petsc4py that the base interpreter can already import (cluster module, conda) is used as it is.
# Environment: PYTHON (base interpreter, default python3), VENV (default .venv at the repo root),
#              PETSC_VERSION (default 3.26.1), PETSC_PRECISION (double, the default, or single: a
#              float32 PETSc for float32 training, built without pip's wheel cache so that it never
#              picks up a cached double-precision wheel; give it its own VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PETSC_VERSION=${PETSC_VERSION:-3.26.1}
PETSC_PRECISION=${PETSC_PRECISION:-double}
case "$PETSC_PRECISION" in
    double) PRECISION_OPTS=""; PETSC_PIP_EXTRA=() ;;
    single) PRECISION_OPTS=" --with-precision=single"; PETSC_PIP_EXTRA=(--no-cache-dir) ;;
    *) echo "[setup] PETSC_PRECISION must be double or single, not '$PETSC_PRECISION'" >&2; exit 2 ;;
esac
STAMP="$VENV/.pnode-setup-done"

log() { printf '[setup] %s\n' "$*"; }

# The precision ("single" or "double") of the PETSc that $VENV's petsc4py links, or nothing.
installed_precision() {
    [ -x "$VENV/bin/python" ] || return 0
    "$VENV/bin/python" -c 'import numpy; from petsc4py import PETSc
print("single" if numpy.dtype(PETSc.RealType).itemsize == 4 else "double")' 2>/dev/null || true
}
HAVE_PRECISION=$(installed_precision)
if [ -n "$HAVE_PRECISION" ] && [ "$HAVE_PRECISION" != "$PETSC_PRECISION" ]; then
    echo "[setup] $VENV already has a $HAVE_PRECISION-precision PETSc, but PETSC_PRECISION=$PETSC_PRECISION;" \
         "one venv holds one PETSc: give this build its own, e.g." \
         "PETSC_PRECISION=$PETSC_PRECISION VENV=.venv-$PETSC_PRECISION bash scripts/setup.sh" >&2
    exit 2
fi

if [ -f "$STAMP" ] && "$VENV/bin/python" -c 'import torch, petsc4py, mpi4py, pnode' 2>/dev/null; then
    exit 0
fi

need_debs=()
for pkg in libopenmpi-dev openmpi-bin libopenblas-dev liblapack-dev patchelf; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if [ ${#need_debs[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_debs[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_debs[@]}" >/dev/null
fi

if "$PYTHON" -c 'import petsc4py' 2>/dev/null; then
    log "using the petsc4py that $PYTHON already imports"
    SYSTEM_PETSC=1
else
    SYSTEM_PETSC=0
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    if [ "$SYSTEM_PETSC" = 1 ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

"${PIP[@]}" --upgrade pip wheel setuptools cython
if [ "$SYSTEM_PETSC" = 0 ]; then
    "${PIP[@]}" numpy
fi
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    log "installing torch 2.14.1 / torchvision 0.29.1"
    "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
fi
if ! "$VENV/bin/python" -c 'import petsc4py' 2>/dev/null; then
    log "building PETSc $PETSC_VERSION ($PETSC_PRECISION) and petsc4py (about 11 minutes the first time; pip caches the double-precision wheels)"
    PETSC_CONFIGURE_OPTIONS="${PETSC_CONFIGURE_OPTIONS:---with-fc=0 --with-debugging=0}$PRECISION_OPTS" \
        "${PIP[@]}" --no-build-isolation "${PETSC_PIP_EXTRA[@]}" "petsc==$PETSC_VERSION"
    "${PIP[@]}" --no-build-isolation "${PETSC_PIP_EXTRA[@]}" "petsc4py==$PETSC_VERSION"
fi
if ! "$VENV/bin/python" -c 'import mpi4py' 2>/dev/null; then
    "${PIP[@]}" mpi4py
fi
log "installing pnode (editable) with its test extras"
"${PIP[@]}" -e '.[test]'
"$VENV/bin/python" -c 'import torch, petsc4py, mpi4py, pnode' && touch "$STAMP"
log "done: $("$VENV/bin/python" -c 'import petsc4py, torch; print("petsc4py", petsc4py.__version__, "torch", torch.__version__)')"
