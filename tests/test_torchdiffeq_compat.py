"""The torchdiffeq contract: the call patterns of torchdiffeq's public tests, run through pnode.

torchdiffeq 0.2.5 is the reference where it computes the same thing: the same Euler/midpoint
steps (outputs and backprop gradients agree to round-off), the same step callbacks on a fixed
grid, the same solution at tight tolerances (adaptive steps differ, the solutions agree to the
tolerance). Elsewhere the references are exact solutions and ``torch.autograd.gradcheck``.
"""

import math
import sys

import pytest
import torch
from conftest import rel_err, skip_if_zero_weight_broken
from problems import MLPField, stable_matrix

import pnode
from pnode.testing.references import TABLEAUS, rk_solve

torchdiffeq = pytest.importorskip("torchdiffeq")

# torchdiffeq's explicit names that pnode serves; all of them step with a fixed size below
EXPLICIT = ["euler", "midpoint", "heun2", "heun3", "rk4", "bosh3", "adaptive_heun", "fehlberg2", "dopri5", "tsit5",
            "dopri8"]
IMPLICIT = ["implicit_euler", "trapezoid", "implicit_midpoint"]


class ScalarField(torch.nn.Module):
    """dy/dt = -y/2 + a sin(t) on a 0-dim state."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    def forward(self, t, y):
        return -0.5 * y + self.a * torch.sin(t).to(y.dtype)


class TupleField(torch.nn.Module):
    """A damped oscillator as a tuple state ``(x (2,), v (2,))`` plus a 0-dim energy-like third part."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, t, state):
        x, v, e = state
        return v, -self.k * x - 0.1 * v, -(v * v).sum() * 0.1


class Recorder(torch.nn.Module):
    """A field with every torchdiffeq step callback; records ``(name, t0, y0, dt)``."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.calls = []

    def forward(self, t, y):
        return self.field(t, y)

    def _record(self, name, t0, y0, dt):
        self.calls.append((name, float(t0), y0, float(dt)))

    def callback_step(self, t0, y0, dt):
        self._record("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self._record("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self._record("reject", t0, y0, dt)

    def callback_step_adjoint(self, t0, y0, dt):
        self._record("step_adjoint", t0, y0, dt)

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self._record("accept_adjoint", t0, y0, dt)

    def named(self, name):
        return [(t0, y0, dt) for kind, t0, y0, dt in self.calls if kind == name]


def _state(kind, dtype):
    if kind == "scalar":
        return ScalarField().to(dtype), torch.tensor(1.3, dtype=dtype)
    if kind == "vector":
        return MLPField().to(dtype), torch.randn(4, 3, dtype=dtype)
    return TupleField().to(dtype), (torch.randn(2, dtype=dtype), torch.randn(2, dtype=dtype),
                                    torch.tensor(0.5, dtype=dtype))


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


def _leaf(state):
    return tuple(p.clone().requires_grad_(True) for p in state) if isinstance(state, tuple) else \
        state.clone().requires_grad_(True)


def _loss(ys, weights):
    return sum((y * w).sum() for y, w in zip(_parts(ys), weights))


@pytest.mark.parametrize("kind", ["scalar", "vector", "tuple"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decreasing", [False, True], ids=["increasing", "decreasing"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_states_dtypes_and_directions_match_torchdiffeq_step_for_step(kind, dtype, decreasing, method):
    skip_if_zero_weight_broken(method)
    # Euler and midpoint are the same steps in both libraries, on a grid through every output time
    # (t in float64, as torchdiffeq's tests pass it). float64 agrees to round-off; a float32 state
    # agrees to float32 round-off (pnode steps in PETSc's float64, torchdiffeq in float32).
    func, y0 = _state(kind, dtype)
    t = torch.linspace(1.0, 2.0, 5, dtype=torch.float64)
    if decreasing:
        t = t.flip(0)
    options = {"step_size": 0.125}
    y0_ours, y0_theirs = _leaf(y0), _leaf(y0)
    ours = pnode.odeint_adjoint(func, y0_ours, t, method=method, options=options)
    theirs = torchdiffeq.odeint(func, y0_theirs, t, method=method, options=options)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(_parts(ours), _parts(theirs)):
        assert a.shape == b.shape == (len(t), *b.shape[1:]) and a.dtype == dtype
        assert rel_err(a, b) < tol
    weights = [torch.randn_like(b) for b in _parts(theirs)]
    inputs_ours, inputs_theirs = (*_parts(y0_ours), *func.parameters()), (*_parts(y0_theirs), *func.parameters())
    got = torch.autograd.grad(_loss(ours, weights), inputs_ours)
    want = torch.autograd.grad(_loss(theirs, weights), inputs_theirs)
    for g, w in zip(got, want):
        assert g.dtype == dtype and rel_err(g, w) < (1e-11 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("kind", ["scalar", "vector", "tuple"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["increasing", "decreasing"])
def test_default_dopri5_matches_torchdiffeq_at_tight_tolerances(kind, decreasing):
    skip_if_zero_weight_broken("dopri5")
    func, y0 = _state(kind, torch.float64)
    t = torch.linspace(1.0, 4.0, 7, dtype=torch.float64)
    if decreasing:
        t = t.flip(0)
    y0_ours, y0_theirs = _leaf(y0), _leaf(y0)
    ours = pnode.odeint_adjoint(func, y0_ours, t, rtol=1e-10, atol=1e-12)
    theirs = torchdiffeq.odeint_adjoint(func, y0_theirs, t, rtol=1e-10, atol=1e-12)
    for a, b in zip(_parts(ours), _parts(theirs)):
        assert rel_err(a, b) < 1e-8
    weights = [torch.randn_like(b) for b in _parts(theirs)]
    got = torch.autograd.grad(_loss(ours, weights), (*_parts(y0_ours), *func.parameters()))
    want = torch.autograd.grad(_loss(theirs, weights), (*_parts(y0_theirs), *func.parameters()))
    for g, w in zip(got, want):  # a discrete and a continuous adjoint of the same exact gradient
        assert rel_err(g, w) < 1e-6


class AffineField(torch.nn.Module):
    """dy/dt = A (y - (c t + d)) + c: every explicit RK step keeps y = c t + d exactly (its stages are
    affine in t), so the derivative of the steps with respect to an output time is the exact
    flow's ``f(t_i, y_i)``, what pnode returns for ``t``: gradcheck then checks y0 and t alike."""

    def __init__(self, n):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor(-0.7, dtype=torch.float64) if n == 0 else stable_matrix(n))
        self.c = torch.nn.Parameter(torch.linspace(0.3, 0.9, max(n, 1), dtype=torch.float64).reshape(self.shape(n)))
        self.d = torch.nn.Parameter(torch.full(self.shape(n), 1.5, dtype=torch.float64))

    @staticmethod
    def shape(n):
        return () if n == 0 else (n,)

    def forward(self, t, y):
        e = y - (self.c * t + self.d)
        return (self.A * e if self.A.dim() == 0 else e @ self.A.T) + self.c

    def on_line(self, t0):
        return (self.c * t0 + self.d).detach()


GRADCHECK_CASES = [(m, {"step_size": 0.2}, {}) for m in EXPLICIT] + [("dopri5", {}, {"rtol": 1e-11, "atol": 1e-12})]


@pytest.mark.parametrize("n", [0, 3], ids=["scalar", "vector"])
@pytest.mark.parametrize("method,options,tolerances", GRADCHECK_CASES,
                         ids=[f"{m}-{'adaptive' if not o else 'fixed'}" for m, o, _ in GRADCHECK_CASES])
def test_gradcheck_y0_and_t_through_odeint_adjoint(n, method, options, tolerances):
    # Fixed steps start on the line: gradcheck's own perturbations of y0 leave it (the dynamics are
    # affine, so the y0 derivative, R(hA)^n of the method's stability function, does not depend on
    # where). Adaptive steps start off it, so that the error control, not round-off, sets the steps:
    # at tight tolerances the steps then solve the exact flow, whose t derivative pnode returns.
    field = AffineField(n)
    offset = 0.0 if options else 0.5

    def solve(y0, t):
        return pnode.odeint_adjoint(field, y0, t, method=method, options=options, adjoint_params=(), **tolerances)

    for times in ([0.5, 0.9, 1.6], [1.6, 0.9, 0.5]):
        t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
        y0 = (field.on_line(times[0]) + offset).requires_grad_(True)
        assert torch.autograd.gradcheck(solve, (y0, t))


@pytest.mark.parametrize("checkpoints", [None, 2], ids=["store-all", "checkpointed"])
def test_second_backward_through_a_retained_graph_repeats_the_first_and_a_freed_one_is_refused(checkpoints):
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, t, method="bosh3", rtol=1e-7, atol=1e-9, options={"checkpoints": checkpoints})
    loss = (ys * torch.randn_like(ys)).sum()
    inputs = (y0, t, *func.parameters())
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs, retain_graph=True)
    third = torch.autograd.grad(loss, inputs)  # frees the graph
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)  # solved again from the saved inputs: the same steps
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, inputs)


def test_a_saved_input_modified_in_place_is_refused_by_torch():
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    start = y0 * 1.0
    ys = pnode.odeint_adjoint(lambda t, y: -y, start, torch.tensor([0.0, 1.0], dtype=torch.float64),
                              adjoint_params=())
    with torch.no_grad():
        start.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ys.sum().backward()


def test_jacobian_of_the_final_state_is_the_matrix_exponential():
    A = stable_matrix(3)
    t = torch.tensor([0.0, 1.5], dtype=torch.float64)

    def final_state(y0):
        return pnode.odeint_adjoint(lambda t, y: A @ y, y0, t, rtol=1e-11, atol=1e-12, adjoint_params=())[-1]

    jacobian = torch.autograd.functional.jacobian(final_state, torch.randn(3, dtype=torch.float64))
    assert rel_err(jacobian, torch.linalg.matrix_exp(1.5 * A)) < 1e-9


class WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64))
        self.unused = torch.nn.Linear(2, 5).double()

    def forward(self, t, y):
        return torch.mm(y ** 3, self.A)


def test_unused_parameters_get_zero_gradients_and_used_ones_torchdiffeqs():
    skip_if_zero_weight_broken("dopri5")
    func = WithUnused()
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-12)
    weights = torch.rand_like(ys)
    (ys * weights).sum().backward()
    assert torch.equal(func.unused.weight.grad, torch.zeros_like(func.unused.weight))
    assert torch.equal(func.unused.bias.grad, torch.zeros_like(func.unused.bias))
    ours = (y0.grad.clone(), func.A.grad.clone())
    y0.grad = func.A.grad = None
    (torchdiffeq.odeint(func, y0, t, rtol=1e-10, atol=1e-12) * weights).sum().backward()
    for got, want in zip(ours, (y0.grad, func.A.grad)):
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("method", ["dopri5", "rk4", "implicit_euler"])
def test_a_field_of_t_alone_gives_a_unit_state_gradient(method):
    # torchdiffeq's ExpODE: f(t, y) = -0.1 exp(-0.1 t) does not depend on y, so y(t) - y0 does not either
    class ExpField(torch.nn.Module):
        def forward(self, t, y):
            return -0.1 * torch.exp(-0.1 * t) * torch.ones_like(y)

    t = torch.linspace(1.0, 8.0, 10, dtype=torch.float64)
    y0 = torch.tensor(math.exp(-0.1), dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(ExpField(), y0, t, method=method, options={"step_size": 0.05}
                              if method != "dopri5" else None)
    assert rel_err(ys, torch.exp(-0.1 * t)) < (1e-8 if method == "dopri5" else 1e-2)
    (grad,) = torch.autograd.grad(ys.sum(), y0)
    assert float(grad) == pytest.approx(len(t), rel=1e-14)  # (an implicit step's linear solve rounds)


@pytest.mark.parametrize("method", EXPLICIT + IMPLICIT)
def test_float32_state_with_decreasing_float64_times(method):
    # torchdiffeq's reverse problems: t from 8 down to 1 (PETSc time -8 .. -1; -1 is a PETSc sentinel)
    t = torch.linspace(8.0, 1.0, 10, dtype=torch.float64)
    y0 = torch.tensor([1.0, -2.0])
    options = {"step_size": 0.1}
    ours = pnode.odeint_adjoint(lambda t, y: -0.3 * y + torch.sin(t).to(y), y0.requires_grad_(True), t,
                                method=method, options=options, adjoint_params=())
    same64 = pnode.odeint(lambda t, y: -0.3 * y + torch.sin(t), y0.detach().double(), t, method=method,
                          options=options)
    assert ours.dtype == torch.float32 and rel_err(ours, same64) < 1e-5
    ours.sum().backward()
    assert torch.isfinite(y0.grad).all()


def test_max_step_inf_means_no_limit_and_max_min_step_bound_the_steps():
    field = Recorder(MLPField().double())
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    free = pnode.odeint(field, y0, t)
    free_steps = field.named("accept")
    field.calls.clear()
    assert torch.equal(pnode.odeint(field, y0, t, options={"max_step": float("inf")}), free)
    field.calls.clear()
    bounded = pnode.odeint(field, y0, t, options={"max_step": 0.05})
    steps = [dt for _, _, dt in field.named("accept")]
    assert max(steps) <= 0.05 + 1e-15 and len(steps) >= 40 > len(free_steps)
    theirs = torchdiffeq.odeint(field, y0, t, options={"max_step": 0.05})
    assert rel_err(bounded, theirs) < 1e-6
    field.calls.clear()
    pnode.odeint(field, y0, t, rtol=1e-3, atol=1e-3, options={"min_step": 0.3})
    assert all(dt >= 0.3 - 1e-15 for _, _, dt in field.named("accept")[:-1])  # the last is cut at t[-1]


def test_fixed_step_callbacks_are_torchdiffeqs():
    ours, theirs = Recorder(TupleField()), Recorder(TupleField())
    theirs.load_state_dict(ours.state_dict())
    _, y0 = _state("tuple", torch.float64)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)  # decreasing: t0 in the caller's time, dt > 0
    with pytest.warns(UserWarning, match="fixed steps.*callback_accept_step"):
        pnode.odeint(ours, y0, t, method="euler", options={"step_size": 0.125})
    with pytest.warns(UserWarning, match="does not support callbacks"):
        torchdiffeq.odeint(theirs, y0, t, method="euler", options={"step_size": 0.125})
    assert [kind for kind, *_ in ours.calls] == [kind for kind, *_ in theirs.calls] == ["step"] * 8
    for (t_a, y_a, dt_a), (t_b, y_b, dt_b) in zip(ours.named("step"), theirs.named("step")):
        assert t_a == pytest.approx(t_b, abs=1e-15) and dt_a == pytest.approx(dt_b, abs=1e-15) and dt_a > 0
        assert isinstance(y_a, tuple) and all(rel_err(a, b) < 1e-13 for a, b in zip(y_a, y_b))


def test_adaptive_callbacks_bracket_every_attempt_and_the_adjoint_reverses_the_accepted_steps():
    field = Recorder(MLPField().double())
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.6, 1.5], dtype=torch.float64)
    # a first step far too large for the tolerance: rejected, retried smaller, then accepted
    ys = pnode.odeint_adjoint(field, y0, t, method="bosh3", rtol=1e-6, atol=1e-8, options={"first_step": 0.6})
    forward = [(kind, t0, dt) for kind, t0, _, dt in field.calls]
    assert forward[:2] == [("step", 0.0, 0.6), ("reject", 0.0, 0.6)]
    assert [kind for kind, *_ in forward[::2]] == ["step"] * (len(forward) // 2)
    for (_, t0, dt), (outcome, t1, dt1) in zip(forward[::2], forward[1::2]):
        assert outcome in ("accept", "reject") and (t0, dt) == (t1, dt1)
    accepted = field.named("accept")
    for (t0, _, dt), (t1, _, _) in zip(accepted, accepted[1:]):
        assert t1 == pytest.approx(t0 + dt, abs=1e-14)  # accepted attempts chain up
    assert accepted[-1][0] + accepted[-1][2] == pytest.approx(1.5, abs=1e-14)
    after_output = [y for t0, y, _ in accepted if abs(t0 - 0.6) < 1e-14]
    assert len(after_output) == 1 and torch.equal(after_output[0], ys[1])  # y0 is the state at t0
    field.calls.clear()
    weights = torch.randn_like(ys)
    (ys * weights).sum().backward()
    backward = field.named("step_adjoint")
    assert len(backward) == len(field.named("accept_adjoint")) == len(accepted)
    for (t_end, _, dt), (t0, _, forward_dt) in zip(backward, reversed(accepted)):
        assert t_end == pytest.approx(t0 + forward_dt, abs=1e-14) and dt == pytest.approx(forward_dt, abs=1e-14)
    assert rel_err(backward[0][1], weights[-1]) < 1e-15  # the adjoint state at the end is dL/dy(t[-1])


def test_a_callback_error_surfaces_as_itself_with_where_it_happened():
    class Failing(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            if t0 > 0.5:
                raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here") as info:
        pnode.odeint(Failing(), torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                     method="rk4", options={"step_size": 0.25})
    if sys.version_info >= (3, 11):  # exception notes (PEP 678)
        assert any("PETSc callback of pnode's forward solve" in note for note in info.value.__notes__)


def _piecewise(k1, k2, jump):
    def field(t, y):
        return torch.where(t < jump, k1, k2) * y
    return field


@pytest.mark.parametrize("decreasing", [False, True], ids=["increasing", "decreasing"])
def test_jump_t_restarts_at_the_jump_with_exact_gradients(decreasing):
    skip_if_zero_weight_broken("dopri5")
    k1 = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    k2 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    exact = torch.stack([y0 * torch.exp(k1 * 0.3), y0 * torch.exp(k1 * 0.5 + k2 * 0.5)])
    if decreasing:  # t = 1, 0.3, 0 with y(1) = y0 and the same field
        t = t.flip(0)
        exact = torch.stack([y0 * torch.exp(-k2 * 0.5 - k1 * 0.2), y0 * torch.exp(-k2 * 0.5 - k1 * 0.5)])
    field = Recorder(_piecewise(k1, k2, 0.5))
    options = {"jump_t": torch.tensor([0.5, 7.0])}  # 7 lies outside t: ignored, as in torchdiffeq
    ys = pnode.odeint_adjoint(field, y0, t, rtol=1e-11, atol=1e-12, options=options, adjoint_params=(k1, k2))
    assert any(t0 == 0.5 for t0, _, _ in field.named("accept"))  # a step starts at the jump
    assert rel_err(ys[1:], exact) < 1e-9
    theirs = torchdiffeq.odeint(_piecewise(k1, k2, 0.5), y0, t, rtol=1e-11, atol=1e-12,
                                options={"jump_t": torch.tensor([0.5])})
    assert rel_err(ys, theirs) < 1e-9
    weights = torch.randn_like(exact)
    got = torch.autograd.grad((ys[1:] * weights).sum(), (y0, k1, k2))
    want = torch.autograd.grad((exact * weights).sum(), (y0, k1, k2))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-8


def test_jump_t_with_fixed_steps_restarts_the_grid_and_step_t_lands_adaptive_steps():
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, y0, t, method="rk4", options={"step_size": 0.3, "jump_t": [0.5]})
    ref = rk_solve(func, y0, [0.0, 0.5, 1.0], 0.3, TABLEAUS["rk4"])[::2]  # steps 0 .3 .5 | .8 1
    assert rel_err(ys, ref) < 1e-14
    weights = torch.randn_like(ref)
    for g, w in zip(torch.autograd.grad((ys * weights).sum(), (y0, *func.parameters())),
                    torch.autograd.grad((ref * weights).sum(), (y0, *func.parameters()))):
        assert rel_err(g, w) < 1e-12
    field = Recorder(func)
    with pytest.raises(pnode.InputError, match="share the time 0.5"):
        pnode.odeint(field, y0, t, options={"jump_t": [0.5], "step_t": [0.25, 0.5]})
    stepped = pnode.odeint(field, y0.detach(), t, options={"step_t": torch.tensor([0.25, 0.8], dtype=torch.float64)})
    starts = [t0 for t0, _, _ in field.named("accept")]
    assert stepped.shape == (2, 2, 3)
    assert all(min(abs(t0 - stop) for t0 in starts) < 1e-14 for stop in (0.25, 0.8))


def test_grid_constructor_steps_like_torchdiffeqs():
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def grid(func, y0, t):  # uneven steps through every output time
        return torch.tensor([0.0, 0.1, 0.25, 0.5, 0.6, 0.8, 1.0], dtype=t.dtype)

    ours = pnode.odeint_adjoint(func, y0, t, method="euler", options={"grid_constructor": grid})
    theirs = torchdiffeq.odeint(func, y0, t, method="euler", options={"grid_constructor": grid})
    assert rel_err(ours, theirs) < 1e-14
    weights = torch.randn_like(theirs)
    for g, w in zip(torch.autograd.grad((ours * weights).sum(), (y0, *func.parameters())),
                    torch.autograd.grad((theirs * weights).sum(), (y0, *func.parameters()))):
        assert rel_err(g, w) < 1e-12
    with pytest.raises(pnode.InputError, match="both set the steps"):
        pnode.odeint(func, y0, t, method="rk4", options={"grid_constructor": grid, "step_size": 0.1})
    with pytest.raises(pnode.InputError, match="adapts its steps.*step_t"):
        pnode.odeint(func, y0, t, method="dopri5", options={"grid_constructor": grid})
    with pytest.raises(pnode.InputError, match="from t\\[0\\]"):
        pnode.odeint(func, y0, t, method="rk4", options={"grid_constructor": lambda f, y, t: t[1:]})


@pytest.mark.parametrize("options", [None, {"checkpoints": 2}], ids=["store-all", "checkpointed"])
def test_a_single_output_time_returns_y0_with_an_identity_gradient(options):
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    ours = pnode.odeint_adjoint(MLPField().double(), y0, t, method="rk4", options=options)
    theirs = torchdiffeq.odeint_adjoint(MLPField().double(), y0, t)
    assert ours.shape == theirs.shape == (1, 2, 3) and torch.equal(ours, theirs)
    weights = torch.randn_like(ours)
    grad_y0, grad_t = torch.autograd.grad((ours * weights).sum(), (y0, t), allow_unused=True)
    assert torch.equal(grad_y0, weights[0]) and (grad_t is None or float(grad_t.abs().max()) == 0.0)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_an_empty_state_returns_at_once(method):
    y0 = torch.ones(0, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    ys = pnode.odeint_adjoint(lambda t, y: -y, y0, t, method=method, adjoint_params=())
    assert ys.shape == (4, 0)
    ys.sum().backward()
    assert y0.grad.shape == (0,)


def test_torchdiffeq_names_are_served_or_refused_with_a_reason():
    served = ["implicit_euler", "trapezoid", "implicit_midpoint", "heun2", "heun3", "fehlberg2", "tsit5", "dopri8"]
    assert set(served) <= set(pnode.available_methods())
    reasons = {"radauIIA3": "TSIRK.*no adjoint", "gl6": "TSIRK.*no adjoint", "sdirk2": "no DIRK method",
               "trbdf2": "wrong gradients", "explicit_adams": "multistep", "scipy_solver": "PETSc only"}
    for name, reason in reasons.items():
        with pytest.raises(pnode.InputError, match=reason):
            pnode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method=name)
