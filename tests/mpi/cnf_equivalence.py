"""Rank script: the CNF example's data-parallel loss and gradients equal one process's on the whole batch.

Every rank builds the same global batch of 7 points in 3 dimensions (4 + 3 rows: an uneven split)
and the same Hutchinson probes, and takes the example's step: ``cnf.local_loss`` on its rows, then
``average_gradients``. The reference is one process (the same process, ``comm=None``) with the
whole batch and the global mean loss written out here. Cases: one distributed PETSc system with
the adaptive dopri5 (the ranks take one process's steps) and independent per-rank solves with
fixed rk4 steps, each with the exact trace or Hutchinson's, with and without both regularisers;
two concat-squash blocks, float64.
"""

import argparse
import os
import sys

import torch
from rankutil import COMM, rel_err, write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))
import cnf  # noqa: E402

from pnode.distributed import average_gradients, gather_metrics, world  # noqa: E402

N_ROWS, DIM = 7, 3
SOLVERS = {"distributed-dopri5": dict(method="dopri5", rtol=1e-8, atol=1e-8, step_size=None),
           "independent-rk4": dict(method="rk4", rtol=1e-8, atol=1e-8, step_size=0.25)}


def build(solver: str, comm):
    torch.manual_seed(3)
    args = argparse.Namespace(blocks=2, hidden=8, layers=2, activation="softplus", layer="concatsquash",
                              time_length=1.0, **SOLVERS[solver])
    return cnf.build_model(args, DIM, comm)


def reference(model, x, probes, kinetic, jacobian):
    """One process, the whole batch: the global mean loss and its parameter gradients."""
    model.set_noise(probes)
    log_p, regularisers = model(x, regularize=bool(kinetic or jacobian))
    loss = -log_p.mean() + kinetic * regularisers[:, 0].mean() + jacobian * regularisers[:, 1].mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return float(loss.detach()), grads


def data_parallel(model, x, probes, kinetic, jacobian):
    """This rank's part of the example's step; returns the global loss and the averaged gradients."""
    loss, sums = cnf.local_loss(model, x, probes, kinetic, jacobian)
    model.zero_grad(set_to_none=False)
    loss.backward()
    average_gradients(model.parameters())
    totals = gather_metrics(sums)
    global_loss = (totals["nll"] + kinetic * totals["kinetic"] + jacobian * totals["jacobian"]) / totals["rows"]
    return global_loss, [p.grad.clone() for p in model.parameters()], sums["rows"]


def run_case(solver: str, trace: str, regularised: bool) -> dict:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(N_ROWS, DIM, dtype=torch.float64, generator=generator)
    probes = torch.randint(0, 2, x.shape, generator=generator).double() * 2 - 1 if trace == "hutchinson" else None
    weights = (0.3, 0.2) if regularised else (0.0, 0.0)
    parallel = build(solver, world() if solver.startswith("distributed") else None)
    loss, grads, rows = data_parallel(parallel, x, probes, *weights)
    ref_loss, ref_grads = reference(build(solver, None), x, probes, *weights)
    return {"loss": abs(loss - ref_loss) / abs(ref_loss), "grads": max(rel_err(g, r) for g, r in zip(grads, ref_grads)),
            "grad_norm": float(torch.cat([g.reshape(-1) for g in ref_grads]).norm()), "rows": rows}


def main():
    results = {}
    for solver in SOLVERS:
        for trace in ("exact", "hutchinson"):
            for regularised in (False, True):
                results[f"{solver}/{trace}/{'regularised' if regularised else 'plain'}"] = run_case(
                    solver, trace, regularised)
    COMM.Barrier()
    write_results(results)


if __name__ == "__main__":
    main()
