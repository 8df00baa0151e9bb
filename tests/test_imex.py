"""kencarp3/4/5 (PETSc's ARKIMEX in implicit form) and pnode.IMEX splits: the steps PETSc accepted, and
their gradients, against autograd through the same additive Runge-Kutta steps written out by hand
(pnode.testing.references.ark_reference, Kennedy & Carpenter's tableaus typed from the paper)."""

import pytest
import torch
from conftest import rel_err
from problems import MLPField, stable_matrix
from torch import nn

import pnode
from pnode._impl.methods import adjoint_available, resolve_method
from pnode._impl.odeint import odeint_adjoint_reported, odeint_reported
from pnode.testing.references import ark_reference

F64 = torch.float64

pytestmark = pytest.mark.skipif(not adjoint_available(resolve_method("kencarp4")),
                                reason="this PETSc has no (right) ARKIMEX adjoint; pnode refuses kencarp* gradients")


class Diffusion(nn.Module):
    """dy/dt = y L^T: a stiff linear operator (eigenvalues down to about -4 * scale) with a parameter."""

    def __init__(self, n: int, scale: float = 50.0):
        super().__init__()
        second_difference = -2 * torch.eye(n, dtype=F64) + torch.diag(torch.ones(n - 1, dtype=F64), 1) \
            + torch.diag(torch.ones(n - 1, dtype=F64), -1)
        self.L = nn.Parameter(scale * second_difference + 0.1 * stable_matrix(n))

    def forward(self, t, y):
        return y @ self.L.T


class Recorder:
    """Collects the accepted steps ``(t0, dt)`` through torchdiffeq's step callback."""

    def __init__(self, func):
        self.steps = []
        func.callback_accept_step = lambda t0, y0, dt: self.steps.append((float(t0), float(dt)))


def _grads(out, weights, inputs):
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("method", ["kencarp3", "kencarp4"])
def test_imex_gradients_equal_autograd_through_the_same_imex_steps(method):
    """Linear stiff part (each implicit stage is one exact LU solve of the per-sample blocks), nonlinear
    learned explicit part: outputs and gradients agree with the hand-written IMEX steps to round-off."""
    torch.manual_seed(0)
    func = pnode.IMEX(explicit=MLPField(dim=6, hidden=8).double(), implicit=Diffusion(6))
    recorder = Recorder(func)
    y0 = torch.randn(3, 6, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    stats = pnode._impl.stats.SolveStats()
    ys = odeint_adjoint_reported(func, y0, t, rtol=1e-5, atol=1e-7, method=method, stats=stats)
    assert stats.solver["ts_type"] == "arkimex" and stats.solver["pc_type"] == "blocks"
    assert len(recorder.steps) == stats.steps > 3
    ref = ark_reference(func.implicit, func.explicit, y0, recorder.steps, method, newton_iters=2)
    assert rel_err(ys[-1], ref) < 1e-13
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(_grads(ys[-1], w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-11


def test_esdirk_on_a_nonlinear_f_matches_newton_solved_steps():
    """kencarp4 on a plain (unsplit) nonlinear f is Kennedy & Carpenter's ESDIRK: with Newton solved to
    round-off, outputs and gradients equal autograd through the same stages solved by Newton."""
    torch.manual_seed(1)
    mlp = MLPField(dim=3, hidden=8).double()
    decay = torch.tensor([1.0, 20.0, 300.0], dtype=F64, requires_grad=True)

    def f(t, y):
        return mlp(t, y) - decay * y

    recorder = Recorder(f)
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    options = {"snes_rtol": 1e-12, "snes_atol": 1e-300, "snes_stol": 1e-14}
    ys = pnode.odeint_adjoint(f, y0, t, rtol=1e-6, atol=1e-8, method="kencarp4", options=options,
                              adjoint_params=(decay, *mlp.parameters()))
    ref = ark_reference(f, None, y0, recorder.steps, "kencarp4")
    assert rel_err(ys[-1], ref) < 1e-12
    w = torch.randn_like(ref)
    inputs = (y0, decay, *mlp.parameters())
    for got, want in zip(_grads(ys[-1], w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-9


def test_an_imex_split_is_its_sum_for_other_methods():
    torch.manual_seed(2)
    explicit, implicit = MLPField(dim=4).double(), Diffusion(4, scale=1.0)
    y0 = torch.randn(2, 4, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        split = pnode.odeint(pnode.IMEX(explicit, implicit), y0, t, method="dopri5")
        whole = pnode.odeint(lambda s, y: explicit(s, y) + implicit(s, y), y0, t, method="dopri5")
    assert torch.equal(split, whole)


class Reaction(nn.Module):
    """A learned autonomous reaction term, dy/dt = W2 tanh(W1 y): mild, smooth in the state."""

    def __init__(self, n: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, 8), nn.Tanh(), nn.Linear(8, n)).double()

    def forward(self, t, y):
        return self.net(y)


def test_imex_steps_past_the_stiff_parts_stability_limit():
    """Diffusion with eigenvalues to -4000 and a smooth start: dopri5 needs a thousand steps for
    stability, the IMEX method a few dozen for accuracy (its explicit part is mild)."""
    torch.manual_seed(3)
    func = pnode.IMEX(explicit=Reaction(8), implicit=Diffusion(8, scale=1000.0))
    mode = torch.sin(torch.pi * torch.arange(1, 9, dtype=F64) / 9)
    y0 = torch.stack([mode, 0.5 * mode])
    t = torch.tensor([0.0, 1.0], dtype=F64)
    imex, explicit = pnode._impl.stats.SolveStats(), pnode._impl.stats.SolveStats()
    with torch.no_grad():
        a = odeint_reported(func, y0, t, rtol=1e-5, atol=1e-7, method="kencarp4", stats=imex)
        b = odeint_reported(func, y0, t, rtol=1e-5, atol=1e-7, method="dopri5", stats=explicit)
    assert rel_err(a, b) < 1e-4
    assert explicit.steps > 20 * imex.steps


def test_imex_parts_must_be_callable():
    with pytest.raises(pnode.InputError, match=r"IMEX\(implicit=...\) must be callable"):
        pnode.IMEX(lambda t, y: y, 3.0)


def test_a_solution_only_trajectory_is_refused_for_kencarp():
    # PETSc's adjoint re-takes ARKIMEX steps from a solution-only trajectory wrongly: refused, with what to do
    y0 = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(pnode.InputError, match=r"ts_trajectory_solution_only is not supported with TS arkimex.*"
                                               r"checkpoints=K"):
        pnode.odeint_adjoint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="kencarp4",
                             options={"ts_trajectory_solution_only": True})
