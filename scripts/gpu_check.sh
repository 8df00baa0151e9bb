#!/usr/bin/env bash
# pnode's GPU check: its GPU tests, then the GPU benchmark rows against torchdiffeq, then the digits demo on
# the GPU and on the CPU, on a machine with one NVIDIA GPU, Python 3.12 and torch but no PETSc and no network
# (the lent H100/H200 machines), with a CUDA PETSc built elsewhere. See docs/gpu.md.
#
#   bash scripts/gpu_check.sh --prepare   # on a build machine, after PNODE_CUDA=1 VENV=.venv-cuda bash scripts/setup.sh:
#                                         # packs .gpu-check/ (ignored by git; under 64 MiB)
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root, with .gpu-check/ carried:
#                                         # results in $OUT (or ./gpu-check-results), under 10 minutes
#   python -m benchmarks.gpu --render <results>/gpu.json --into BENCHMARKS.md   # back here
#
# What --prepare packs (.gpu-check/pnode-gpu.tar.gz): the CUDA PETSc of $VENV (libpetsc stripped of debug
# symbols, headers, configuration), the libraries it needs that are not glibc's or CUDA's (Open MPI with its
# plugins, OpenBLAS, LAPACK; the GPU machine's torch brings the CUDA ones), petsc4py 3.26.1's sdist, and, where a
# Python 3.12 is at hand (PNODE_GPU_PYTHON, else pyenv's), petsc4py built for it (then nothing is compiled on the
# GPU machine; else petsc4py is built there from the sdist, a few minutes, and comes back in $OUT for a next run:
# copy it to .gpu-check/petsc4py-cp312.tar.gz).
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
PACK=.gpu-check                 # what travels: the bundle (and a petsc4py built on a GPU machine)
WORK=.venv-gpu-check-build      # what does not: the Python 3.12 build environment, the sdist (ignored as .venv*)
BUNDLE=$PACK/pnode-gpu.tar.gz
LIMIT_MB=60  # of the 64 MiB a device call carries: the rest is the working tree (~2 MB)

log() { printf '[gpu-check] %s\n' "$*"; }
die() { printf '[gpu-check] %s\n' "$*" >&2; exit 2; }

# ------------------------------------------------------------------ --prepare (here)
# The libraries of ELF files "$@" that are neither glibc's nor the C++ runtime's nor CUDA's, resolved.
foreign_libraries() {
    ldd "$@" 2>/dev/null | awk '/=> \// {print $1, $3}' | sort -u |
        grep -Ev '^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|libpthread\.|librt\.|libstdc\+\+|libgcc_s)' |
        grep -Ev '^lib(cudart|cublas|cublasLt|cufft|cusparse|cusolver|curand|nvtx3interop|nvJitLink|cuda)\.' || true
}

prepare() {
    local venv=${VENV:-.venv-cuda}
    [ -x "$venv/bin/python" ] || die "no $venv: build the CUDA PETSc first: PNODE_CUDA=1 VENV=$venv bash scripts/setup.sh"
    local petsc_dir
    petsc_dir=$("$venv/bin/python" -c 'import petsc4py; print(petsc4py.get_config()["PETSC_DIR"])')
    "$venv/bin/python" -c 'from petsc4py import PETSc; assert PETSc.Sys.hasExternalPackage("cuda")' 2>/dev/null ||
        die "the PETSc of $venv has no CUDA: PNODE_CUDA=1 VENV=$venv bash scripts/setup.sh"
    local stage=$WORK/stage
    rm -rf "$stage" "$BUNDLE"
    mkdir -p "$PACK"
    mkdir -p "$stage/petsc/lib" "$stage/runtime/lib"
    log "PETSc from $petsc_dir"
    cp -a "$petsc_dir/include" "$stage/petsc/"
    mkdir -p "$stage/petsc/lib/petsc"
    cp -a "$petsc_dir/lib/petsc/conf" "$stage/petsc/lib/petsc/"
    # the shared library itself (libpetsc.so may be a linker script naming it), then the other names as they are
    local real; real=$(readlink -f "$(ls "$petsc_dir"/lib/libpetsc.so.* | head -1)")
    strip --strip-debug -o "$stage/petsc/lib/$(basename "$real")" "$real"
    (cd "$petsc_dir/lib" && for name in libpetsc.so*; do
        [ "$name" = "$(basename "$real")" ] || cp -a "$name" "$HERE/$stage/petsc/lib/"; done)

    # Open MPI's runtime: its plugins under an OPAL_PREFIX-shaped tree, its help texts, its headers
    local ompi_plugins ompi_inc ompi=$stage/runtime/ompi
    ompi_plugins=$(ompi_info --path pkglibdir --parsable 2>/dev/null | sed -n 's/^path:pkglibdir://p')
    ompi_inc=$(ompi_info --path incdir --parsable 2>/dev/null | sed -n 's/^path:incdir://p')
    mkdir -p "$ompi/lib/openmpi3" "$ompi/share"
    cp -a "$ompi_plugins"/*.so "$ompi/lib/openmpi3/"
    [ -d /usr/share/openmpi ] && cp -a /usr/share/openmpi "$ompi/share/"
    cp -a "$ompi_inc" "$stage/runtime/include"

    # every plugin's libraries too: one that cannot load is skipped, and a singleton needs few of them
    local name path
    foreign_libraries "$real" "$ompi/lib/openmpi3"/*.so |
        while read -r name path; do cp -L "$path" "$stage/runtime/lib/$name"; done
    ln -sf libmpi.so.40 "$stage/runtime/lib/libmpi.so"
    printf 'OLD_PETSC_DIR=%s\nLIBPETSC=%s\nMPICC=%s\n' "$petsc_dir" "$(basename "$real")" "$(command -v mpicc)" \
        >"$stage/MANIFEST"

    if [ ! -f "$WORK/petsc4py-3.26.1.tar.gz" ]; then
        log "fetching petsc4py 3.26.1's sdist"
        "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation petsc4py==3.26.1 -d "$WORK"
    fi
    cp "$WORK/petsc4py-3.26.1.tar.gz" "$stage/"
    prebuild_petsc4py "$venv" "$petsc_dir" "$stage"

    tar -C "$stage" -czf "$BUNDLE" .
    rm -rf "$stage"
    local mb; mb=$(( $(stat -c %s "$BUNDLE") / 1048576 ))
    local extra=0; [ -f "$PACK/petsc4py-cp312.tar.gz" ] && extra=$(( $(stat -c %s "$PACK/petsc4py-cp312.tar.gz") / 1048576 ))
    log "packed $BUNDLE: $mb MiB (+ $extra MiB of a petsc4py built on a GPU machine)"
    [ $((mb + extra)) -lt $LIMIT_MB ] || die "$BUNDLE is $((mb + extra)) MiB: over $LIMIT_MB MiB, it cannot travel"
    log "run it: the device tool's run with carry=[\"$PACK\"] and command 'bash scripts/gpu_check.sh' (docs/gpu.md)"
}

# petsc4py built here for the GPU machine's Python 3.12, if one is here: nothing to compile there.
prebuild_petsc4py() {
    local venv=$1 petsc_dir=$2 stage=$3
    local py=${PNODE_GPU_PYTHON:-} candidate
    for candidate in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 \
                     "$(command -v python3.12 || true)"; do
        [ -z "$py" ] && [ -n "$candidate" ] && "$candidate" -c 'import venv' 2>/dev/null && py=$candidate
    done
    if [ -z "$py" ]; then
        log "no Python 3.12 here: petsc4py will be built on the GPU machine from its sdist"
        return 0
    fi
    local build=$WORK/py312
    if [ ! -x "$build/bin/python" ]; then
        log "a Python 3.12 build environment ($py)"
        "$py" -m venv "$build"
        "$build/bin/python" -m pip install -q --disable-pip-version-check wheel setuptools "cython>=3" numpy
    fi
    local built=$WORK/site-py312  # kept for the next --prepare: a rebuild takes minutes
    if [ ! -d "$built/petsc4py" ] || [ "$built" -ot "$petsc_dir/lib/$(basename "$(ls "$petsc_dir"/lib/libpetsc.so.* | head -1)")" ]; then
        log "building petsc4py 3.26.1 for Python 3.12 against $petsc_dir (a few minutes)"
        rm -rf "$built"
        PETSC_DIR=$petsc_dir PETSC_ARCH="" "$build/bin/python" -m pip install -q --disable-pip-version-check \
            --no-build-isolation --no-deps --no-cache-dir --target "$built" "$stage/petsc4py-3.26.1.tar.gz"
        find "$built" -name '*.so' -exec strip --strip-debug {} +  # PETSc's -g: 39 MB, 8 without
    fi
    cp -a "$built" "$stage/site"
}

# ------------------------------------------------------------------ the check (on the GPU machine)
B=/tmp/pnode-gpu
OUT=${OUT:-$HERE/gpu-check-results}
STARTED=$(date +%s)
BUDGET_S=${PNODE_GPU_BUDGET_S:-560}  # a device command runs at most 600 s
SUMMARY=$OUT/gpu_check.json
STEPS=()

elapsed() { echo $(( $(date +%s) - STARTED )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

# step NAME SECONDS COMMAND...: run it with a time limit (at most what is left), log it, note the outcome.
# This script's own steps run as `bash scripts/gpu_check.sh --step FUNCTION` (timeout runs programs only).
step() {
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    if [ "$remaining" -lt 20 ]; then
        STEPS+=("{\"step\": \"$name\", \"status\": \"skipped: out of time\"}"); log "$name: skipped (out of time)"; return 1
    fi
    [ "$limit" -le "$remaining" ] || limit=$remaining
    local begin; begin=$(date +%s)
    log "$name (at most ${limit} s)"
    local rc=0
    timeout "$limit" "$@" >>"$OUT/gpu_check.log" 2>&1 || rc=$?
    local took=$(( $(date +%s) - begin ))
    STEPS+=("{\"step\": \"$name\", \"status\": $rc, \"seconds\": $took}")
    log "$name: exit $rc after ${took} s"
    return $rc
}
SELF=("bash" "$HERE/scripts/gpu_check.sh" "--step")

write_summary() {
    local joined; joined=$(IFS=,; echo "${STEPS[*]:-}")
    printf '{"elapsed_s": %s, "gpu": "%s", "steps": [%s]}\n' "$(elapsed)" \
        "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)" "$joined" >"$SUMMARY"
    tail -n 40 "$OUT/gpu_check.log" || true
    log "done in $(elapsed) s; results in $OUT"
}

unpack() {
    rm -rf "$B" && mkdir -p "$B"
    tar -C "$B" -xzf "$HERE/$BUNDLE"
    # shellcheck disable=SC1091
    . "$B/MANIFEST"
    # petsc4py and petscconf.h name the build machine's PETSC_DIR: make that path this PETSc (a real folder
    # there is the build machine's own PETSc, left alone)
    if [ -L "$OLD_PETSC_DIR" ] || [ ! -e "$OLD_PETSC_DIR" ]; then
        mkdir -p "$(dirname "$OLD_PETSC_DIR")"
        ln -sfn "$B/petsc" "$OLD_PETSC_DIR"
    fi
    if [ -f "$HERE/$PACK/petsc4py-cp312.tar.gz" ] && [ ! -d "$B/site/petsc4py" ]; then
        mkdir -p "$B/site" && tar -C "$B/site" -xzf "$HERE/$PACK/petsc4py-cp312.tar.gz"
    fi
}

# LD_LIBRARY_PATH: this PETSc, the carried runtime, and the folders of this machine's CUDA libraries (torch's
# wheels, the toolkit), found for each library libpetsc misses until none is missing.
runtime_environment() {
    local dirs="$B/petsc/lib:$B/runtime/lib" roots lib found round
    roots="$(python3 -c 'import site; print(" ".join(site.getsitepackages()))') /usr/local /usr/lib/x86_64-linux-gnu"
    # shellcheck disable=SC2086
    find $roots -name 'lib*.so*' 2>/dev/null >"$B/libraries.txt" || true
    for round in 1 2 3; do
        for lib in $(LD_LIBRARY_PATH=$dirs ldd "$B/petsc/lib/$LIBPETSC" | awk '/not found/ {print $1}'); do
            found=$(grep -m1 "/$lib" "$B/libraries.txt" || true)
            [ -z "$found" ] || case ":$dirs:" in *":$(dirname "$found"):"*) ;; *) dirs="$dirs:$(dirname "$found")" ;; esac
        done
    done
    export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export OPAL_PREFIX=$B/runtime/ompi OMPI_MCA_mca_base_component_path=$B/runtime/ompi/lib/openmpi3
    export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_pmix=isolated OMPI_MCA_mca_base_component_show_load_errors=0
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export PYTHONPATH="$B/site:$HERE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
    local missing; missing=$(ldd "$B/petsc/lib/$LIBPETSC" | awk '/not found/ {print $1}' | tr '\n' ' ')
    log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    [ -z "$missing" ] || { log "libpetsc needs libraries this machine lacks: $missing"; return 1; }
}

# petsc4py from its sdist, against the carried PETSc (when none was built for this Python)
build_petsc4py() {
    mkdir -p "$B/bin"
    cat >"$B/bin/mpicc" <<EOF
#!/bin/sh
case " \$* " in *" -c "*) exec cc -I$B/runtime/include "\$@" ;; *) exec cc -I$B/runtime/include "\$@" -L$B/runtime/lib -lmpi ;; esac
EOF
    chmod +x "$B/bin/mpicc"
    sed -i "s#$MPICC#$B/bin/mpicc#g" "$B/petsc/lib/petsc/conf/petscvariables"
    PETSC_DIR=$OLD_PETSC_DIR PETSC_ARCH="" python3 -m pip install -q --no-build-isolation --no-deps --no-index \
        --no-cache-dir --target "$B/site" "$B/petsc4py-3.26.1.tar.gz"
    tar -C "$B/site" -czf "$OUT/petsc4py-cp312.tar.gz" .
}

preflight() {
    nvidia-smi -L
    python3 - <<'EOF'
import torch
import pnode  # first: pnode initialises PETSc with its defaults for a CUDA build (-use_gpu_aware_mpi 0)
import petsc4py
from pnode._compat import PETSc
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("petsc4py", petsc4py.__version__, "PETSc with CUDA:", PETSc.Sys.hasExternalPackage("cuda"))
y0 = torch.randn(1024, 8, device="cuda", dtype=torch.float64)
ys = pnode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.1})
error = float((ys[-1] - y0 * torch.exp(torch.tensor(-1.0))).abs().max())
print("a CUDA solve:", ys.device, "max error", error)
assert error < 1e-5
EOF
}

demo() {  # the digits demo on the GPU and on this machine's CPU, side by side
    local common=(examples/cifar_odenet.py --dataset digits --arch odenet --no-progress)
    python3 "${common[@]}" --device cuda --out "$B/demo-cuda" &
    local gpu=$!
    python3 "${common[@]}" --device cpu --threads 4 --out "$B/demo-cpu"
    wait "$gpu"
    cp "$B/demo-cuda/summary.json" "$OUT/demo-cuda.json"
    cp "$B/demo-cpu/summary.json" "$OUT/demo-cpu.json"
}

check() {
    [ -f "$BUNDLE" ] || die "no $BUNDLE: run bash scripts/gpu_check.sh --prepare on the build machine, carry $PACK"
    mkdir -p "$OUT"
    : >"$OUT/gpu_check.log"
    trap write_summary EXIT
    step unpack 60 "${SELF[@]}" unpack || return 1
    # shellcheck disable=SC1091
    . "$B/MANIFEST"
    runtime_environment >>"$OUT/gpu_check.log" 2>&1 || { log "missing libraries: see $OUT/gpu_check.log"; return 1; }
    if ! python3 -c 'from petsc4py import PETSc' >/dev/null 2>&1; then
        step build-petsc4py 420 "${SELF[@]}" build_petsc4py || return 1
    fi
    if ! step preflight 120 "${SELF[@]}" preflight; then
        log "retrying the preflight with -use_gpu_aware_mpi 0 in PETSC_OPTIONS"
        export PETSC_OPTIONS="-use_gpu_aware_mpi 0"
        step preflight-again 120 "${SELF[@]}" preflight || return 1
    fi
    step gpu-tests 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_device_path.py \
        --junitxml="$OUT/gpu-tests.xml" || true
    step benchmarks 240 python3 -m benchmarks.gpu --out "$OUT" || true
    step demo 200 "${SELF[@]}" demo || true
}

case "${1:-}" in
    --prepare) prepare ;;
    --step)  # one of the check's steps, in a process of its own (see step)
        [ -f "$B/MANIFEST" ] && . "$B/MANIFEST"
        case "${2:-}" in unpack|build_petsc4py|preflight|demo) "$2" ;; *) die "no step '${2:-}'" ;; esac ;;
    "") check ;;
    *) die "usage: bash scripts/gpu_check.sh [--prepare]" ;;
esac
