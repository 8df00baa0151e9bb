"""Implicit methods on neural right-hand sides: derived Newton-Krylov defaults, their precedence, the
linearly implicit choice, gradients against exactly solved implicit steps, and Newton's error report."""

import pytest
import torch
from conftest import rel_err
from problems import ConvField, LinearField, MLPField, stable_matrix

import pnode
from pnode._impl.odeint import odeint_adjoint_reported
from pnode.testing.references import theta_linear_solve, theta_newton_solve


def _grads(out, weights, inputs):
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("method", ["cn", "beuler", "theta"])
def test_a_float32_conv_network_trains_with_the_default_newton_settings(method):
    # PETSc's own Newton tolerance (1e-8 relative) lies below what a float32 network resolves:
    # Newton used to stall at ~1e-7 and every solve failed with DIVERGED_NONLINEAR_SOLVE.
    torch.manual_seed(0)
    block = pnode.ODEBlock(ConvField(channels=8), method=method, options={"step_size": 0.25})
    x = torch.randn(4, 8, 6, 6)
    block(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
    assert block.stats.newton_iterations >= 4  # at least one Newton iteration in each of the 4 steps


@pytest.mark.parametrize("dtype,rtol,ksp_rtol,jvp", [(torch.float32, 100 * torch.finfo(torch.float32).eps,
                                                      "Eisenstat-Walker", "difference"),
                                                     (torch.float64, 1e-8, 1e-5, "autodiff")])
def test_newton_tolerances_follow_the_state_precision(dtype, rtol, ksp_rtol, jvp):
    block = pnode.ODEBlock(MLPField(dim=3).to(dtype), method="cn", options={"step_size": 0.5})
    block(torch.randn(2, 3, dtype=dtype)).sum().backward()
    info = block.stats.solver
    assert info["snes_type"] == "newtonls" and info["snes_rtol"] == pytest.approx(rtol)
    assert info["ksp_rtol"] == ksp_rtol and info["adjoint_ksp_rtol"] <= 1e-5 and info["jvp"] == jvp
    assert "TS cn" in block.stats.summary() and "SNES newtonls" in block.stats.summary()


def test_options_override_the_derived_newton_settings():
    block = pnode.ODEBlock(MLPField(dim=3), method="beuler",
                           options={"step_size": 0.5, "snes_rtol": 1e-3, "snes_linesearch_type": "bt"})
    block(torch.randn(2, 3)).sum().backward()
    assert block.stats.solver["snes_rtol"] == pytest.approx(1e-3)


@pytest.mark.parametrize("method,theta", [("cn", 0.5), ("beuler", 1.0)])
def test_default_settings_give_gradients_of_the_exactly_solved_steps(method, theta):
    """float64, nonlinear f, pnode's defaults (Newton to 1e-8, the adjoint's transposed solves to 1e-6):
    the gradient agrees with autograd through the same implicit steps solved to machine precision,
    within the adjoint's linear tolerance."""
    torch.manual_seed(1)
    func = MLPField(dim=4).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 0.2})
    ref = theta_newton_solve(func, y0, t.tolist(), 0.2, theta)
    assert rel_err(ys, ref) < 1e-7
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(_grads(ys, w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("method,theta", [("cn", 0.5), ("beuler", 1.0)])
def test_linear_implicit_solve_takes_one_newton_step(method, theta):
    # On a linear ODE one Newton step with an exact Jacobian solves the implicit step exactly, so
    # implicit_solve='linear' must reproduce the exact implicit steps and their gradients.
    torch.manual_seed(2)
    func = LinearField(stable_matrix(4))
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    stats = pnode._impl.stats.SolveStats()
    options = {"step_size": 0.1, "implicit_solve": "linear", "ksp_rtol": 1e-13}
    ys = odeint_adjoint_reported(func, y0, t, method=method, adjoint_params=(func.A,), options=options, stats=stats)
    assert stats.solver["snes_type"] == "ksponly"
    assert stats.newton_iterations == 10  # one per step: 3 in [0, 0.3], 7 in [0.3, 1]
    ref = theta_linear_solve(func.A, y0, t.tolist(), 0.1, theta)
    assert rel_err(ys, ref) < 1e-10
    w = torch.randn_like(ref)
    for got, want in zip(_grads(ys, w, (y0, func.A)), _grads(ref, w, (y0, func.A))):
        assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("jvp", ["autodiff", "difference"])
def test_difference_and_autodiff_jvps_reach_the_same_implicit_steps(jvp):
    """Difference JVPs only change Newton's convergence rate: the converged steps and their (VJP)
    gradients agree with the exactly solved steps within the Newton tolerance."""
    torch.manual_seed(3)
    func = MLPField(dim=4).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    stats = pnode._impl.stats.SolveStats()
    ys = odeint_adjoint_reported(func, y0, t, method="cn", options={"step_size": 0.25, "jvp": jvp}, stats=stats)
    assert stats.solver["jvp"] == jvp
    ref = theta_newton_solve(func, y0, t.tolist(), 0.25, 0.5)
    assert rel_err(ys, ref) < 1e-7
    (got,), (want,) = _grads(ys, 1.0, (y0,)), _grads(ref, 1.0, (y0,))
    assert rel_err(got, want) < 1e-5


def test_bad_jvp_value_is_reported():
    with pytest.raises(pnode.InputError, match="jvp.*'autodiff'.*'difference'"):
        pnode.odeint(MLPField(dim=3), torch.randn(2, 3), torch.tensor([0.0, 1.0]), method="cn",
                     options={"jvp": "symbolic"})


def test_bad_implicit_solve_value_is_reported():
    with pytest.raises(pnode.InputError, match="implicit_solve.*'newton'.*'linear'"):
        pnode.odeint(MLPField(dim=3), torch.randn(2, 3), torch.tensor([0.0, 1.0]), method="cn",
                     options={"implicit_solve": "twice"})


def test_a_failing_newton_solve_reports_what_it_tried():
    # A stiff linear ODE with one huge fixed step (torchdiffeq's implicit_euler: one step per output
    # interval, no retry), one Newton iteration allowed and an unreachable tolerance.
    func = LinearField(-50.0 * torch.eye(3, dtype=torch.float64) + stable_matrix(3))
    with pytest.raises(pnode.SolverError, match=r"Newton failed to converge \(.*\) after 1 iterations.*"
                       r"residual .* from .* snes_rtol=1e-14.*snes_max_it=1") as info:
        pnode.odeint(lambda t, y: func(t, y) ** 3, torch.ones(2, 3, dtype=torch.float64),
                     torch.tensor([0.0, 1.0], dtype=torch.float64), method="implicit_euler",
                     options={"snes_max_it": 1, "snes_rtol": 1e-14, "snes_stol": 0})
    assert info.value.reason == "DIVERGED_NONLINEAR_SOLVE"
