"""Rank script: one rank's batch size changes while the other rank's stays the same.

Rows per rank go 2 + 2, then 3 + 2 (the last, smaller batch of an epoch split unevenly). A solver
pool keyed by the local size alone would let rank 1 reuse its solver while rank 0 builds a new one
(collective), and both would wait for ever; pnode keys it by every rank's size. The watchdog turns
a hang into a non-zero exit within a few seconds.
"""

import torch
from problems import MLPField
from rankutil import RANK, arm_watchdog, gather_rows, rel_err, write_results

import pnode
from pnode.distributed import world

T = torch.tensor([0.0, 1.0], dtype=torch.float64)


def main():
    torch.manual_seed(0)
    func = MLPField().double()
    arm_watchdog(6.0)  # the solves take well under a second
    errors = []
    for rows in ((2, 2), (3, 2)):
        batch = torch.randn(sum(rows), 3, dtype=torch.float64)
        start = sum(rows[:RANK])
        y0 = batch[start:start + rows[RANK]].clone().requires_grad_(True)
        ys = pnode.odeint_adjoint(func, y0, T, method="rk4", options={"step_size": 0.25}, comm=world())
        ys[-1].sum().backward()
        with torch.no_grad():
            reference = pnode.odeint(func, batch, T, method="rk4", options={"step_size": 0.25})
        errors.append(rel_err(gather_rows(ys, 1), reference))
    write_results({"errors": errors})


if __name__ == "__main__":
    main()
