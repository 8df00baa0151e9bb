#!/usr/bin/env bash
# Set up everything pnode needs on a fresh Debian machine, idempotently:
#   Debian MPI/BLAS packages (+ patchelf, which PETSc's wheel build calls) -> .venv -> torch 2.14.1 -> PETSc/petsc4py 3.26.1 -> mpi4py -> pnode[test].
# A petsc4py that the base interpreter can already import (cluster module, conda) is used as it is.
# Environment: PYTHON (base interpreter, default python3), VENV (default .venv at the repo root),
#              PETSC_VERSION (default 3.26.1), PETSC_PRECISION (double, the default, or single: a
#              float32 PETSc for float32 training, built without pip's wheel cache so that it never
#              picks up a cached double-precision wheel; give it its own VENV),
#              PNODE_CUDA (1: build PETSc with CUDA, 0: without; unset: with CUDA where nvidia-smi
#              lists a GPU), NVCC (default: nvcc on the PATH), PNODE_CUDA_ARCH (default: the GPU's
#              compute capability, else 90 for H100/H200), TORCH_FROM (a venv whose torch this venv
#              imports through links instead of installing its own 6 GB: scripts/link_torch.py).
# A CUDA PETSc is compiled by this machine's nvcc against the CUDA 13 headers and libraries that torch
# installs into the venv (nvidia/cu13), built without pip's wheel cache (a plain `pip install petsc`
# must never pick up a CUDA wheel), and needs no GPU to build, import or run CPU solves.
# `bash scripts/setup.sh --print-petsc-options` prints the PETSc configure options this machine gets
# (the CUDA ones once torch is in the venv) and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PETSC_VERSION=${PETSC_VERSION:-3.26.1}
PETSC_PRECISION=${PETSC_PRECISION:-double}
BASE_OPTS="--with-fc=0 --with-debugging=0"
case "$PETSC_PRECISION" in
    double) PRECISION_OPTS=""; PETSC_PIP_EXTRA=() ;;
    single) PRECISION_OPTS=" --with-precision=single"; PETSC_PIP_EXTRA=(--no-cache-dir) ;;
    *) echo "[setup] PETSC_PRECISION must be double or single, not '$PETSC_PRECISION'" >&2; exit 2 ;;
esac
STAMP="$VENV/.pnode-setup-done"

log() { printf '[setup] %s\n' "$*"; }

# Whether this build is a CUDA one: PNODE_CUDA=1/0, else whether nvidia-smi lists a GPU.
want_cuda() {
    case "${PNODE_CUDA:-}" in
        1) return 0 ;;
        0) return 1 ;;
        "") nvidia-smi -L 2>/dev/null | grep -q '^GPU ' ;;
        *) echo "[setup] PNODE_CUDA must be 1, 0 or unset, not '$PNODE_CUDA'" >&2; exit 2 ;;
    esac
}
if want_cuda; then PETSC_KIND=cuda; else PETSC_KIND=cpu; fi

# PETSc's CUDA configure options (printed; no spaces inside a value: PETSc's setup.py splits on them).
# The toolkit's own include folder (crt/, cccl/) comes first, then torch's CUDA 13 headers; the
# libraries are torch's, versioned names only, so an unversioned link to each goes in $VENV/cuda-link.
cuda_options() {
    local nvcc=${NVCC:-$(command -v nvcc || true)}
    [ -n "$nvcc" ] || { echo "[setup] a CUDA build needs nvcc on the PATH (or NVCC=/path/to/nvcc)" >&2; exit 2; }
    local top; top=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    local toolkit; toolkit=$(cd "${top:-$(dirname "$nvcc")/..}/include" 2>/dev/null && pwd -P) || {
        echo "[setup] no include folder beside $nvcc (nvcc --dryrun names its TOP)" >&2; exit 2; }
    local cu; cu=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)
    [ -n "$cu" ] && [ -d "$cu/include" ] && [ -d "$cu/lib" ] || {
        echo "[setup] a CUDA build needs torch's CUDA 13 headers and libraries in $VENV (site-packages/nvidia/cu13)" >&2
        exit 2; }
    cu=$(cd "$cu" && pwd -P)
    local links; links="$(cd "$VENV" && pwd -P)/cuda-link"
    mkdir -p "$links"
    local lib name
    for lib in "$cu"/lib/lib*.so.*; do
        name=$(basename "$lib"); ln -sf "$lib" "$links/${name%%.so.*}.so"
    done
    local arch=${PNODE_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')}
    printf '%s' "--with-cuda=1 --with-cudac=$nvcc --with-cuda-arch=${arch:-90}"
    printf ' %s' "--with-cuda-include=[$toolkit,$cu/include,$toolkit/cccl]"
    printf ' %s' "--with-cuda-lib=[-L$links,-L$cu/lib,-lcudart,-lnvtx3interop,-lcufft,-lcublas,-lcusparse,-lcusolver,-lcurand]"
    printf ' %s\n' "--with-x=0"
}

petsc_options() {
    local opts="${PETSC_CONFIGURE_OPTIONS:-$BASE_OPTS}$PRECISION_OPTS"
    if [ "$PETSC_KIND" = cuda ]; then opts="$opts $(cuda_options)"; fi
    printf '%s\n' "$opts"
}
if [ "${1:-}" = "--print-petsc-options" ]; then
    petsc_options
    exit 0
fi
if [ "$PETSC_KIND" = cuda ]; then PETSC_PIP_EXTRA=(--no-cache-dir); fi

# The precision ("single" or "double") of the PETSc that $VENV's petsc4py links, or nothing.
installed_precision() {
    [ -x "$VENV/bin/python" ] || return 0
    "$VENV/bin/python" -c 'import numpy; from petsc4py import PETSc
print("single" if numpy.dtype(PETSc.RealType).itemsize == 4 else "double")' 2>/dev/null || true
}
# "cuda" or "cpu": whether the PETSc that $VENV's petsc4py links has CUDA, or nothing.
installed_kind() {
    [ -x "$VENV/bin/python" ] || return 0
    "$VENV/bin/python" -c 'from petsc4py import PETSc
print("cuda" if PETSc.Sys.hasExternalPackage("cuda") else "cpu")' 2>/dev/null || true
}
HAVE_KIND=$(installed_kind)
case "$HAVE_KIND" in cuda|cpu) ;; *) HAVE_KIND="" ;; esac
if [ -n "$HAVE_KIND" ] && [ "$HAVE_KIND" != "$PETSC_KIND" ]; then
    if [ -z "${PNODE_CUDA:-}" ]; then  # detected, not asked for: the venv's PETSc stays
        log "keeping $VENV's PETSc built for $HAVE_KIND (this machine would get a $PETSC_KIND build;" \
            "PNODE_CUDA=$([ "$PETSC_KIND" = cuda ] && echo 1 || echo 0) VENV=.venv-$PETSC_KIND bash scripts/setup.sh makes one)"
        PETSC_KIND=$HAVE_KIND
    else
        echo "[setup] $VENV already has a PETSc built for $HAVE_KIND, but PNODE_CUDA=$PNODE_CUDA asks for $PETSC_KIND;" \
             "one venv holds one PETSc: give this build its own, e.g." \
             "PNODE_CUDA=$PNODE_CUDA VENV=.venv-$PETSC_KIND bash scripts/setup.sh" >&2
        exit 2
    fi
fi
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
if [ -n "${TORCH_FROM:-}" ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    "$TORCH_FROM/bin/python" scripts/link_torch.py "$VENV" || log "installing $VENV's own torch instead"
fi
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    log "installing torch 2.14.1 / torchvision 0.29.1"
    "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
fi
if ! "$VENV/bin/python" -c 'import petsc4py' 2>/dev/null; then
    log "building PETSc $PETSC_VERSION ($PETSC_PRECISION, $PETSC_KIND) and petsc4py (about 11 minutes the first time; pip caches the double-precision CPU wheels)"
    PETSC_CONFIGURE_OPTIONS="$(petsc_options)" \
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
