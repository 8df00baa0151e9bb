"""Import petsc4py once, and keep every difference between petsc4py versions (3.18 .. 3.26) here."""

import ctypes
import os
import sys

_INSTALL_HINT = (
    "pnode needs petsc4py (PETSc's Python bindings) and mpi4py. On Debian/Ubuntu run "
    "`bash scripts/setup.sh` from the pnode checkout (it builds petsc==3.26.1 and petsc4py into .venv), "
    "or by hand: apt-get install libopenmpi-dev libopenblas-dev liblapack-dev; "
    "pip install wheel setuptools cython numpy; "
    "PETSC_CONFIGURE_OPTIONS='--with-fc=0 --with-debugging=0' pip install --no-build-isolation "
    "petsc==3.26.1 petsc4py==3.26.1; pip install mpi4py. A petsc4py from a cluster module or conda "
    "works as well."
)


def import_petsc():
    """Return the initialised ``petsc4py.PETSc`` module, or raise an ImportError that says how to install it.

    PETSc reads ``sys.argv`` once, at initialisation, so command-line options such as ``-ts_type cn``
    reach every solver pnode creates.
    """
    try:
        import petsc4py
    except ImportError as exc:  # pragma: no cover - exercised only without petsc4py
        raise ImportError(_INSTALL_HINT) from exc
    # Importing petsc4py.PETSc initialises PETSc without arguments, after which init() is a no-op:
    # only call init(sys.argv) when nobody has imported PETSc yet (else their choice stands).
    if "petsc4py.PETSc" not in sys.modules:
        args = list(sys.argv)
        if "-options_left" not in args:
            # the script's own flags (--epochs 10, pytest's -q) are not PETSc's: don't list them at exit
            args += ["-options_left", "no"]
        petsc4py.init(args)
    from petsc4py import PETSc

    return PETSc


def _single_thread_petsc_blas() -> None:
    """Run the OpenBLAS that PETSc links on one thread (unless ``OPENBLAS_NUM_THREADS`` says otherwise).

    PETSc's vector kernels (AXPY, norms) call BLAS between the network's evaluations. A pthreads
    OpenBLAS (Debian's) then wakes its own thread pool on every call, competing with torch's
    OpenMP threads for the same cores (in one ad-hoc timing of the conv ODE block's training step,
    rk4, 16 steps, batch 128, 2 cores: 1.94 s that way, 1.55 s with one BLAS thread). Only libraries named
    ``libopenblas`` are touched: numpy's bundled OpenBLAS exports other symbol names.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libopenblas" in line.rsplit("/", 1)[-1]}
    except OSError:  # pragma: no cover - not Linux
        return
    for path in paths:
        try:
            ctypes.CDLL(path).openblas_set_num_threads(1)
        except (OSError, AttributeError):  # pragma: no cover - another BLAS build
            pass


PETSc = import_petsc()
_single_thread_petsc_blas()

PETSC_VERSION = PETSc.Sys.getVersion()  # e.g. (3, 26, 1)


def set_rhs_jacobian_p(ts, callback, mat) -> None:
    """``TSSetRHSJacobianP``: the keyword name of the matrix differs between petsc4py versions."""
    ts.setRHSJacobianP(callback, mat)


def converged_reason_name(reason: int) -> str:
    """Name of a ``TS.ConvergedReason`` value, e.g. -2 -> ``'DIVERGED_STEP_REJECTED'``."""
    for name in dir(PETSc.TS.ConvergedReason):
        if not name.startswith("_") and getattr(PETSc.TS.ConvergedReason, name) == reason:
            return name
    return str(reason)


def has_revolve() -> bool:
    """Whether this PETSc build was configured with Revolve (needed by ``-ts_trajectory_max_cps_ram``)."""
    try:
        import petsc4py

        conf = petsc4py.get_config()
        petsc_dir = conf.get("PETSC_DIR", "")
        arch = conf.get("PETSC_ARCH", "") or ""
        import os

        for path in (os.path.join(petsc_dir, arch, "include", "petscconf.h"),
                     os.path.join(petsc_dir, "include", "petscconf.h")):
            if os.path.exists(path):
                with open(path) as fh:
                    return "PETSC_HAVE_REVOLVE" in fh.read()
    except Exception:  # pragma: no cover - configuration layout varies between installs
        pass
    return False
