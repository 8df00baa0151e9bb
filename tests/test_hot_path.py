"""A regression guard on the work pnode does per stage, counted rather than timed (it cannot flake).

Python's profiler hook counts, during a training step (forward solve, loss, backward), the calls of
pnode's own Python functions and a few C calls that cost: autograd's engine, tensor constructions,
petsc4py array views. The same step at twice the stages gives the work per stage, fixed costs per
call cancelling out. The budgets are the counts measured when the hot path was last slimmed, plus
about ten percent: a change that adds Python work to every stage fails here, and the budget is
raised only deliberately.
"""

import collections
import os
import sys

import pytest
import torch

import pnode
from pnode._impl.odeint import odeint_reported
from pnode.testing.networks import MLPFunc

PNODE_DIR = os.path.dirname(os.path.abspath(pnode.__file__))

# per stage, forward and adjoint together (rk4, an MLP state of 16 x 2, float64); the tensors
# constructed are the times f is given, one per distinct stage time (rk4: two a step, four stages);
# a state comparison (torch.equal of a stage's state against a graph's input) is needed only where
# the stage Vec and time cannot tell which graph a stage is: with kept graphs, once a step, where
# PETSc's adjoint recomputes a stage time an ulp off the forward pass's
BUDGETS = {"graphs": {"pnode python calls": 69, "autograd engine runs": 1, "tensor constructions": 0.5,
                      "vec array views": 0.1, "state comparisons": 0.3},
           "states": {"pnode python calls": 68, "autograd engine runs": 1, "tensor constructions": 0.5,
                      "vec array views": 0.1, "state comparisons": 0.1}}
_C_CALLS = {"run_backward": "autograd engine runs", "tensor": "tensor constructions", "getArray": "vec array views",
            "from_numpy": "vec array views", "equal": "state comparisons"}


def _count(step) -> collections.Counter:
    counts = collections.Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PNODE_DIR):
            counts["pnode python calls"] += 1
        elif event == "c_call":
            name = _C_CALLS.get(getattr(arg, "__name__", ""))
            if name is not None:
                counts[name] += 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return counts


@pytest.mark.parametrize("strategy", ["graphs", "states"])
def test_work_per_stage_stays_within_its_budget(strategy):
    torch.manual_seed(0)
    func = MLPFunc().double()
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    odeint = pnode.odeint if strategy == "graphs" else pnode.odeint_adjoint

    def step(steps):
        def run():
            y0 = x.clone().requires_grad_()
            ys = odeint(func, y0, t, method="rk4", options={"step_size": 1.0 / steps})
            ys[-1].sum().backward()
        return run

    step(20)()  # the solver is built and pooled
    short, long = _count(step(20)), _count(step(40))
    stages = 4 * (40 - 20)
    per_stage = {name: (long[name] - short[name]) / stages for name in BUDGETS[strategy]}
    for name, budget in BUDGETS[strategy].items():
        assert per_stage[name] <= budget, (name, per_stage)
    assert per_stage["autograd engine runs"] == 1  # one VJP per stage serves J^T and J_p^T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("method,options", [("dopri5", {}), ("bosh3", {}), ("rk4", {"step_size": 0.1})])
def test_kept_graphs_evaluate_nothing_in_the_backward_pass(method, options, dtype):
    # every stage the adjoint linearises at was kept, also an FSAL step's first stage, whose graph is
    # the previous step's last (evaluated at a state that can differ from the step's start in the last bit)
    from pnode._impl.stats import SolveStats

    torch.manual_seed(0)
    func = MLPFunc().to(dtype)
    stats = SolveStats()
    y0 = torch.randn(8, 2, dtype=dtype, requires_grad=True)
    ys = odeint_reported(func, y0, torch.tensor([0.0, 1.0], dtype=dtype), method=method, options=options, rtol=1e-5,
                      atol=1e-5, stats=stats)
    ys[-1].sum().backward()
    assert stats.counter.backward == 0 and stats.counter.vjp > 0
