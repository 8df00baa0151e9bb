#!/usr/bin/env python
"""PETSc's vector traffic per time step of a kept-graphs training step, read from PETSc's own log.

The workload is the small MLP of the benchmarks (2-64-64-2 with tanh, 256 states of 2, float32,
t in [0, 5]) at rk4 with 50 steps, differentiated with ``options={'adjoint': 'graphs'}``. Each run
takes ``--steps`` training steps under ``-log_view`` and prints, per time step of the forward
solves, how many times PETSc called ``TSStep`` (a re-taken step counts again), ``VecCopy``,
``VecMAXPY`` and ``VecAXPY``. For another checkout, put its ``pnode`` first on the path::

    python scripts/vec_traffic.py
    PYTHONPATH=/path/to/other/checkout python scripts/vec_traffic.py
"""

import argparse
import os
import sys
import tempfile

EVENTS = ("TSStep", "TSAdjointStep", "VecCopy", "VecMAXPY", "VecAXPY")
STEPS_PER_SOLVE = 50


def counts(log_path: str) -> dict:
    """``{event: count}`` from the event table of a ``-log_view`` file."""
    found = {}
    with open(log_path) as fh:
        for line in fh:
            words = line.split()
            if len(words) > 1 and words[0] in EVENTS and words[1].isdigit():
                found[words[0]] = int(words[1])
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="training steps under the log")
    args = parser.parse_args(argv)
    log_path = os.path.join(tempfile.mkdtemp(), "log_view.txt")

    import torch

    import pnode

    pnode.init(["-log_view", f":{log_path}"])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 2))
    y0, t = torch.randn(256, 2), torch.tensor([0.0, 5.0])
    for _ in range(args.steps):
        ys = pnode.odeint_adjoint(lambda s, y: net(y), y0, t, method="rk4",
                                  options={"step_size": 5.0 / STEPS_PER_SOLVE, "adjoint": "graphs"},
                                  adjoint_params=tuple(net.parameters()))
        ys[-1].square().sum().backward()
    from petsc4py import PETSc

    PETSc._finalize()  # writes the log
    found = counts(log_path)
    time_steps = args.steps * STEPS_PER_SOLVE
    print(f"pnode from {os.path.dirname(os.path.dirname(os.path.abspath(pnode.__file__)))}: "
          f"{args.steps} training steps, {time_steps} time steps")
    for event in EVENTS:
        print(f"{event:14s} {found.get(event, 0):6d}  {found.get(event, 0) / time_steps:6.2f} per time step")


if __name__ == "__main__":
    sys.exit(main())
