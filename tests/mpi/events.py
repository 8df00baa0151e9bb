"""Rank script: odeint_event on a batch split over the ranks gives what one rank with the whole batch gives.

The event function is the mean over the whole batch of ``w . y_row`` minus a learnable level, so
each rank returns its share: the sum over its rows divided by the whole batch size, minus the level
divided by the number of ranks; pnode sums the shares. Each rank's loss is its share of the
one-rank loss ``event_t + sum(y(event_t))``, so that parameter and ``t0`` gradients (local
contributions) sum to the one-rank ones, and ``y0`` gradients are the rank's rows of them.
"""

import torch
from problems import MLPField
from rankutil import RANK, SIZE, gather_rows, local_rows, rel_err, sum_over_ranks, write_results

import pnode
from pnode.distributed import world

ROWS = 5  # 3 + 2 on two ranks


class BatchThreshold(torch.nn.Module):
    """``mean_rows(w . y_row) - c`` of a ``(rows, 3)`` batch, as this rank's share of it."""

    def __init__(self, total_rows: int, ranks: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.total_rows, self.ranks = total_rows, ranks

    def forward(self, t, y):
        return (y * self.w).sum() / self.total_rows - self.c / self.ranks


def solve(func, event_fn, y0, t0, comm, share):
    y, t = y0.clone().requires_grad_(), t0.clone().requires_grad_()
    event_t, solution = pnode.odeint_event(func, y, t, event_fn=event_fn, method="dopri5", rtol=1e-10, atol=1e-12,
                                           comm=comm)
    loss = share * event_t + solution[-1].sum()
    params = list(func.parameters()) + list(event_fn.parameters())
    grads = torch.autograd.grad(loss, [y, t, *params])
    n_func = len(list(func.parameters()))
    func_grad = torch.cat([g.reshape(-1) for g in grads[2:2 + n_func]])
    event_grad = torch.cat([g.reshape(-1) for g in grads[2 + n_func:]])
    return event_t.detach(), solution[-1].detach(), grads[0], grads[1], func_grad, event_grad


def main():
    torch.manual_seed(0)
    func = MLPField().double()
    y0 = 0.3 * torch.randn(ROWS, 3, dtype=torch.float64)
    t0 = torch.tensor(0.1, dtype=torch.float64)
    reference = solve(func, BatchThreshold(ROWS, 1), y0, t0, None, 1.0)
    rows = local_rows(ROWS)
    mine = solve(func, BatchThreshold(ROWS, SIZE), y0[rows], t0, world(), 1.0 / SIZE)
    event_t, state, y0_grad, t0_grad, param_grad, event_param_grad = mine
    errors = {
        "event_t": rel_err(event_t, reference[0]),
        "state": rel_err(gather_rows(state), reference[1]),
        "y0_grad": rel_err(gather_rows(y0_grad), reference[2]),
        "t0_grad": rel_err(sum_over_ranks(t0_grad), reference[3]),
        "param_grad": rel_err(sum_over_ranks(param_grad), reference[4]),
        "event_param_grad": rel_err(sum_over_ranks(event_param_grad), reference[5]),
    }
    write_results({"rank": RANK, "event_t": float(event_t), "errors": errors})


if __name__ == "__main__":
    main()
