"""The solver pool: solvers built once per configuration and shape, reused, and evicted by bytes.

A forward pass that will be differentiated takes a solver out of the pool and its backward pass
puts it back, so two ODE blocks of the same shape in one network never share a trajectory. Idle
solvers are kept least-recently-used first; when their PETSc vectors
(:attr:`pnode._impl.solver.Solver.held_bytes`) exceed the pool's limit, the oldest are destroyed. The
limit is 1 GB by default, ``PNODE_POOL_BYTES`` in the environment or :func:`set_pool_limit`
change it, and :func:`clear_cache` empties the pool.

Every solver the pool built is destroyed when the interpreter exits, while Python can still run
the callbacks its PETSc objects hold (shell matrices with Python contexts). Left to the end,
PETSc's own finalisation (after Python's) would destroy them and call into a finished interpreter.
"""

import atexit
import itertools
import os
import sys
import weakref
from collections import OrderedDict
from typing import List, Tuple

from .._compat import PETSc, serialized
from ..distributed import check_consistent, comm_key, local_sizes
from .bridge import vec_device
from .budget import parse_bytes
from .options import database_fingerprint
from .solver import Solver

_idle: "OrderedDict[tuple, List[Solver]]" = OrderedDict()
_limit = [parse_bytes(os.environ.get("PNODE_POOL_BYTES", "1GB"), "PNODE_POOL_BYTES")]
# every solver built, idle or in use by a graph not yet backpropagated, by creation number (the same
# order on every rank: destroying is collective)
_built: "weakref.WeakValueDictionary[int, Solver]" = weakref.WeakValueDictionary()
_serial = itertools.count()


def pool_key(problem, param_size: int, record: bool) -> tuple:
    return (problem.config, local_sizes(problem.comm, problem.layout.numel), param_size, comm_key(problem.comm),
            record, database_fingerprint(), vec_device(problem.layout.device))


def acquire_solver(problem, param_size: int, record: bool) -> Tuple[tuple, Solver]:
    """A solver for ``problem`` from the pool (built on first use); return it with :func:`release_solver`."""
    key = pool_key(problem, param_size, record)
    check_consistent(problem.comm, "the solve", (problem.config, problem.taus.tobytes(), param_size,
                                                 str(problem.layout.dtype), record))
    idle = _idle.get(key)
    if idle:
        solver = idle.pop()
        if not idle:
            del _idle[key]
        return key, solver
    solver = Solver(problem.config, problem.layout.numel, param_size, problem.comm, record,
                    vec_device(problem.layout.device))
    _built[next(_serial)] = solver
    return key, solver


def release_solver(key: tuple, solver: Solver) -> None:
    """Put ``solver`` back (most recently used), then evict the oldest idle solvers beyond the limit."""
    solver.detach()
    _idle.setdefault(key, []).append(solver)
    _idle.move_to_end(key)
    _evict(_limit[0])


def _evict(limit: int) -> None:
    while _idle and pool_bytes() > limit:
        key = next(iter(_idle))
        solvers = _idle[key]
        solvers.pop(0).destroy()
        if not solvers:
            del _idle[key]


def pool_bytes() -> int:
    """Bytes of PETSc vectors the idle solvers hold (their estimate, :attr:`Solver.held_bytes`)."""
    return sum(s.held_bytes for solvers in _idle.values() for s in solvers)


def pooled_solvers() -> int:
    return sum(len(solvers) for solvers in _idle.values())


def set_pool_limit(limit) -> None:
    """Keep at most ``limit`` bytes of idle solvers (an int, or text such as ``'512MB'``); evicts now."""
    _limit[0] = parse_bytes(limit, "the pool limit")
    _evict(_limit[0])


@serialized
def clear_cache() -> None:
    """Destroy every idle pooled solver (their PETSc objects and vectors); the next call builds anew."""
    _evict(-1)


@atexit.register
def destroy_all_solvers() -> None:
    """Destroy every solver the pool built, idle or still held by an autograd graph, in the order
    they were built (at exit). Nothing is left to do once PETSc is finalised (a script that
    finalised PETSc or MPI itself): destroying would then abort."""
    _idle.clear()
    solvers = [s for s in (_built.get(serial) for serial in sorted(_built.keys())) if s is not None]
    if solvers and not _finalized():
        for solver in solvers:
            solver.destroy()


def _finalized() -> bool:
    if PETSc.Sys.isFinalized():
        return True
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_finalized()
