"""Distributed helpers: communicators, rank-consistency checks, gradient reduction, data sharding,
parameter broadcast, metric reduction, rank-0 logging and torch.distributed start-up under mpirun.

With a communicator of several ranks, each rank passes its shard of the state (its part of the
batch) and the ranks integrate one distributed PETSc system: one step-size sequence, one Newton
solve over the whole state, one trajectory per rank for its part.

The helpers take ``comm`` as an mpi4py or petsc4py communicator; ``None`` means
``COMM_WORLD`` (all ranks of ``mpirun``). Every helper that communicates is collective: all ranks
of ``comm`` must call it, in the same order.
"""

import dataclasses
import hashlib
import math
import os
import pickle
import socket
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import Subset

from ._compat import PETSc
from ._impl.errors import InputError


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


def local_sizes(comm, local_size: int) -> Tuple[int, ...]:
    """Every rank's local size, in rank order (collective). A solver fits a call only if all match.

    Keying solvers on the local size alone would let one rank build a new solver (collective)
    while another reuses its old one, and both would wait for ever.
    """
    if comm.getSize() == 1:
        return (local_size,)
    return tuple(comm.tompi4py().allgather(local_size))


_SOLVE_HINT = ("Every rank must call pnode with the same method, options, output times, dtype and parameter "
               "shapes (only the batch may differ)")


def check_consistent(comm, what: str, signature, hint: str = _SOLVE_HINT) -> None:
    """Raise the same clear error on every rank if ``signature`` differs between ranks.

    Collective over ``comm``: every rank must call it, which the pnode entry points guarantee.
    The message names only the parts that differ: the keys of a dict, the fields of a dataclass
    and the positions of a tuple or list are compared one by one (``'output times: rank 0:
    [0.0, 1.0]; rank 1: [0.0, 0.5]'``); ``hint`` says what to do about it.
    """
    if comm.getSize() == 1:
        return
    digest = hashlib.sha1(pickle.dumps(signature)).hexdigest()
    digests = comm.tompi4py().allgather(digest)
    if len(set(digests)) > 1:
        signatures = comm.tompi4py().allgather(signature)
        differences = _differences(signatures, "") or [_by_rank(signatures)]
        raise InputError(f"ranks disagree on {what}: {'; '.join(differences)}. {hint}")


def _differences(values: list, path: str) -> List[str]:
    """``'path: rank 0: a; rank 1: b'`` for each part of ``values`` (one per rank) that differs.

    Dicts (by key) and dataclasses (by field) are compared part by part, and so is the outermost
    tuple or list (by position); anything else is compared whole. A dataclass whose ``name``
    differs is reported by that name alone.
    """
    first = values[0]
    if all(isinstance(v, dict) for v in values) and all(v.keys() == first.keys() for v in values):
        parts = [(_child(path, str(key)), [v[key] for v in values]) for key in first]
    elif dataclasses.is_dataclass(first) and all(type(v) is type(first) for v in values):
        names = [getattr(v, "name", None) for v in values]
        fields = ["name"] if len(set(names)) > 1 else [f.name for f in dataclasses.fields(first)]
        parts = [(_child(path, name), [getattr(v, name) for v in values]) for name in fields]
    elif not path and all(isinstance(v, (tuple, list)) for v in values) and len({len(v) for v in values}) == 1:
        parts = [(f"[{i}]", [v[i] for v in values]) for i in range(len(first))]
    elif len({pickle.dumps(v) for v in values}) == 1:
        return []
    else:
        return [f"{path}: {_by_rank(values)}" if path else _by_rank(values)]
    return [difference for child, part in parts for difference in _differences(part, child)]


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _by_rank(values: list) -> str:
    return "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))


def world():
    """``PETSc.COMM_WORLD`` (the communicator of ``mpirun``)."""
    return PETSc.COMM_WORLD


def _helper_comm(comm):
    """The ``PETSc.Comm`` a helper works on: ``comm`` (mpi4py or petsc4py), or COMM_WORLD for None."""
    return PETSc.COMM_WORLD if comm is None else resolve_comm(comm)


def rank(comm=None) -> int:
    """This process's rank in ``comm`` (default COMM_WORLD)."""
    return _helper_comm(comm).getRank()


def size(comm=None) -> int:
    """The number of ranks of ``comm`` (default COMM_WORLD)."""
    return _helper_comm(comm).getSize()


def average_gradients(parameters: Iterable[torch.Tensor], comm=None) -> None:
    """Average ``p.grad`` over the ranks of ``comm`` in place (for training without DDP).

    Right when each rank's loss is the mean over its own batch and every rank's batch has the same
    size. Parameters without a gradient are skipped; every rank must have gradients for the same
    parameters (``InputError`` on every rank otherwise). The reduction runs in float64, in one
    message.
    """
    _reduce_gradients(parameters, comm, average=True)


def sum_gradients(parameters: Iterable[torch.Tensor], comm=None) -> None:
    """Sum ``p.grad`` over the ranks of ``comm`` in place.

    Right when each rank's loss is its share of the global loss, e.g. the sum over its rows
    divided by the global batch size (which also covers batches of different sizes per rank).
    """
    _reduce_gradients(parameters, comm, average=False)


def _reduce_gradients(parameters: Iterable[torch.Tensor], comm, average: bool) -> None:
    comm = _helper_comm(comm)
    n = comm.getSize()
    if n == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    check_consistent(comm, "the gradients to reduce", [tuple(g.shape) for g in grads],
                     "Every rank must have gradients for the same parameters: the same model, and a "
                     "backward pass on every rank before the reduction")
    if not grads:
        return
    from mpi4py import MPI

    flat = torch.cat([g.detach().reshape(-1).to("cpu", torch.float64) for g in grads])
    comm.tompi4py().Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    if average:
        flat.div_(n)
    for grad, chunk in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        grad.copy_(chunk.view(grad.shape))


def broadcast_parameters(module: torch.nn.Module, comm=None, root: int = 0) -> None:
    """Overwrite ``module``'s parameters and buffers with those of rank ``root``, in place.

    Call it once after building the model (and before building the optimizer's state) so every
    rank starts from the same weights when training without DDP (DDP broadcasts by itself). Every
    rank must hold a module of the same structure (``InputError`` on every rank otherwise).
    """
    comm = _helper_comm(comm)
    if comm.getSize() == 1:
        return
    tensors = list(module.parameters()) + list(module.buffers())
    check_consistent(comm, "the module's parameters and buffers",
                     [(tuple(t.shape), str(t.dtype)) for t in tensors],
                     "Every rank must build the same model before broadcasting its parameters")
    if not tensors:
        return
    # Bytes, so that every dtype (bfloat16, int64 counters) travels in one message unchanged.
    parts = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    payload = torch.cat(parts)
    comm.tompi4py().Bcast(payload.numpy(), root=root)
    with torch.no_grad():
        for tensor, chunk in zip(tensors, torch.split(payload, [p.numel() for p in parts])):
            # clone: a chunk's offset in the payload need not be aligned for ``tensor.dtype``
            tensor.copy_(chunk.clone().view(tensor.dtype).view(tensor.shape))


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


def shard_dataset(dataset, comm=None, shuffle: bool = False, seed: int = 0,
                  drop_last: bool = False) -> Subset:
    """This rank's part of ``dataset``, the same size on every rank (like ``DistributedSampler``).

    Items are dealt out round-robin (rank ``r`` gets items ``r, r + size, ...`` of the order), so
    a dataset sorted by class still gives every rank every class. To make the parts equal, the
    order is padded by repeating its first items (``drop_last=False``: every item is used at
    least once) or cut to a multiple of the number of ranks (``drop_last=True``: no item is used
    twice). Equal parts keep per-rank batches equal, which averaged gradients (DDP,
    :func:`average_gradients`) assume.

    Args:
        dataset: anything with ``len`` and integer indexing (a ``torch.utils.data.Dataset``).
        shuffle: deal out a random permutation (the same on every rank, from ``seed``) instead of
            ``0 .. len - 1``. Reshuffling inside a rank's part each epoch is the ``DataLoader``'s job.

    Returns:
        a ``torch.utils.data.Subset`` of ``ceil(len / size)`` items (``floor`` with ``drop_last``).
    """
    n, r = size(comm), rank(comm)
    total = len(dataset)
    if shuffle:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(total)
    per_rank = total // n if drop_last else math.ceil(total / n)
    if per_rank * n > total:
        order = order.repeat(math.ceil(per_rank * n / total))
    order = order[:per_rank * n]
    return Subset(dataset, order[r::n].tolist())


def seed_everything(seed: int, comm=None, per_rank: bool = True) -> int:
    """Seed torch (and NumPy) with ``seed`` (+ rank if ``per_rank``); returns the seed used."""
    import numpy as np

    used = seed + (rank(comm) if per_rank else 0)
    torch.manual_seed(used)
    np.random.seed(used % 2**32)
    return used


def allreduce_sum(value: float, comm: Optional[object] = None) -> float:
    """Sum a Python number over the ranks of ``comm``."""
    comm = _helper_comm(comm)
    if comm.getSize() == 1:
        return value
    return comm.tompi4py().allreduce(value)


def allreduce_mean(value: float, comm: Optional[object] = None) -> float:
    """Average a Python number over the ranks of ``comm`` (e.g. a per-rank time or loss)."""
    return allreduce_sum(value, comm) / size(comm)


def gather_metrics(metrics: Mapping[str, float], comm=None, average: bool = False,
                   op: str = "sum") -> Dict[str, float]:
    """Reduce each value of ``metrics`` over the ranks, in one message: their sum (``op='sum'``; with
    ``average``, the sum over the number of ranks) or their largest (``op='max'``, e.g. peak memory).

    For accuracy over the whole data set, reduce counts and divide afterwards::

        m = gather_metrics({"correct": correct, "seen": seen, "loss_sum": loss_sum})
        print0(f"acc {m['correct'] / m['seen']:.4f} loss {m['loss_sum'] / m['seen']:.4f}")

    Every rank must pass the same keys (``InputError`` on every rank otherwise); the result is
    the same on every rank.
    """
    if op not in ("sum", "max") or (average and op != "sum"):
        raise InputError(f"gather_metrics: op must be 'sum' or 'max' (average only with 'sum'), got op={op!r}, "
                         f"average={average}")
    comm = _helper_comm(comm)
    names = sorted(metrics)
    values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64)
    if comm.getSize() > 1:
        from mpi4py import MPI

        check_consistent(comm, "the metric names", names, "Every rank must pass the same metric names")
        comm.tompi4py().Allreduce(MPI.IN_PLACE, values.numpy(), op=MPI.SUM if op == "sum" else MPI.MAX)
        if average:
            values.div_(comm.getSize())
    return dict(zip(names, values.tolist()))


def init_torch_distributed(backend: str = "gloo", comm=None) -> None:
    """Start ``torch.distributed`` on the ranks of ``comm`` (default COMM_WORLD), e.g. for DDP.

    Under ``mpirun`` nothing sets torch's variables, so this sets them from the communicator:
    ``RANK`` and ``WORLD_SIZE`` (rank and size of ``comm``), ``MASTER_ADDR`` (kept if set, else
    ``127.0.0.1`` when all ranks share one host, rank 0's host name otherwise) and ``MASTER_PORT``
    (kept if set, else a free port found on rank 0 and broadcast), then calls
    ``torch.distributed.init_process_group(backend, init_method='env://')``.
    """
    import torch.distributed as dist
    from mpi4py import MPI

    mpi = _helper_comm(comm).tompi4py()
    hosts = mpi.allgather(MPI.Get_processor_name())
    choice = None
    if mpi.Get_rank() == 0:  # rank 0 decides, so ranks with different environments still agree
        choice = (os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0]),
                  os.environ.get("MASTER_PORT") or str(_free_port()))
    address, port = mpi.bcast(choice)
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=port, RANK=str(mpi.Get_rank()),
                      WORLD_SIZE=str(mpi.Get_size()))
    dist.init_process_group(backend, init_method="env://", rank=mpi.Get_rank(), world_size=mpi.Get_size())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
