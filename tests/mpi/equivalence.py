"""Rank script: a batch split over the ranks gives what one rank holding the whole batch gives.

For each method and split, every rank builds the same model and the same whole batch (same seed),
solves the whole batch alone (comm=None: the one-rank reference), then solves its own rows as part
of one distributed system (comm=COMM_WORLD). Outputs and y0 gradients are gathered by rows,
parameter gradients (each rank's local contribution) summed over the ranks, and their relative
errors against the reference written to JSON.

The "+ck" variants run pnode's checkpointing (``options['checkpoints']``): the checkpoint store
and the recomputations must stay in step across the ranks, one global step sequence.
"""

import torch
from problems import MLPField
from rankutil import RANK, gather_rows, local_rows, rel_err, sum_over_ranks, write_results

import pnode
from pnode.distributed import shard, world

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
METHODS = {
    "rk4": {"method": "rk4", "options": {"step_size": 0.125}},
    "dopri5": {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8},
    # Newton and GMRES converge far below the compared 1e-10, so iteration counts that differ by
    # round-off between one and two ranks cannot show.
    "cn": {"method": "cn", "options": {"step_size": 0.5, "ksp_rtol": 1e-13, "ksp_atol": 1e-15,
                                       "snes_rtol": 1e-13, "snes_atol": 1e-15, "snes_stol": 0}},
}
for _name in ("rk4", "dopri5", "cn"):
    _kwargs = METHODS[_name]
    METHODS[_name + "+ck"] = {**_kwargs, "options": {**_kwargs.get("options", {}), "checkpoints": 2}}
SPLITS = {"even": 4, "uneven": 7}  # rows in the whole batch: 2 + 2 and 4 + 3


class Oscillator(torch.nn.Module):
    """A tuple state (x, v): dx/dt = v, dv/dt = -k x + tanh(v W)."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(1.5))
        self.W = torch.nn.Parameter(0.5 * torch.randn(2, 2))

    def forward(self, t, state):
        x, v = state
        return v, -self.k * x + torch.tanh(v @ self.W)


def compare(func, y0, weights, solve_kwargs, rows):
    """Relative errors of the distributed solve of ``rows`` against the whole-batch solve.

    ``y0`` and ``weights`` are tuples of tensors (batch along dim 0, and dim 1 for weights).
    """
    params = tuple(func.parameters())

    def run(state, w, comm):
        state = tuple(s.clone().requires_grad_(True) for s in state)
        ys = pnode.odeint_adjoint(func, state if len(state) > 1 else state[0], T, comm=comm, **solve_kwargs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        loss = sum((y * wi).sum() for y, wi in zip(ys, w))
        grads = torch.autograd.grad(loss, state + params)
        return ys, grads[:len(state)], torch.cat([g.reshape(-1) for g in grads[len(state):]])

    ref_ys, ref_gy0, ref_gp = run(y0, weights, None)
    ys, gy0, gp = run(tuple(s[rows] for s in y0), tuple(w[:, rows] for w in weights), world())
    full_gp = sum_over_ranks(gp)
    return {
        "outputs": max(rel_err(gather_rows(y, 1), r) for y, r in zip(ys, ref_ys)),
        "y0_grad": max(rel_err(gather_rows(g), r) for g, r in zip(gy0, ref_gy0)),
        "param_grad": rel_err(full_gp, ref_gp),
        # Each rank's parameter gradient is its own rows' contribution, not the whole gradient.
        "local_param_grad_vs_full": rel_err(gp, ref_gp),
    }


def main():
    results = {}
    for name, kwargs in METHODS.items():
        for split, n_rows in SPLITS.items():
            torch.manual_seed(0)
            func = MLPField().double()
            y0 = torch.randn(n_rows, 3, dtype=torch.float64)
            weights = torch.randn(len(T), n_rows, 3, dtype=torch.float64)
            results[f"{name}/{split}"] = compare(func, (y0,), (weights,), kwargs, local_rows(n_rows))
        torch.manual_seed(1)
        func = Oscillator().double()
        n_rows = SPLITS["uneven"]
        y0 = (torch.randn(n_rows, 2, dtype=torch.float64), torch.randn(n_rows, 2, dtype=torch.float64))
        weights = tuple(torch.randn(len(T), n_rows, 2, dtype=torch.float64) for _ in range(2))
        results[f"{name}/tuple"] = compare(func, y0, weights, kwargs, local_rows(n_rows))
    results["rows"] = [len(shard(n)) for n in SPLITS.values()]
    write_results(results)
    print(f"rank {RANK}: {results}", flush=True)


if __name__ == "__main__":
    main()
