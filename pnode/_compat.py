"""Import petsc4py once, and keep every difference between petsc4py versions (3.18 .. 3.26) here."""

import ctypes
import functools
import os
import sys
import threading
from typing import Optional

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


_PETSC = None  # the initialised petsc4py.PETSc module, once something used it

PETSC_LOCK = threading.RLock()
"""Held by every pnode call that touches PETSc (and by PETSc's initialisation): PETSc is not thread-safe,
so solves from several threads run one at a time, each whole (see :func:`serialized`)."""


def serialized(fn):
    """``fn`` run under :data:`PETSC_LOCK`: calls from several threads take turns (re-entrant within one)."""
    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with PETSC_LOCK:
            return fn(*args, **kwargs)
    return locked


@serialized
def init(argv=None) -> None:
    """Initialise PETSc for pnode, reading PETSc options from ``argv`` (default: ``sys.argv``).

    pnode calls this itself on first use (the first solve, or the first ``PETSc`` attribute pnode
    reads), so command-line options such as ``-ts_type cn`` reach every solver without any call.
    Call it explicitly to take options from somewhere else, e.g. in a notebook
    ``pnode.init(["-ts_type", "cn"])``. ``argv`` is a list of words like ``sys.argv``; a first word
    that starts with ``-`` is an option, not a program name. When PETSc is already initialised (by
    an earlier call, or by code that imported ``petsc4py.PETSc`` itself), the options are added to
    PETSc's options database instead, where they reach the solvers created afterwards.

    Initialising also applies pnode's BLAS thread policy: the OpenBLAS that PETSc links runs on one
    thread unless ``OPENBLAS_NUM_THREADS`` is set (see :func:`_single_thread_petsc_blas`).
    Importing pnode does neither.
    """
    global _PETSC
    words = list(sys.argv if argv is None else argv)
    if words and str(words[0]).startswith("-"):
        program = sys.argv[0] if sys.argv and sys.argv[0] and not sys.argv[0].startswith("-") else sys.executable
        words.insert(0, program)
    if _PETSC is not None or "petsc4py.PETSc" in sys.modules:
        module = _import_initialised(None)
        if argv is not None and len(words) > 1:
            module.Options().insertString(" ".join(str(word) for word in words[1:]))
    else:
        module = _import_initialised(words)
    if _PETSC is None:
        _PETSC = module
        # later reads of PETSc.X find the real module's attribute directly, without __getattr__
        vars(PETSc).update({name: getattr(module, name) for name in dir(module) if not name.startswith("__")})
        _single_thread_petsc_blas()


def _import_initialised(words):
    """``petsc4py.PETSc``, initialised with ``words`` unless somebody initialised it already."""
    try:
        import petsc4py
    except ImportError as exc:  # pragma: no cover - exercised only without petsc4py
        raise ImportError(_INSTALL_HINT) from exc
    # Importing petsc4py.PETSc initialises PETSc without arguments, after which petsc4py.init() is a
    # no-op: only call it when nobody has imported PETSc yet (else their choice stands).
    if words is not None and "petsc4py.PETSc" not in sys.modules:
        if "-options_left" not in words:
            # the script's own flags (--epochs 10, pytest's -q) are not PETSc's: don't list them at exit
            words = words + ["-options_left", "no"]
        petsc4py.init(_with_device_defaults(words))
    from petsc4py import PETSc as module

    return module


def _with_device_defaults(words):
    """``words`` with ``-use_gpu_aware_mpi 0`` after the program name (first when there is none: petsc4py
    adds it), for a PETSc built with CUDA, unless the command line or ``PETSC_OPTIONS`` sets it.

    On its first use of a GPU, such a PETSc tests whether MPI can read device memory and aborts the
    process when it cannot (Debian's Open MPI cannot), unless told not to rely on it. pnode's
    solves exchange only reductions of host scalars between ranks (no ghost updates of device
    vectors), so they lose nothing without it. Later words override earlier ones in PETSc's
    options, so a ``-use_gpu_aware_mpi 1`` on the command line still wins.
    """
    if not configured_with("PETSC_HAVE_CUDA"):
        return words
    if any("use_gpu_aware_mpi" in str(word) for word in words) or "use_gpu_aware_mpi" in os.environ.get(
            "PETSC_OPTIONS", ""):
        return words
    at = 1 if words and not str(words[0]).startswith("-") else 0  # after the program name, when there is one
    return [*words[:at], "-use_gpu_aware_mpi", "0", *words[at:]]


def petsc():
    """The initialised ``petsc4py.PETSc`` module (initialising it from ``sys.argv`` on first use)."""
    if _PETSC is None:
        init()  # serialized: a second thread waits for the first one's initialisation
    return _PETSC


class _LazyPETSc:
    """Stands for ``petsc4py.PETSc`` in pnode's modules: the first attribute read initialises PETSc.

    ``from ._compat import PETSc`` then costs nothing at import, and ``PETSc.TS()`` behaves as the
    real module's.
    """

    def __getattr__(self, name):
        return getattr(petsc(), name)

    def __repr__(self) -> str:
        return "<petsc4py.PETSc, initialised on first use>" if _PETSC is None else repr(_PETSC)


PETSc = _LazyPETSc()


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


PETSC_ERR_PYTHON = 101
"""The error code PETSc reports for an exception in a Python callback (``PETSC_ERR_PYTHON``)."""

# PETSc reads these real values as "keep the current value" / "use the default" (PETSC_CURRENT,
# PETSC_DETERMINE, as PETSc 3.26 does), not as times.
_SENTINEL_REALS = (-1.0, -2.0)


def petsc_version():
    """PETSc's version, e.g. ``(3, 26, 1)``."""
    return tuple(PETSc.Sys.getVersion())


@functools.lru_cache(maxsize=None)
def petsc_real():
    """ctypes type of PETSc's real."""
    return ctypes.c_float if PETSc.RealType().itemsize == 4 else ctypes.c_double


@functools.lru_cache(maxsize=None)
def petsc_int():
    """ctypes type of PETSc's integer."""
    return ctypes.c_int64 if PETSc.IntType().itemsize == 8 else ctypes.c_int32


def converged_reason_name(reason: int) -> str:
    """Name of a ``TS.ConvergedReason`` value, e.g. -2 -> ``'DIVERGED_STEP_REJECTED'``."""
    for name in dir(PETSc.TS.ConvergedReason):
        if not name.startswith("_") and getattr(PETSc.TS.ConvergedReason, name) == reason:
            return name
    return str(reason)


@functools.lru_cache(maxsize=None)
def configured_with(macro: str) -> bool:
    """Whether the PETSc that petsc4py links defines ``macro`` in its ``petscconf.h``
    (e.g. ``PETSC_HAVE_REVOLVE``); readable before PETSc is initialised."""
    try:
        import petsc4py

        conf = petsc4py.get_config()
        petsc_dir = conf.get("PETSC_DIR", "")
        arch = conf.get("PETSC_ARCH", "") or ""
        for path in (os.path.join(petsc_dir, arch, "include", "petscconf.h"),
                     os.path.join(petsc_dir, "include", "petscconf.h")):
            if os.path.exists(path):
                with open(path) as fh:
                    return f"#define {macro} " in fh.read()
    except Exception:  # pragma: no cover - configuration layout varies between installs
        pass
    return False


def has_revolve() -> bool:
    """Whether this PETSc build was configured with Revolve (needed by ``-ts_trajectory_max_cps_ram``)."""
    return configured_with("PETSC_HAVE_REVOLVE")


@functools.lru_cache(maxsize=None)
def petsc_has_cuda() -> bool:
    """Whether this PETSc was built with CUDA (it can hold vectors on a GPU); True says nothing about
    whether this machine has a GPU."""
    has = getattr(PETSc.Sys, "hasExternalPackage", None)
    return bool(has("cuda")) if has is not None else configured_with("PETSC_HAVE_CUDA")


def set_max_time(ts, t_end: float) -> None:
    """``TSSetMaxTime``, also for a final time PETSc would read as one of its sentinels.

    PETSc 3.26 reads a max time of exactly -1 (``PETSC_DETERMINE``) as "the default" and -2
    (``PETSC_CURRENT``) as "keep the current one"; a solve ending at PETSc time -1 (a decreasing
    ``t`` ending at 1) then ran past its last output time. One ulp lower means the same stop:
    PETSc stops once its time is at or past the max time, and pnode's own step control lands the
    last step on ``t_end`` itself. An infinite ``t_end`` (an event search without a limit) is the
    largest real: PETSc's options refuse an infinite current value.
    """
    value = np.asarray(min(t_end, float(np.finfo(PETSc.RealType).max)), dtype=PETSc.RealType)
    if float(value) in _SENTINEL_REALS:
        value = np.nextafter(value, np.asarray(-np.inf, dtype=PETSc.RealType))
    ts.setMaxTime(float(value))


@functools.lru_cache(maxsize=None)
def _petsc_library():
    """petsc4py's extension module as a ctypes library: dlsym through it finds libpetsc's symbols."""
    return ctypes.CDLL(PETSc.__file__)


def petsc_function(name: str, restype, argtypes):
    """A C function of the libpetsc that petsc4py loaded, or None when this PETSc does not export it."""
    try:
        fn = getattr(_petsc_library(), name)
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _reals(values):
    return None if values is None else (petsc_real() * len(values))(*values)


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
    pointer, integer = ctypes.POINTER(petsc_real()), petsc_int()
    register = petsc_function("TSRKRegister", ctypes.c_int, [ctypes.c_char_p, integer, integer, pointer, pointer,
                                                              pointer, pointer, integer, pointer])
    if register is None:
        raise RuntimeError("this PETSc library does not export TSRKRegister")
    error = register(name.encode(), order, len(b), _reals(a), _reals(b), _reals(c), _reals(b_embedded), 0, None)
    if error:
        raise RuntimeError(f"TSRKRegister({name!r}) failed with PETSc error code {error}")


@functools.lru_cache(maxsize=None)
def pre_stage_type():
    """C type of a ``TSSetPreStage`` callback: ``(TS, stage_time) -> PetscErrorCode``."""
    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, petsc_real())


@functools.lru_cache(maxsize=None)
def adjoint_monitor_type():
    """C type of a ``TSAdjointMonitorSet`` callback: ``(TS, step, time, u, numcost, lambda, mu, ctx)``."""
    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, petsc_int(), petsc_real(), ctypes.c_void_p, petsc_int(),
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def set_pre_stage(ts, callback) -> None:
    """``TSSetPreStage`` (petsc4py does not wrap it): ``callback`` a :func:`pre_stage_type`, or None to remove.

    The caller keeps ``callback`` alive while it is set.
    """
    hook_type = pre_stage_type()
    fn = petsc_function("TSSetPreStage", ctypes.c_int, [ctypes.c_void_p, hook_type])
    if fn is None or fn(ctypes.c_void_p(ts.handle), callback if callback is not None else hook_type()):
        raise RuntimeError("TSSetPreStage is not available in this PETSc library")


def set_adjoint_monitor(ts, callback) -> None:
    """``TSAdjointMonitorSet`` with a :func:`adjoint_monitor_type` (kept alive by the caller), or
    ``TSAdjointMonitorCancel`` when ``callback`` is None (petsc4py wraps neither)."""
    handle = ctypes.c_void_p(ts.handle)
    if callback is None:
        fn = petsc_function("TSAdjointMonitorCancel", ctypes.c_int, [ctypes.c_void_p])
        error = fn is None or fn(handle)
    else:
        fn = petsc_function("TSAdjointMonitorSet", ctypes.c_int,
                             [ctypes.c_void_p, adjoint_monitor_type(), ctypes.c_void_p, ctypes.c_void_p])
        error = fn is None or fn(handle, callback, None, None)
    if error:
        raise RuntimeError("TSAdjointMonitorSet is not available in this PETSc library")


@functools.lru_cache(maxsize=None)
def post_evaluate_type():
    """C type of a ``TSSetPostEvaluate`` callback: ``(TS) -> PetscErrorCode``."""
    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def set_post_evaluate(ts, callback) -> None:
    """``TSSetPostEvaluate`` (petsc4py does not wrap it): ``callback`` a :func:`post_evaluate_type`,
    or None to remove it. PETSc calls it after each step is evaluated, before the step is recorded
    in the trajectory or handed to the post-step hook, so a step rolled back there leaves no trace.

    The caller keeps ``callback`` alive while it is set.
    """
    hook_type = post_evaluate_type()
    fn = petsc_function("TSSetPostEvaluate", ctypes.c_int, [ctypes.c_void_p, hook_type])
    if fn is None or fn(ctypes.c_void_p(ts.handle), callback if callback is not None else hook_type()):
        raise RuntimeError("TSSetPostEvaluate is not available in this PETSc library")


def set_always_accept(ts, flag: bool) -> None:
    """``TSAdaptSetAlwaysAccept`` on the TS's adaptor: accept every step whatever its error estimate
    (a step whose size pnode has already chosen must not be retried smaller)."""
    adapt = ctypes.c_void_p()
    get_adapt = petsc_function("TSGetAdapt", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)])
    always = petsc_function("TSAdaptSetAlwaysAccept", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int])
    if get_adapt is None or always is None or get_adapt(ctypes.c_void_p(ts.handle), ctypes.byref(adapt)) \
            or always(adapt, int(flag)):
        raise RuntimeError("TSAdaptSetAlwaysAccept is not available in this PETSc library")


def _trajectory_handle(ts) -> Optional[ctypes.c_void_p]:
    """The TS's ``TSTrajectory`` (``TSGetTrajectory``), or None when it has none or PETSc lacks the call."""
    trajectory = ctypes.c_void_p()
    get = petsc_function("TSGetTrajectory", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)])
    if get is None or get(ctypes.c_void_p(ts.handle), ctypes.byref(trajectory)) or not trajectory.value:
        return None
    return trajectory


def trajectory_from_options(ts) -> None:
    """``TSTrajectorySetFromOptions`` on the TS's trajectory (petsc4py wraps neither it nor
    ``TSGetTrajectory``): a new trajectory reads its options without the TS re-reading all of its own
    (``TSSetFromOptions``, several times the cost). Falls back to ``ts.setFromOptions()``."""
    trajectory = _trajectory_handle(ts)
    setup = petsc_function("TSTrajectorySetFromOptions", ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p])
    if trajectory is None or setup is None:
        ts.setFromOptions()
        return
    if setup(trajectory, ctypes.c_void_p(ts.handle)):
        raise RuntimeError("TSTrajectorySetFromOptions failed")


def save_trajectory(ts) -> None:
    """``TSSetSaveTrajectory`` with the TS's options prefix given to the new trajectory.

    PETSc creates the trajectory without a prefix; without this, ``-<prefix>ts_trajectory_type memory``
    (pnode's default) and every other prefixed trajectory option would go unread, and a prefixed solve
    (an :class:`pnode.ODEBlock` with ``prefix``) would store its steps in files through PETSc's default
    ``basic`` trajectory, gathered to rank 0 under MPI. Call it after the TS's prefix is set."""
    ts.setSaveTrajectory()
    prefix = ts.getOptionsPrefix()
    trajectory = _trajectory_handle(ts)
    set_prefix = petsc_function("PetscObjectSetOptionsPrefix", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p])
    if prefix and trajectory is not None and set_prefix is not None and set_prefix(trajectory, prefix.encode()):
        raise RuntimeError("PetscObjectSetOptionsPrefix failed on the TS's trajectory")


def trajectory_type(ts) -> Optional[str]:
    """The type of the TS's trajectory (``'memory'``, ``'basic'``, ...), or None without one."""
    trajectory = _trajectory_handle(ts)
    get_type = petsc_function("PetscObjectGetType", ctypes.c_int,
                              [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p)])
    name = ctypes.c_char_p()
    if trajectory is None or get_type is None or get_type(trajectory, ctypes.byref(name)) or not name.value:
        return None
    return name.value.decode()
