"""Distributed helpers: communicators, rank-consistency checks, gradient averaging, rank-0 logging.

With a communicator of several ranks, each rank passes its shard of the state (its part of the
batch) and the ranks integrate one distributed PETSc system: one step-size sequence, one Newton
solve over the whole state, one trajectory per rank for its part.
"""

import hashlib
import pickle
from typing import Iterable, Optional

import torch

from ._compat import PETSc
from .errors import InputError


def resolve_comm(comm=None):
    """A ``PETSc.Comm`` for ``comm`` (None: ``COMM_SELF``; an mpi4py or petsc4py communicator)."""
    if comm is None:
        return PETSc.COMM_SELF
    if isinstance(comm, PETSc.Comm):
        return comm
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover - mpi4py is installed with pnode's set-up
        MPI = None
    if MPI is not None and isinstance(comm, MPI.Comm):
        return PETSc.Comm(comm)
    raise InputError(f"comm must be an mpi4py or petsc4py communicator (or None), got {type(comm).__name__}")


def comm_key(comm) -> int:
    """A hashable identity of a communicator (its Fortran handle)."""
    handle = getattr(comm, "fortran", None)
    return int(handle) if handle is not None else int(comm.tompi4py().py2f())


def check_consistent(comm, what: str, signature) -> None:
    """Raise the same clear error on every rank if ``signature`` differs between ranks.

    Collective over ``comm``: every rank must call it, which the pnode entry points guarantee.
    """
    if comm.getSize() == 1:
        return
    digest = hashlib.sha1(pickle.dumps(signature)).hexdigest()
    digests = comm.tompi4py().allgather(digest)
    if len(set(digests)) > 1:
        signatures = comm.tompi4py().allgather(signature)
        lines = "; ".join(f"rank {rank}: {sig}" for rank, sig in enumerate(signatures))
        raise InputError(f"ranks disagree on {what}: {lines}. Every rank must call pnode with the same "
                         "method, options, output times, dtype and parameter shapes (only the batch may differ)")


def world():
    """``PETSc.COMM_WORLD`` (the communicator of ``mpirun``)."""
    return PETSc.COMM_WORLD


def rank(comm=None) -> int:
    return (comm or PETSc.COMM_WORLD).getRank()


def size(comm=None) -> int:
    return (comm or PETSc.COMM_WORLD).getSize()


def average_gradients(parameters: Iterable[torch.Tensor], comm=None) -> None:
    """Average ``p.grad`` over the ranks of ``comm`` in place (for training without DDP)."""
    comm = resolve_comm(comm or PETSc.COMM_WORLD)
    n = comm.getSize()
    if n == 1:
        return
    mpi = comm.tompi4py()
    from mpi4py import MPI

    for p in parameters:
        if p.grad is None:
            continue
        buf = p.grad.detach().to("cpu", torch.float64).contiguous()
        mpi.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
        p.grad.copy_(buf.div_(n))


def print0(*args, comm=None, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if rank(comm) == 0:
        print(*args, **kwargs)


def shard(n_items: int, comm=None) -> range:
    """The contiguous index range of ``n_items`` owned by this rank (sizes differ by at most one)."""
    n, r = size(comm), rank(comm)
    base, extra = divmod(n_items, n)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def seed_everything(seed: int, comm=None, per_rank: bool = True) -> int:
    """Seed torch (and NumPy) with ``seed`` (+ rank if ``per_rank``); returns the seed used."""
    import numpy as np

    used = seed + (rank(comm) if per_rank else 0)
    torch.manual_seed(used)
    np.random.seed(used % 2**32)
    return used


def allreduce_sum(value: float, comm: Optional[object] = None) -> float:
    """Sum a Python number over the ranks of ``comm``."""
    comm = resolve_comm(comm or PETSc.COMM_WORLD)
    if comm.getSize() == 1:
        return value
    return comm.tompi4py().allreduce(value)
