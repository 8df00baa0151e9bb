"""An explicit RK adjoint sums the parameter gradient itself from the VJPs that serve ``J^T``
(:mod:`pnode._impl.rk_adjoint`): checked bit for bit against PETSc's own ``J_p^T`` path, and by the
callbacks PETSc no longer makes. (``tests/test_gradients.py`` checks every explicit method's
parameter gradient against autograd through a hand-written tableau.)"""

import pytest
import torch

import pnode
from pnode._compat import PETSc
from pnode._impl import rk_adjoint
from pnode._impl.solver import Solver
from pnode.testing.networks import MLPFunc


class TwoBranches(torch.nn.Module):
    """An MLP in float32 beside a 0-dim float64 rate and a parameter f never uses (a None gradient)."""

    def __init__(self):
        super().__init__()
        self.mlp = MLPFunc(hidden=8)
        self.rate = torch.nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, t, y):
        return self.mlp(t, y) + self.rate.to(y.dtype) * y


def _gradients(func, y0, method, options):
    y0 = y0.clone().requires_grad_()
    params = tuple(func.parameters())
    ys = pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 0.4, 1.0]), method=method, options=dict(options),
                              rtol=1e-6, atol=1e-8)
    return torch.autograd.grad(ys.square().sum(), (y0,) + params)


@pytest.mark.parametrize("options", [{"adjoint": "graphs"}, {"adjoint": "states"}, {"checkpoints": 2}],
                         ids=["graphs", "states", "checkpoints"])
@pytest.mark.parametrize("method,step", [("rk4", 0.1), ("midpoint", 0.1), ("dopri5", None), ("bosh3", None)])
@pytest.mark.parametrize("network", ["two_branches", "mlp"])
def test_the_summed_parameter_gradient_equals_petsc_s_own_bit_for_bit(monkeypatch, method, step, options, network):
    # midpoint has a zero-weight stage, dopri5 both a zero-weight and an FSAL stage
    if method in ("midpoint", "dopri5") and PETSc.Sys.getVersion() < (3, 19):
        pytest.skip("PETSc 3.18's own J_p^T path drops zero-weight stages")
    if step is not None:
        options = {**options, "step_size": step}
    # two_branches: mixed dtypes and an unused parameter; mlp: every gradient present (one flatten)
    func, y0 = (TwoBranches() if network == "two_branches" else MLPFunc(hidden=8)), torch.randn(6, 2)
    summed = _gradients(func, y0, method, options)
    monkeypatch.setattr(rk_adjoint.ParamGradientSum, "for_ts", classmethod(lambda cls, *args: None))
    petsc_mu = _gradients(func, y0, method, options)
    if network == "two_branches":
        unused = 1 + [p is func.unused for p in func.parameters()].index(True)
        assert not summed[unused].any()
    for ours, theirs in zip(summed, petsc_mu):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_petsc_asks_for_no_parameter_jacobian_on_explicit_rk_and_still_does_on_cn(monkeypatch):
    pnode.clear_cache()  # a pooled solver holds the callback it was built with, not the patched one
    asked = []
    original = Solver.param_jacobian_rhs
    monkeypatch.setattr(Solver, "param_jacobian_rhs", lambda self, *args: (asked.append(1), original(self, *args)))
    func = MLPFunc(hidden=8).double()
    y0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for method, expect_asks in (("rk4", False), ("cn", True)):
        asked.clear()
        ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 0.25})
        grads = torch.autograd.grad(ys[-1].sum(), tuple(func.parameters()))
        assert all(g.abs().sum() > 0 for g in grads)
        assert bool(asked) == expect_asks, method


class _SineDecay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(-0.7, dtype=torch.float64))

    def forward(self, t, y):
        return self.a * y + torch.sin(y)


@pytest.mark.parametrize("method", ["midpoint", "heun2", "rk4"])
def test_kept_graphs_find_each_step_s_own_stages_where_steps_are_shorter_than_the_time_round_off(method):
    # at t = 2^30 a stage time is matched within 1.1e-4 (round-off of PETSc's recomputed stage
    # times), longer than these steps of 2^-15: the next step's stage at the same stage Vec is also
    # "at this time". Times and steps are exact binary fractions, so re-taken steps repeat the
    # forward pass's exactly. A state above the stored-stages size makes kept graphs re-take each
    # step in the adjoint.
    func, y0 = _SineDecay(), torch.randn(40_000, dtype=torch.float64)
    h = 2.0 ** -15
    t = torch.tensor([2.0 ** 30, 2.0 ** 30 + 8 * h], dtype=torch.float64)
    grads = {}
    for adjoint in ("graphs", "states"):
        ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": h, "adjoint": adjoint})
        (grads[adjoint],) = torch.autograd.grad(ys[-1].square().sum(), (func.a,))
    assert abs(float(grads["graphs"] - grads["states"])) <= 1e-12 * abs(float(grads["states"]))


def test_a_parameter_sum_refuses_a_product_no_stage_pointing_preceded():
    total = PETSc.Vec().createSeq(3, comm=PETSc.COMM_SELF)
    param_sum = rk_adjoint.ParamGradientSum({}, lambda grads, target: target.copy_(grads[0]), total, total.duplicate())
    with pytest.raises(RuntimeError, match="without pointing the Jacobian at a stage first"):
        param_sum.add((torch.ones(3),))
