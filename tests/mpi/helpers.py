"""Rank script: pnode.distributed's helpers, and solves whose ranks disagree, on two ranks.

Each check stores what it observed under a name; test_mpi.py compares that with the expected
value, so a failure names the helper and shows what it returned. For the disagreements, rank 0
and rank 1 each make a call that differs in one respect (the method, the output times, the
parameter count) and record what they raised; a final agreeing call checks that the ranks can
go on solving together afterwards.
"""

import contextlib
import io

import torch
from mpi4py import MPI
from problems import MLPField
from rankutil import COMM, RANK, SIZE, write_results

import pnode
from pnode import distributed as dist
from pnode._compat import PETSc

T = torch.tensor([0.0, 1.0], dtype=torch.float64)


def outcome(call):
    """The type and message of the pnode error ``call`` raised on this rank (None, '' if none)."""
    try:
        call()
    except pnode.PnodeError as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}


def solve(method="rk4", t=T, func=None):
    func = func or MLPField().double()
    y0 = torch.randn(2 + RANK, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 0.25}, comm=dist.world())
    ys[-1].sum().backward()


def disagreement_checks():
    torch.manual_seed(0)
    return {"method": outcome(lambda: solve(method=("rk4", "euler")[RANK])),
            "times": outcome(lambda: solve(t=(T, torch.tensor([0.0, 0.5], dtype=torch.float64))[RANK])),
            "parameters": outcome(lambda: solve(func=MLPField(hidden=8 + RANK).double())),
            "agreeing": outcome(solve)}


def gradient_checks():
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float32))
    unused = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.full((2, 3), float(RANK + 1))
    b.grad = torch.arange(4, dtype=torch.float32) * (RANK + 1)
    dist.average_gradients([a, b, unused])
    averaged = {"a": a.grad.tolist(), "b": b.grad.tolist(), "unused_grad_is_none": unused.grad is None}
    dist.sum_gradients([a, b])
    summed = {"a": a.grad.tolist(), "b": b.grad.tolist()}
    mismatched = torch.nn.Parameter(torch.zeros(2 + RANK))
    mismatched.grad = torch.ones(2 + RANK)
    return {"averaged": averaged, "summed_after_averaging": summed,
            "mismatched_error": outcome(lambda: dist.average_gradients([mismatched]))}


def broadcast_checks():
    torch.manual_seed(100 + RANK)  # different weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()(torch.randn(5 + RANK, 3))  # rank-dependent running statistics and counter
    # 6 bytes of float16 first: the float32 and int64 buffers after it sit at unaligned offsets
    model.register_buffer("scale", torch.full((3,), 0.5 + RANK, dtype=torch.float16))
    before = {name: t.tolist() for name, t in model.state_dict().items()}
    dist.broadcast_parameters(model, COMM)
    after = {name: t.tolist() for name, t in model.state_dict().items()}
    other = torch.nn.Linear(3, 4 + RANK)
    return {"before_by_rank": COMM.allgather(before), "after_by_rank": COMM.allgather(after),
            "mismatched_error": outcome(lambda: dist.broadcast_parameters(other))}


def dataset_checks():
    data = list(range(10, 15))  # 5 items on 2 ranks
    shuffled = dist.shard_dataset(data, shuffle=True, seed=3)
    return {"padded": list(dist.shard_dataset(data)),
            "drop_last": list(dist.shard_dataset(data, drop_last=True)),
            "shuffled_by_rank": COMM.allgather(list(shuffled)),
            "tiny_by_rank": COMM.allgather(list(dist.shard_dataset([7]))),
            "shard": [dist.shard(5).start, dist.shard(5).stop]}


def metric_checks():
    summed = dist.gather_metrics({"correct": RANK + 1, "seen": 10})
    averaged = dist.gather_metrics({"loss": 2.0 * (RANK + 1)}, average=True)
    return {"sum": summed, "average": averaged,
            "allreduce_sum": dist.allreduce_sum(RANK + 1), "allreduce_mean": dist.allreduce_mean(RANK + 1.0),
            "mismatched_error": outcome(lambda: dist.gather_metrics({f"m{RANK}": 1.0}))}


def main():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dist.print0("hello from", RANK)
    results = {
        "rank_size": {"none": [dist.rank(), dist.size()], "mpi4py": [dist.rank(MPI.COMM_WORLD), dist.size(COMM)],
                      "petsc": [dist.rank(PETSc.COMM_WORLD), dist.size(PETSc.COMM_WORLD)], "mpi": [RANK, SIZE]},
        "print0": out.getvalue(),
        "seeds": {"per_rank": dist.seed_everything(5), "shared": dist.seed_everything(5, per_rank=False)},
        "gradients": gradient_checks(),
        "broadcast": broadcast_checks(),
        "datasets": dataset_checks(),
        "metrics": metric_checks(),
        "disagree": disagreement_checks(),
    }
    write_results(results)


if __name__ == "__main__":
    main()
