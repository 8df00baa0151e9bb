"""Rank script: data-parallel training with an ODEBlock gives the single-process full-batch result.

The model is Linear -> ODEBlock(MLPField) -> Linear with a cross-entropy loss. Every rank builds
the whole batch (same seed) and trains on its rows for a few SGD steps, in each of these ways:

* ``ddp_distributed``: ``ODEBlock(comm=world())`` inside ``DistributedDataParallel``. pnode gives
  each rank its local contribution to the ODE's parameter gradient of the summed per-rank losses;
  DDP divides the sum over ranks by their number, so per-rank mean losses over equal batches give
  the gradient of the global mean loss.
* ``ddp_independent``: ``ODEBlock(comm=None)`` inside DDP: every rank integrates its own ODE on
  its rows (its own adaptive steps); DDP averages the per-rank gradients.
* ``allreduce_distributed``: no DDP: ``broadcast_parameters`` from rank 0 (the ranks start from
  different weights) and ``average_gradients`` after each backward pass.
* ``*_uneven``: 6 + 5 rows; each rank's loss is its rows' summed loss divided by the global batch
  size, then ``sum_gradients`` (or, under DDP, that loss times the number of ranks).

The reference trains one model in one process on the whole batch (comm=None) with the global mean
loss; for ``ddp_independent`` with the adaptive ``dopri5`` it solves each rank's rows separately,
as the ranks do, since each rank's steps are its own.
"""

import gc
import os

import torch
import torch.nn.functional as F
from problems import MLPField
from rankutil import COMM, RANK, SIZE, local_rows, rel_err, write_results
from torch.nn.parallel import DistributedDataParallel

import pnode
from pnode.distributed import (
    average_gradients,
    broadcast_parameters,
    init_torch_distributed,
    shard,
    sum_gradients,
    world,
)

METHODS = {
    "rk4": {"method": "rk4", "options": {"step_size": 0.25}},
    "dopri5": {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8},
    "cn": {"method": "cn", "options": {"step_size": 0.5, "ksp_rtol": 1e-13, "ksp_atol": 1e-15,
                                       "snes_rtol": 1e-13, "snes_atol": 1e-15, "snes_stol": 0}},
}
N_EVEN, N_UNEVEN = 8, 11  # 4 + 4 and 6 + 5 rows: every rank's size changes between the two
STEPS, LR = 2, 0.5


class Net(torch.nn.Module):
    def __init__(self, solve_kwargs, comm):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 3)
        self.ode = pnode.ODEBlock(MLPField(3, 8), t=(0.0, 1.0), comm=comm, **solve_kwargs)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.ode(self.encoder(x)))


def make_model(name, comm, seed):
    torch.manual_seed(seed)
    return Net(METHODS[name], comm).double()


def make_data(n_rows):
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(n_rows, 4, dtype=torch.float64, generator=generator),
            torch.randint(0, 2, (n_rows,), generator=generator))


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def train(model, local_loss, reduce=None):
    """``STEPS`` plain gradient-descent steps; returns (first gradient, parameters after the last).

    (torch.optim would do the same, but its first use imports torch._dynamo: seconds per rank.)
    """
    params = list(model.parameters())
    first_grad = None
    for _ in range(STEPS):
        for p in params:
            p.grad = None
        local_loss(model).backward()
        if reduce is not None:
            reduce(params)
        if first_grad is None:
            first_grad = flat(p.grad for p in params)
        with torch.no_grad():
            for p in params:
                p -= LR * p.grad
    return first_grad, flat(params)


def reference(name, n_rows, row_groups):
    """One process: the global mean loss, each group of rows solved as its own ODE."""
    x, y = make_data(n_rows)

    def loss(model):
        return sum(F.cross_entropy(model(x[rows]), y[rows], reduction="sum") for rows in row_groups) / n_rows

    return train(make_model(name, None, seed=0), loss)


def compare(got, want):
    (grad, params), (ref_grad, ref_params) = got, want
    return {"first_grad": rel_err(grad, ref_grad), "params": rel_err(params, ref_params),
            "params_differ_between_ranks": max(float((p - params).abs().max()) for p in COMM.allgather(params))}


def ddp_distributed(name, x, y, full):
    rows = local_rows(len(x))
    got = train(DistributedDataParallel(make_model(name, world(), seed=0)),
                lambda model: F.cross_entropy(model(x[rows]), y[rows]))
    return compare(got, full)


def ddp_independent(name, x, y, full):
    rows = local_rows(len(x))
    got = train(DistributedDataParallel(make_model(name, None, seed=0)),
                lambda model: F.cross_entropy(model(x[rows]), y[rows]))
    rank_rows = [slice(r.start, r.stop) for r in COMM.allgather(shard(len(x)))]
    own_steps = reference(name, len(x), rank_rows) if METHODS[name].get("method") == "dopri5" else full
    return {**compare(got, own_steps), "vs_full_batch_params": rel_err(got[1], full[1])}


def allreduce_distributed(name, x, y, full):
    rows = local_rows(len(x))
    model = make_model(name, world(), seed=RANK)
    broadcast_parameters(model)
    got = train(model, lambda model: F.cross_entropy(model(x[rows]), y[rows]), average_gradients)
    return compare(got, full)


def share_of_loss(x, y):
    """This rank's rows' summed loss over the global batch size: the ranks' shares add up to the mean."""
    rows = local_rows(len(x))
    return lambda model: F.cross_entropy(model(x[rows]), y[rows], reduction="sum") / len(x)


def allreduce_distributed_uneven(name, x, y, full):
    return compare(train(make_model(name, world(), seed=0), share_of_loss(x, y), sum_gradients), full)


def ddp_distributed_uneven(name, x, y, full):
    share = share_of_loss(x, y)
    return compare(train(DistributedDataParallel(make_model(name, world(), seed=0)), lambda m: SIZE * share(m)), full)


EVEN_MODES = (ddp_distributed, ddp_independent, allreduce_distributed)
UNEVEN_MODES = (allreduce_distributed_uneven, ddp_distributed_uneven)
# cn's Krylov iterations make hundreds of collectives per step, slow on a shared 2-core machine;
# its distributed solves are covered by equivalence.py, so here it runs the two DDP modes only.
SKIP = {"cn": ("allreduce_distributed", "allreduce_distributed_uneven", "ddp_distributed_uneven")}


def run_method(name):
    results = {}
    for n_rows, modes in ((N_EVEN, EVEN_MODES), (N_UNEVEN, UNEVEN_MODES)):
        modes = [mode for mode in modes if mode.__name__ not in SKIP.get(name, ())]
        if modes:
            x, y = make_data(n_rows)
            full = reference(name, n_rows, [slice(0, n_rows)])
            results.update({mode.__name__: mode(name, x, y, full) for mode in modes})
    return results


def main():
    init_torch_distributed("gloo")
    results = {"env": {"RANK": os.environ["RANK"], "WORLD_SIZE": os.environ["WORLD_SIZE"],
                       "OMPI_COMM_WORLD_RANK": os.environ.get("OMPI_COMM_WORLD_RANK"),
                       "OMPI_COMM_WORLD_SIZE": os.environ.get("OMPI_COMM_WORLD_SIZE"),
                       "torch_rank": torch.distributed.get_rank(),
                       "torch_world_size": torch.distributed.get_world_size()}}
    for name in METHODS:
        results[name] = run_method(name)
    write_results(results)
    # DDP models hold the process group through reference cycles (reducer hooks). Left to
    # interpreter shutdown, a gloo worker thread can still run and abort the rank while taking the GIL.
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
