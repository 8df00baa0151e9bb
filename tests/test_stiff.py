"""Stiff problems as users pose them: implicit methods with tolerances alone (error control, the first
step, a failed Newton solve retried smaller), Newton's cost with the block-Jacobian preconditioner,
and the stiffness hint of explicit methods; against SciPy's Radau, finite differences and
autograd through the accepted implicit steps."""

import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err
from problems import MLPField

import pnode
from pnode._impl.hints import FirstOrderWarning, StiffnessWarning, forget_warnings
from pnode._impl.methods import adjoint_available, resolve_method
from pnode._impl.odeint import odeint_adjoint_reported, odeint_reported
from pnode.testing.references import theta_newton_solve
from pnode.testing.stiff_problems import ROBERTSON, VDPOL, reference_solution, relative_error

F64 = torch.float64
K_TRUE = (0.04, 3e7, 1e4)
HAS_ARKIMEX_ADJOINT = adjoint_available(resolve_method("kencarp4"))


def robertson(k):
    def f(t, y):
        return ROBERTSON.f(t, y, k)
    return f


def robertson_as_posed(method, k, times=(0.0, 40.0, 1e5), stats=None, rtol=1e-6, atol=1e-10):
    """The call of the issue: tolerances and a method, nothing else."""
    return odeint_adjoint_reported(robertson(k), torch.tensor([1.0, 0.0, 0.0], dtype=F64),
                                torch.tensor(times, dtype=F64), rtol=rtol, atol=atol, method=method,
                                adjoint_params=(k,), stats=stats)


@pytest.fixture(scope="module")
def robertson_reference():
    from scipy.integrate import solve_ivp

    sol = solve_ivp(ROBERTSON.f_np, (0.0, 1e5), [1.0, 0.0, 0.0], method="Radau", t_eval=[0.0, 40.0, 1e5],
                    rtol=1e-12, atol=1e-20, args=(np.array(K_TRUE),), jac=ROBERTSON.jac_np)
    return sol.y.T


@pytest.mark.skipif(not HAS_ARKIMEX_ADJOINT, reason="this PETSc has no ARKIMEX adjoint")
def test_robertson_as_posed_with_kencarp4_is_accurate_and_its_gradient_matches_finite_differences(
        robertson_reference):
    k = torch.tensor(K_TRUE, dtype=F64, requires_grad=True)
    stats = pnode._impl.stats.SolveStats()
    y = robertson_as_posed("kencarp4", k, stats=stats)
    assert relative_error(y.detach().numpy(), robertson_reference).max() < 1e-4  # every species, y2 included
    assert stats.steps < 150 and stats.solver["pc_type"] == "blocks"
    weights = torch.tensor([[1.0, 1e4, 1.0], [1.0, 1e9, 1.0]], dtype=F64)  # each species counts
    (grad,) = torch.autograd.grad((y[1:] * weights).sum(), k)

    def loss(kk):
        with torch.no_grad():
            return float((robertson_as_posed("kencarp4", kk, rtol=1e-8, atol=1e-12)[1:] * weights).sum())

    for i in range(3):
        step = torch.zeros(3, dtype=F64)
        step[i] = 1e-3 * K_TRUE[i]
        fd = (loss(k.detach() + step) - loss(k.detach() - step)) / (2 * float(step[i]))
        assert abs(float(grad[i]) - fd) <= 1e-4 * abs(fd), (i, float(grad[i]), fd)


@pytest.mark.filterwarnings("ignore::pnode._impl.hints.FirstOrderWarning")
@pytest.mark.parametrize("method", ["cn", "beuler"])
def test_robertson_as_posed_with_cn_and_beuler_runs_with_tolerances_alone(method, robertson_reference):
    """The call that used to fail at t = 0 (one step of 40 per output interval): error-controlled
    steps from an automatic first step. cn meets 1e-4 in every species; beuler, first order, has
    global errors ~1e3 times its local tolerance (the benchmark tabulates what it needs)."""
    k = torch.tensor(K_TRUE, dtype=F64, requires_grad=True)
    stats = pnode._impl.stats.SolveStats()
    with torch.no_grad():
        y = robertson_as_posed(method, k, times=(0.0, 40.0), stats=stats, rtol=1e-6)
    error = relative_error(y.numpy(), robertson_reference[:2]).max()
    assert error < (1e-4 if method == "cn" else 2e-3), error
    assert stats.steps > 100 and stats.solver["steps"] == "adaptive"
    # Newton with the block preconditioner (the whole 3 x 3 Jacobian here): few iterations, one
    # linear solve each
    assert stats.newton_iterations <= 4 * (stats.steps + stats.rejected_steps)
    assert stats.krylov_iterations <= 3 * stats.newton_iterations


def test_the_torchdiffeq_names_keep_one_step_per_output_interval():
    y0, t = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    for name, pnode_name in (("implicit_euler", "beuler"), ("trapezoid", "cn")):
        fixed, adaptive = pnode._impl.stats.SolveStats(), pnode._impl.stats.SolveStats()
        odeint_reported(lambda s, y: -y, y0, t, method=name, stats=fixed)
        odeint_reported(lambda s, y: -y, y0, t, method=pnode_name, stats=adaptive)
        assert fixed.steps == 2 and fixed.solver["steps"] == "one per output interval"
        assert adaptive.steps > 2 and adaptive.solver["steps"] == "adaptive"


def test_a_failed_newton_solve_is_retried_with_a_smaller_step_and_the_gradient_is_of_the_accepted_steps():
    """A first step far too large for Newton: PETSc rejects it, retries a quarter of it until Newton
    converges, and counts the failures; the adjoint reverses the accepted steps only (autograd through
    the same cn steps, each solved by Newton to round-off, as pnode's are here)."""
    torch.manual_seed(0)
    func = MLPField(dim=3, hidden=8).double()
    decay = torch.tensor([1.0, 30.0, 400.0], dtype=F64)

    def f(t, y):
        return 4.0 * func(t, y) - decay * y ** 3

    accepted = []
    f.callback_accept_step = lambda t0, y, dt: accepted.append(float(t0 + dt))
    y0 = torch.tensor([[1.0, 1.0, 1.0], [0.5, -1.0, 2.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    stats = pnode._impl.stats.SolveStats()
    options = {"first_step": 1.0, "snes_rtol": 1e-12, "snes_stol": 1e-14}
    ys = odeint_adjoint_reported(f, y0, t, rtol=1e-3, atol=1e-6, method="cn", options=options,
                              adjoint_params=tuple(func.parameters()), stats=stats)
    assert stats.newton_failures >= 2 and stats.rejected_steps >= stats.newton_failures
    assert "by failed Newton solves" in stats.summary()
    ref = theta_newton_solve(f, y0, [0.0] + accepted, 1e9, 0.5, newton_iters=6)[-1]
    assert rel_err(ys[-1], ref) < 1e-12
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(torch.autograd.grad((ys[-1] * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        assert rel_err(got, want) < 1e-12


def test_van_der_pol_with_beuler_and_tolerances_is_error_controlled_and_says_it_is_first_order():
    """mu = 1000 with method='beuler' used to take one step per output interval and return O(1)
    wrong without a word. Now its error follows the tolerance (as sqrt(rtol): first order), and past
    1000 steps it says that its global error is the sum of its local ones."""
    forget_warnings()
    mu = torch.tensor([1000.0], dtype=F64)
    times = (0.0, 500.0, 1000.0)  # the first relaxation jump is near t = 800
    reference = reference_solution(VDPOL.__class__(**{**VDPOL.__dict__, "times": times}))

    def error(rtol):
        y = pnode.odeint(lambda t, y: VDPOL.f(t, y, mu), torch.tensor(VDPOL.y0, dtype=F64),
                         torch.tensor(times, dtype=F64), rtol=rtol, atol=rtol, method="beuler")
        return np.abs(y[1:, 0].numpy() - reference[1:, 0]).max()  # y1 in [-2, 2]

    coarse = error(1e-3)
    with pytest.warns(FirstOrderWarning, match="method 'beuler' is first order.*use method='(kencarp4|beuler)'"):
        fine = error(1e-5)
    assert coarse < 0.1 and fine < 1e-2 and fine < coarse / 5


def test_an_explicit_method_on_a_stiff_problem_says_so_once():
    forget_warnings()
    A = torch.tensor([[-1.0, 0.0], [1.0, -5000.0]], dtype=F64)

    def f(t, y):
        return y @ A.T

    y0, t = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.warns(StiffnessWarning, match=r"looks stiff.*dopri5.*try method='(kencarp4|beuler)'"):
        pnode.odeint(f, y0, t, rtol=1e-6, atol=1e-9, method="dopri5")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StiffnessWarning)
        pnode.odeint(f, y0, t, rtol=1e-6, atol=1e-9, method="dopri5")  # once per method and process
        forget_warnings()
        # many small steps held by accuracy, not stability: no hint
        oscillator = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
        pnode.odeint(lambda s, y: y @ oscillator.T, y0, torch.tensor([0.0, 300.0], dtype=F64), rtol=1e-8,
                     atol=1e-10, method="dopri5")
