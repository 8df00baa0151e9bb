"""Gradients from PETSc TSAdjoint against independent references (backprop through the same steps,
exact solutions of linear ODEs, implicit steps solved exactly)."""

import pytest
import torch
from conftest import rel_err, skip_if_zero_weight_broken
from problems import ConvField, LinearField, MLPField, stable_matrix

import pnode
from pnode._impl.methods import adjoint_available, resolve_method
from pnode.testing.references import (
    IMPLICIT_TABLEAUS,
    TABLEAUS,
    forced_linear_implicit_solve,
    rk_solve,
    theta_linear_solve,
    theta_newton_solve,
)

# PETSc's own tableaus, then torchdiffeq's that pnode registers with TSRKRegister (heun2 is PETSc's 2a)
EXPLICIT = ["euler", "midpoint", "rk4", "bosh3", "dopri5", "adaptive_heun", "heun2", "heun3", "fehlberg2", "tsit5",
            "dopri8"]


def _grads(outputs, weights, inputs):
    return torch.autograd.grad((outputs * weights).sum(), inputs)


@pytest.mark.parametrize("method", EXPLICIT)
def test_fixed_steps_match_backprop_through_the_same_steps(method):
    skip_if_zero_weight_broken(method)
    # float64, round-off only: both sides run identical arithmetic up to summation order.
    func = MLPField().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 0.1})
    ref = rk_solve(func, y0, t.tolist(), 0.1, TABLEAUS[method])
    assert ys.shape == (3, 5, 3)
    assert rel_err(ys, ref) < 1e-13
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(_grads(ys, w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_conv_field_gradients_match_backprop(method):
    skip_if_zero_weight_broken(method)
    func = ConvField().double()
    y0 = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 0.25})
    ref = rk_solve(func, y0, t.tolist(), 0.25, TABLEAUS[method])
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(_grads(ys, w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("method,theta", [("cn", 0.5), ("beuler", 1.0), ("theta", 0.5)])
def test_implicit_linear_matches_exact_implicit_steps(method, theta):
    # Each implicit step of a linear ODE is one linear solve; the reference solves it exactly, pnode
    # by Newton-GMRES on shell Jacobians, so agreement is to the Krylov tolerance (1e-13 here).
    A = stable_matrix(4)
    func = LinearField(A)
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    opts = {"step_size": 0.1, "ksp_rtol": 1e-13, "ksp_atol": 1e-15, "snes_rtol": 1e-13}
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options=opts)
    ref = theta_linear_solve(func.A, y0, t.tolist(), 0.1, theta)
    assert rel_err(ys, ref) < 1e-10
    w = torch.randn_like(ref)
    inputs = (y0, func.A)
    for got, want in zip(_grads(ys, w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("method", sorted(IMPLICIT_TABLEAUS))
def test_torchdiffeq_implicit_names_match_exact_steps_of_a_forced_linear_ode(method):
    # dy/dt = A y + g(t): each stage is one linear solve, done exactly by the reference. The
    # forcing tells the midpoint rule (g at t + h/2) from the trapezoidal rule (g at t and t + h),
    # which agree on an autonomous linear ODE.
    A = stable_matrix(4)
    func = LinearField(A)
    v = torch.randn(4, dtype=torch.float64)

    def forcing(t):
        return torch.cos(3 * torch.as_tensor(t, dtype=torch.float64)) * v

    def forced(t, y):
        return func(t, y) + forcing(t)

    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    opts = {"step_size": 0.1, "ksp_rtol": 1e-13, "ksp_atol": 1e-15, "snes_rtol": 1e-13}
    ys = pnode.odeint_adjoint(forced, y0, t, method=method, options=opts, adjoint_params=(func.A,))
    ref = forced_linear_implicit_solve(func.A, forcing, y0, t.tolist(), 0.1, IMPLICIT_TABLEAUS[method])
    assert rel_err(ys, ref) < 1e-10
    w = torch.randn_like(ref)
    for got, want in zip(_grads(ys, w, (y0, func.A)), _grads(ref, w, (y0, func.A))):
        assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("method,theta", [("cn", 0.5), ("beuler", 1.0)])
def test_implicit_nonlinear_matches_newton_reference(method, theta):
    func = MLPField(dim=2, hidden=4).double()
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.6], dtype=torch.float64)
    opts = {"step_size": 0.2, "ksp_rtol": 1e-14, "ksp_atol": 1e-16, "snes_rtol": 1e-14,
            "snes_atol": 1e-16, "snes_stol": 0}
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options=opts)
    ref = theta_newton_solve(func, y0, t.tolist(), 0.2, theta)
    assert rel_err(ys, ref) < 1e-10
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(_grads(ys, w, inputs), _grads(ref, w, inputs)):
        assert rel_err(got, want) < 1e-8


ADAPTIVE = [("dopri5", 1e-11), ("bosh3", 1e-10), ("tsit5", 1e-11), ("dopri8", 1e-12)]


@pytest.mark.parametrize("method,tol", ADAPTIVE)
def test_adaptive_matches_exact_continuous_gradient(method, tol):
    skip_if_zero_weight_broken(method)
    A = stable_matrix(3)
    func = LinearField(A)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 2.0], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, rtol=tol, atol=tol, method=method)
    A_exact = func.A.detach().clone().requires_grad_(True)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(A_exact * ti).T for ti in t])
    assert rel_err(ys, exact) < 1e-8
    w = torch.randn_like(exact)
    got = _grads(ys, w, (y0, func.A))
    want = _grads(exact, w, (y0, A_exact))
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-7


@pytest.mark.parametrize("method,tol", ADAPTIVE)
def test_decreasing_times_match_exact_solution_and_gradient(method, tol):
    skip_if_zero_weight_broken(method)
    A = stable_matrix(3)
    func = LinearField(A)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.4, -0.5], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, rtol=tol, atol=tol, method=method)
    A_exact = func.A.detach().clone().requires_grad_(True)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(A_exact * (ti - 1.0)).T for ti in t])
    assert rel_err(ys, exact) < 1e-8
    w = torch.randn_like(exact)
    for g, r in zip(_grads(ys, w, (y0, func.A)), _grads(exact, w, (y0, A_exact))):
        assert rel_err(g, r) < 1e-7


@pytest.mark.parametrize("method,tol", ADAPTIVE)
def test_time_gradients_match_exact_flow(method, tol):
    skip_if_zero_weight_broken(method)
    A = stable_matrix(3)
    func = LinearField(A)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, t, rtol=tol, atol=tol, method=method)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(func.A.detach() * (ti - t[0])).T for ti in t])
    w = torch.randn_like(exact)
    (got,) = torch.autograd.grad((ys * w).sum(), t)
    (want,) = torch.autograd.grad((exact * w).sum(), t)
    assert rel_err(got, want) < 1e-7


def test_tuple_state_matches_concatenated_state():
    k = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def oscillator(t, state):
        x, v = state
        return v, -k * x

    def flat(t, y):
        return torch.cat([y[:, 2:], -k * y[:, :2]], 1)

    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    xs, vs = pnode.odeint_adjoint(oscillator, (x0, v0), t, method="rk4", options={"step_size": 0.05},
                                  adjoint_params=(k,))
    assert xs.shape == (3, 3, 2) and vs.shape == (3, 3, 2)
    ref = rk_solve(flat, torch.cat([x0, v0], 1), t.tolist(), 0.05, TABLEAUS["rk4"])
    assert rel_err(torch.cat([xs, vs], -1), ref) < 1e-13
    w = torch.randn_like(ref)
    got = torch.autograd.grad((xs * w[..., :2]).sum() + (vs * w[..., 2:]).sum(), (x0, v0, k))
    want = torch.autograd.grad((ref * w).sum(), (x0, v0, k))
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-10


def test_float32_gradients_close_to_float64_backprop():
    func64 = MLPField().double()
    func32 = MLPField().float()
    func32.load_state_dict({k: v.float() for k, v in func64.state_dict().items()})
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0])
    y0_32 = y0.float().requires_grad_(True)
    ys = pnode.odeint_adjoint(func32, y0_32, t, method="rk4", options={"step_size": 0.1})
    assert ys.dtype == torch.float32
    y0_64 = y0.clone().requires_grad_(True)
    ref = rk_solve(func64, y0_64, [0.0, 1.0], 0.1, TABLEAUS["rk4"])
    w = torch.randn(ref.shape, dtype=torch.float64)
    got = _grads(ys, w.float(), (y0_32, *func32.parameters()))
    want = _grads(ref, w, (y0_64, *func64.parameters()))
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 1e-5


def test_plain_function_with_adjoint_params():
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.tanh(y @ W)

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.8], dtype=torch.float64)
    ys = pnode.odeint_adjoint(f, y0, t, method="adaptive_heun", options={"step_size": 0.1}, adjoint_params=(W,))
    ref = rk_solve(f, y0, t.tolist(), 0.1, TABLEAUS["adaptive_heun"])
    w = torch.randn_like(ref)
    for g, r in zip(_grads(ys, w, (y0, W)), _grads(ref, w, (y0, W))):
        assert rel_err(g, r) < 1e-10


def test_plain_function_without_adjoint_params_warns():
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="adjoint_params"):
        pnode.odeint_adjoint(lambda t, y: y @ W, y0, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_only_some_outputs_in_the_loss_and_unused_parameter():
    func = MLPField().double()
    func.unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, method="rk4", options={"step_size": 0.1})
    ref = rk_solve(func, y0, t.tolist(), 0.1, TABLEAUS["rk4"])
    params = [p for n, p in func.named_parameters() if n != "unused"]
    got = torch.autograd.grad(ys[2].sum(), (y0, *params, func.unused), allow_unused=True)
    want = torch.autograd.grad(ref[2].sum(), (y0, *params))
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-10
    assert got[-1] is None or float(got[-1].abs().max()) == 0.0


def test_zero_weight_stage_refused_where_petsc_drops_its_parameter_gradient():
    from conftest import zero_weight_ok

    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    if zero_weight_ok():
        ys = pnode.odeint_adjoint(lambda t, y: y @ W, y0, t, method="midpoint", adjoint_params=(W,))
        assert ys.requires_grad
    else:
        with pytest.raises(pnode.InputError, match="zero-weight RK stage"):
            pnode.odeint_adjoint(lambda t, y: y @ W, y0, t, method="midpoint", adjoint_params=(W,))


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_pooled_solver_takes_longer_spans_than_its_first_solve(method):
    # A pooled fixed-step solver first records a one-step solve, then solves 40 and 100 steps:
    # PETSc's memory trajectory, sized for the first solve, used to overrun and crash here.
    func = MLPField().double()
    for t_end in (0.05, 2.0, 0.05, 5.0):
        y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.0, t_end], dtype=torch.float64)
        ys = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 0.05})
        ref = rk_solve(func, y0, t.tolist(), 0.05, TABLEAUS[method])
        w = torch.randn_like(ref)
        for g, r in zip(_grads(ys, w, (y0, *func.parameters())), _grads(ref, w, (y0, *func.parameters()))):
            assert rel_err(g, r) < 1e-10


class _Reversed(torch.nn.Module):
    """``g(s, y) = -f(-s, y)``: the ODE of ``f`` in ``s = -t``, written by the user."""

    def __init__(self, func):
        super().__init__()
        self.func = func

    def forward(self, s, y):
        return -self.func(-s, y)


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1, "adjoint": "graphs"}),
                                            ("dopri5", {"adjoint": "states"}),
                                            ("cn", {"step_size": 0.1}),
                                            ("kencarp4", {}),
                                            # Newton's Krylov iterations on the JVP shell (blocks solve directly)
                                            ("cn", {"step_size": 0.1, "jacobian": "matrix_free"}),
                                            ("kencarp4", {"jacobian": "matrix_free"})])
def test_decreasing_times_give_the_user_reversed_problem_s_solution_and_gradients(method, options):
    # Decreasing t is f integrated in PETSc time -t with direction's sign applied by pnode (f's value,
    # the VJPs, the JVPs of Newton's Krylov iterations); the same problem written by the user in
    # s = -t, with increasing times, puts the sign inside func instead.
    skip_if_zero_weight_broken(method)
    if not adjoint_available(resolve_method(method)):
        pytest.skip(f"this PETSc has no adjoint for {method}")
    A = stable_matrix(3)
    func = MLPField(3).double() if method == "rk4" else LinearField(A)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.4, -0.5], dtype=torch.float64)
    tol = {} if "step_size" in options else {"rtol": 1e-8, "atol": 1e-8}
    params = (y0, *func.parameters())
    w = torch.randn(3, 2, 3, dtype=torch.float64)
    backward = pnode.odeint_adjoint(func, y0, t, method=method, options=dict(options), **tol)
    forward = pnode.odeint_adjoint(_Reversed(func), y0, -t, method=method, options=dict(options), **tol)
    assert rel_err(backward, forward) < 1e-12
    for got, want in zip(_grads(backward, w, params), _grads(forward, w, params)):
        assert rel_err(got, want) < 1e-12
