"""Import petsc4py once, and keep every difference between petsc4py versions (3.18 .. 3.26) here."""

import ctypes
import functools
import os
import sys

import numpy as np

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

PETSC_ERR_PYTHON = 101
"""The error code PETSc reports for an exception in a Python callback (``PETSC_ERR_PYTHON``)."""

_REAL = ctypes.c_float if PETSc.RealType().itemsize == 4 else ctypes.c_double
_INT = ctypes.c_int64 if PETSc.IntType().itemsize == 8 else ctypes.c_int32
# PETSc reads these real values as "keep the current value" / "use the default" (PETSC_CURRENT,
# PETSC_DETERMINE, as PETSc 3.26 does), not as times.
_SENTINEL_REALS = (-1.0, -2.0)


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


def set_max_time(ts, t_end: float) -> None:
    """``TSSetMaxTime``, also for a final time PETSc would read as one of its sentinels.

    PETSc 3.26 reads a max time of exactly -1 (``PETSC_DETERMINE``) as "the default" and -2
    (``PETSC_CURRENT``) as "keep the current one"; a solve ending at PETSc time -1 (a decreasing
    ``t`` ending at 1) then ran past its last output time. One ulp lower means the same stop:
    PETSc stops once its time is at or past the max time, and pnode's own step control lands the
    last step on ``t_end`` itself.
    """
    value = np.asarray(t_end, dtype=PETSc.RealType)
    if float(value) in _SENTINEL_REALS:
        value = np.nextafter(value, np.asarray(-np.inf, dtype=PETSc.RealType))
    ts.setMaxTime(float(value))


@functools.lru_cache(maxsize=None)
def _petsc_library():
    """petsc4py's extension module as a ctypes library: dlsym through it finds libpetsc's symbols."""
    return ctypes.CDLL(PETSc.__file__)


def _petsc_function(name: str, restype, argtypes):
    """A C function of the libpetsc that petsc4py loaded, or None when this PETSc does not export it."""
    try:
        fn = getattr(_petsc_library(), name)
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _reals(values):
    return None if values is None else (_REAL * len(values))(*values)


def register_rk_tableau(name: str, order: int, a, b, c, b_embedded=None) -> None:
    """``TSRKRegister``: make an explicit Butcher tableau a PETSc RK type (``-ts_rk_type name``).

    petsc4py does not wrap ``TSRKRegister``; the C function is called on the libpetsc petsc4py
    loaded, with PETSc's own real and integer types (float32 in a single-precision build).
    ``a``: the ``s x s`` matrix, row-major (strictly lower triangular); ``b``, ``c``: length ``s``;
    ``b_embedded``: the embedded weights of an adaptive pair, or None. PETSc computes the
    tableau's FSAL property itself. Every rank must register the same tableaus.

    Raises:
        RuntimeError: this PETSc does not export ``TSRKRegister``, or it failed.
    """
    pointer = ctypes.POINTER(_REAL)
    register = _petsc_function("TSRKRegister", ctypes.c_int,
                               [ctypes.c_char_p, _INT, _INT, pointer, pointer, pointer, pointer, _INT, pointer])
    if register is None:
        raise RuntimeError("this PETSc library does not export TSRKRegister")
    error = register(name.encode(), order, len(b), _reals(a), _reals(b), _reals(c), _reals(b_embedded), 0, None)
    if error:
        raise RuntimeError(f"TSRKRegister({name!r}) failed with PETSc error code {error}")


PRE_STAGE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, _REAL)
"""C type of a ``TSSetPreStage`` callback: ``(TS, stage_time) -> PetscErrorCode``."""

ADJOINT_MONITOR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, _INT, _REAL, ctypes.c_void_p, _INT,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
"""C type of a ``TSAdjointMonitorSet`` callback: ``(TS, step, time, u, numcost, lambda, mu, ctx)``."""


def set_pre_stage(ts, callback) -> None:
    """``TSSetPreStage`` (petsc4py does not wrap it): ``callback`` a :data:`PRE_STAGE`, or None to remove.

    The caller keeps ``callback`` alive while it is set.
    """
    fn = _petsc_function("TSSetPreStage", ctypes.c_int, [ctypes.c_void_p, PRE_STAGE])
    if fn is None or fn(ctypes.c_void_p(ts.handle), callback if callback is not None else PRE_STAGE()):
        raise RuntimeError("TSSetPreStage is not available in this PETSc library")


def set_adjoint_monitor(ts, callback) -> None:
    """``TSAdjointMonitorSet`` with a :data:`ADJOINT_MONITOR` (kept alive by the caller), or
    ``TSAdjointMonitorCancel`` when ``callback`` is None (petsc4py wraps neither)."""
    handle = ctypes.c_void_p(ts.handle)
    if callback is None:
        fn = _petsc_function("TSAdjointMonitorCancel", ctypes.c_int, [ctypes.c_void_p])
        error = fn is None or fn(handle)
    else:
        fn = _petsc_function("TSAdjointMonitorSet", ctypes.c_int,
                             [ctypes.c_void_p, ADJOINT_MONITOR, ctypes.c_void_p, ctypes.c_void_p])
        error = fn is None or fn(handle, callback, None, None)
    if error:
        raise RuntimeError("TSAdjointMonitorSet is not available in this PETSc library")
