"""pnode.odeint_event: event times against closed forms, gradients against finite differences and
torchdiffeq, the errors it raises, and two ranks under MPI.

References share no code with pnode: the ball's fall in closed form (for Euler and backward Euler
the closed form of the scheme itself, whose error is first order), central finite differences of
the call, and torchdiffeq's own ``odeint_event``.

Tolerances. The event time is refined to a root of the event function along the computed
solution, so a method exact for the ball's quadratic fall (every RK of order >= 2, Crank-Nicolson)
meets ``sqrt(2h/g)`` to round-off (1e-13 allowed), far inside any event tolerance. The gradients are
the derivatives of the computed event time itself: the crossing step is differentiated with
respect to its length by PETSc's adjoint, and a shift of ``t0`` shifts every step. Against central
differences of step 1e-6 (truncation and round-off about 1e-10 here) they agree to 1e-8 or better
for every method measured (dopri5, bosh3, rk4, midpoint, euler, cn, beuler); 1e-6 is asserted.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import command_line
from problems import MLPField

import pnode

F64 = torch.float64
G = 9.81
H = 1.0
DROP = math.sqrt(2 * H / G)  # a ball dropped from H reaches the ground at sqrt(2 H / g)

EXACT_FOR_THE_FALL = {
    "dopri5": {}, "bosh3": {}, "adaptive_heun": {"event_tol": 1e-3},
    "rk4": {"step_size": 0.01}, "midpoint": {"step_size": 0.01}, "cn": {"step_size": 0.05},
}


def falling(t, y):
    """Height and velocity under gravity: y = (h, v), dy/dt = (v, -g)."""
    return torch.stack([y[1], torch.full_like(y[1], -G)])


def height(t, y):
    return y[0]


def dropped():
    return torch.tensor([H, 0.0], dtype=F64)


# ---------------------------------------------------------------------------------------------- event times
@pytest.mark.parametrize("method", sorted(EXACT_FOR_THE_FALL))
def test_drop_time_matches_sqrt_2h_over_g(method):
    options = dict(EXACT_FOR_THE_FALL[method])
    rtol = 1e-3 if method == "adaptive_heun" else 1e-7  # heun's embedded Euler asks tiny steps of a quadratic
    event_t, solution = pnode.odeint_event(falling, dropped(), torch.tensor(0.0, dtype=F64), event_fn=height,
                                           method=method, options=options, rtol=rtol)
    assert event_t.shape == () and event_t.dtype == F64
    assert solution.shape == (2, 2)
    assert abs(float(event_t) - DROP) < 1e-13
    assert torch.equal(solution[0], dropped())
    assert abs(float(solution[1, 0])) < 1e-14
    assert abs(float(solution[1, 1]) + G * DROP) < 1e-12


def _euler_event_time(h):
    """The event time of forward Euler with step h, in closed form: v_n = -g n h, y_n = H - g h^2 n (n - 1) / 2;
    the step from the last positive y_n reaches zero after y_n / -v_n."""
    n = 1
    while H - G * h * h * (n + 1) * n / 2 > 0:
        n += 1
    y_n, v_n = H - G * h * h * n * (n - 1) / 2, -G * n * h
    return n * h + y_n / -v_n


def _backward_euler_event_time(h):
    """Backward Euler: v_n = -g n h, y_n = H - g h^2 n (n + 1) / 2; a step of size s from (y_n, v_n) reaches
    y_n + s (v_n - g s), zero at s = (v_n + sqrt(v_n^2 + 4 g y_n)) / (2 g)."""
    n = 0
    while H - G * h * h * (n + 1) * (n + 2) / 2 > 0:
        n += 1
    y_n, v_n = H - G * h * h * n * (n + 1) / 2, -G * n * h
    return n * h + (v_n + math.sqrt(v_n * v_n + 4 * G * y_n)) / (2 * G)


@pytest.mark.parametrize("method,closed_form", [("euler", _euler_event_time), ("beuler", _backward_euler_event_time)])
def test_first_order_methods_match_their_own_closed_form(method, closed_form):
    h = 0.01
    event_t, _ = pnode.odeint_event(falling, dropped(), 0.0, event_fn=height, method=method, options={"step_size": h})
    assert abs(float(event_t) - closed_form(h)) < 1e-12
    assert abs(float(event_t) - DROP) < 0.6 * G * h  # and first-order close to the exact fall


def test_event_tolerance_does_not_move_a_root():
    # the tolerance only decides what counts as zero at t0 and what is a jump; a root is a root
    times = [float(pnode.odeint_event(falling, dropped(), 0.0, event_fn=height, options={"event_tol": tol})[0])
             for tol in (1e-1, 1e-6, 1e-12)]
    assert max(abs(t - DROP) for t in times) < 1e-13


def test_event_tolerance_option_and_command_line():
    # thrown down from 1e-5 m: a tolerance below that height sees the landing at once; one above it
    # takes the start for a zero (not an event), and the ball falls on with no crossing before max_t
    start = torch.tensor([1e-5, -1.0], dtype=F64)

    def landing(options):
        return float(pnode.odeint_event(falling, start, 0.0, event_fn=height, options={"max_t": 1.0, **options})[0])

    assert abs(landing({}) - 1e-5) < 1e-9  # the default 1e-6
    assert abs(landing({"event_tol": 1e-7}) - 1e-5) < 1e-9
    with pytest.raises(pnode.SolverError, match="no event between"):
        landing({"event_tol": 1e-4})
    with command_line(ts_event_tol="1e-4"), pytest.raises(pnode.SolverError, match="no event between"):
        landing({"event_tol": 1e-7})  # the command line wins, as for every PETSc option


def test_reverse_time():
    # From the impact state back in time: the height passes H/2 at t = sqrt(H/g).
    impact = torch.tensor([0.0, -G * DROP], dtype=F64)
    event_t, solution = pnode.odeint_event(falling, impact, DROP, event_fn=lambda t, y: y[0] - H / 2,
                                           reverse_time=True)
    assert abs(float(event_t) - math.sqrt(H / G)) < 1e-13
    assert abs(float(solution[1, 0]) - H / 2) < 1e-13


def test_several_event_functions_the_first_to_cross_wins():
    levels = [0.2, 0.5, 0.9]
    for order in ([0, 1, 2], [2, 0, 1]):
        event_t, solution = pnode.odeint_event(
            falling, dropped(), 0.0, event_fn=lambda t, y, o=order: torch.stack([y[0] - levels[i] for i in o]))
        assert abs(float(event_t) - math.sqrt(2 * (H - 0.9) / G)) < 1e-13
        assert abs(float(solution[1, 0]) - 0.9) < 1e-13


def test_a_zero_at_t0_is_not_an_event():
    # A ball thrown up from the ground: the next crossing is the landing, at 2 v0 / g.
    v0 = 3.0
    event_t, _ = pnode.odeint_event(falling, torch.tensor([0.0, v0], dtype=F64), 0.0, event_fn=height)
    assert abs(float(event_t) - 2 * v0 / G) < 1e-13


def test_tuple_state_and_float32():
    state = (torch.tensor([H], dtype=torch.float32), torch.tensor([0.0], dtype=torch.float32))
    event_t, (h, v) = pnode.odeint_event(lambda t, s: (s[1], torch.full_like(s[1], -G)), state,
                                         torch.tensor(0.0, dtype=torch.float32), event_fn=lambda t, s: s[0][0])
    assert event_t.dtype == h.dtype == torch.float32 and h.shape == v.shape == (2, 1)
    assert abs(float(event_t) - DROP) < 1e-6
    assert abs(float(v[1, 0]) + G * DROP) < 1e-5


def test_values_do_not_depend_on_taking_gradients():
    func, event_fn, y0, t0 = _problem()
    with torch.no_grad():
        t_plain, s_plain = pnode.odeint_event(func, y0, t0, event_fn=event_fn, rtol=1e-9, atol=1e-10)
    t_grad, s_grad = pnode.odeint_event(func, y0.clone().requires_grad_(), t0, event_fn=event_fn, rtol=1e-9,
                                        atol=1e-10)
    assert t_grad.requires_grad and s_grad.requires_grad
    assert torch.equal(t_plain, t_grad.detach()) and torch.equal(s_plain, s_grad.detach())


def test_the_first_crossing_in_a_step_is_the_event_whatever_the_step_s_end():
    # torchdiffeq's physics idiom: the event function is exactly 0 past a terminal time. After a bounce,
    # dopri5 takes one long step (the fall is quadratic: no error to control) that ends past the terminal
    # time, where the function is 0, with the landing inside the step: the landing is the event.
    t_end = 50.0

    def event_fn(t, y):
        return torch.zeros_like(t) if t > t_end else y[0]

    thrown = torch.tensor([1e-9, 4.0], dtype=F64)  # just off the ground, going up at 4 m/s
    for odeint_event in (pnode.odeint_event, lambda *a, **k: pnode.odeint(*a[:2], torch.stack([a[2], a[2] + 1]),
                                                                           **k)):
        event_t, solution = odeint_event(falling, thrown, torch.tensor(0.0, dtype=F64), event_fn=event_fn,
                                         rtol=1e-8, atol=1e-8)
        landing = (4.0 + math.sqrt(16.0 + 2 * G * 1e-9)) / G
        assert abs(float(event_t) - landing) < 1e-12
        assert abs(float(solution[-1, 0])) < 1e-12


def test_a_plateau_at_zero_and_a_terminal_time_alone():
    clamped = pnode.odeint_event(falling, dropped(), 0.0, event_fn=lambda t, y: torch.clamp(y[0], min=0.0))[0]
    assert abs(float(clamped) - DROP) < 1e-12  # the plateau starts at the landing
    flying = torch.tensor([H, 10.0], dtype=F64, requires_grad=True)

    def terminal(t, y):
        return torch.zeros_like(t) if t > 0.25 else y[0]

    event_t, solution = pnode.odeint_event(falling, flying, 0.0, event_fn=terminal)
    assert abs(float(event_t) - 0.25) < 1e-12 and not event_t.requires_grad  # a jump: its time has no derivative
    (grad,) = torch.autograd.grad(solution[-1, 0], flying)  # the state at that fixed time: h + v t - g t^2 / 2
    assert torch.allclose(grad, torch.tensor([1.0, float(event_t)], dtype=F64), atol=1e-12)
    assert abs(float(solution[-1, 0].detach()) - (H + 10 * float(event_t) - G * float(event_t) ** 2 / 2)) < 1e-12


@pytest.mark.parametrize("case", ["second root inside", "zero at the end", "sign flips twice", "several functions"])
def test_locate_finds_the_first_change_of_sign_on_stub_functions(case):
    # event_refine.locate on plain functions of h: the stand-in (the step's interpolant) differs from the
    # computed solution by a small smooth term, as an interpolant does
    from pnode._impl.event_refine import locate

    exact = {"second root inside": lambda h: np.array([(h - 0.3) * (h - 0.7)]),
             "zero at the end": lambda h: np.array([0.0 if h > 0.8 else 1.0 - 2.0 * h]),
             "sign flips twice": lambda h: np.array([math.cos(9 * h)]),
             "several functions": lambda h: np.array([0.9 - h, 0.4 - h, h + 1.0])}[case]
    cheap = lambda h: exact(h) + 1e-6 * h * (1 - h)  # noqa: E731
    first = {"second root inside": 0.3, "zero at the end": 0.5, "sign flips twice": math.pi / 18,
             "several functions": 0.4}[case]
    start, end = exact(0.0), exact(1.0)
    crossing = locate(cheap, exact, np.sign(start), 1.0, start, end, 1e-15, 1e-9)
    assert abs(crossing.length - first) < 1e-12 and not crossing.jump
    assert crossing.index == (1 if case == "several functions" else 0)


def test_locate_tells_a_jump_from_a_root():
    from pnode._impl.event_refine import locate

    terminal = lambda h: np.array([0.0 if h > 0.6 else 2.0])  # noqa: E731
    crossing = locate(terminal, terminal, np.array([1.0]), 1.0, terminal(0.0), terminal(1.0), 1e-15, 1e-9)
    assert crossing.jump and abs(crossing.length - 0.6) < 1e-12


# ---------------------------------------------------------------------------------------------- gradients
class Threshold(torch.nn.Module):
    """g(t, y) = w . y - c + 0.1 t: a learnable plane the state crosses."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.5, -0.3], dtype=F64))
        self.c = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))

    def forward(self, t, y):
        return (self.w * y).sum() - self.c + 0.1 * t


def _problem():
    """A nonlinear time-dependent field and a plane it crosses at t = 1.97 (from t0 = 0.2)."""
    torch.manual_seed(0)
    return MLPField(3, 8).double(), Threshold(), torch.tensor([0.1, -0.2, 0.3], dtype=F64), torch.tensor(0.2, dtype=F64)


# Coarse steps on purpose: the gradients are those of the computed solution at any step size.
GRADIENT_SETTINGS = {
    "dopri5": dict(rtol=1e-11, atol=1e-12),
    "rk4": dict(options={"step_size": 0.1}),
    "euler": dict(options={"step_size": 0.05}),
    "cn": dict(options={"step_size": 0.1, "ksp_rtol": 1e-12, "snes_rtol": 1e-12, "snes_atol": 1e-14}),
}
# (name, flat index) of the inputs differentiated; cn's Newton-Krylov solves take a second each, so fewer
GRADIENT_INPUTS = [("y0", 0), ("y0", 1), ("y0", 2), ("t0", 0), ("func.lin2.weight", 4), ("func.time", 1),
                   ("event_fn.w", 2), ("event_fn.c", 0)]
CN_INPUTS = [("y0", 1), ("t0", 0), ("func.lin2.weight", 4), ("event_fn.c", 0)]


def _finite_difference(call, tensor, index, eps=1e-6):
    with torch.no_grad():
        flat = tensor.view(-1)
        flat[index] += eps
        plus = call()
        flat[index] -= 2 * eps
        minus = call()
        flat[index] += eps
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("method", sorted(GRADIENT_SETTINGS))
def test_event_time_gradients_match_finite_differences(method):
    func, event_fn, y0, t0 = _problem()
    settings = GRADIENT_SETTINGS[method]

    def loss(y, t):
        # the event time, and the state there (which moves with it)
        event_t, solution = pnode.odeint_event(func, y, t, event_fn=event_fn, method=method, **settings)
        return event_t + 0.3 * solution[-1, 1]

    y, t = y0.clone().requires_grad_(), t0.clone().requires_grad_()
    inputs = {"y0": y, "t0": t, "func.lin2.weight": func.lin2.weight, "func.time": func.time,
              "event_fn.w": event_fn.w, "event_fn.c": event_fn.c}
    grads = dict(zip(inputs, torch.autograd.grad(loss(y, t), list(inputs.values()))))
    for name, index in CN_INPUTS if method == "cn" else GRADIENT_INPUTS:
        target = {"y0": y0, "t0": t0}.get(name, inputs[name])
        fd = float(_finite_difference(lambda: loss(y0, t0), target, index))
        got = float(grads[name].reshape(-1)[index])
        assert abs(got - fd) <= 1e-6 * abs(fd), (name, index, got, fd)


def test_reverse_time_gradients_match_finite_differences():
    func, event_fn, y0, _ = _problem()
    t0 = torch.tensor(2.5, dtype=F64)  # backwards from here, the plane is crossed at t = 2.09

    def loss(y, t):
        event_t, solution = pnode.odeint_event(func, y, t, event_fn=event_fn, reverse_time=True, method="rk4",
                                               options={"step_size": 0.1})
        return event_t + 0.3 * solution[-1, 1]

    y, t = y0.clone().requires_grad_(), t0.clone().requires_grad_()
    grads = torch.autograd.grad(loss(y, t), [y, t, event_fn.c, func.time])
    for grad, target in zip(grads, [y0, t0, event_fn.c, func.time]):
        fd = float(_finite_difference(lambda: loss(y0, t0), target, 0))
        assert abs(float(grad.reshape(-1)[0]) - fd) <= 1e-6 * abs(fd)


def test_closure_tensors_of_event_fn_get_gradients():
    func, _, y0, t0 = _problem()
    level = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def event_fn(t, y):
        return y.sum() - level

    event_t, _ = pnode.odeint_event(func, y0, t0, event_fn=event_fn, rtol=1e-11, atol=1e-12)
    (grad,) = torch.autograd.grad(event_t, level)
    with torch.no_grad():
        fd = _finite_difference(lambda: pnode.odeint_event(func, y0, t0, event_fn=event_fn, rtol=1e-11,
                                                           atol=1e-12)[0], level, 0)
    assert abs(float(grad) - float(fd)) <= 1e-6 * abs(float(fd))


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_gradients_match_torchdiffeq(interface):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, event_fn, y0, t0 = _problem()
    results = {}
    for name, odeint_event, kwargs in [
            ("pnode", pnode.odeint_event, {}),
            ("torchdiffeq", torchdiffeq.odeint_event, {"odeint_interface": getattr(torchdiffeq, interface)})]:
        y, t = y0.clone().requires_grad_(), t0.clone().requires_grad_()
        event_t, solution = odeint_event(func, y, t, event_fn=event_fn, method="dopri5", rtol=1e-11, atol=1e-12,
                                         **kwargs)
        # torchdiffeq 0.2.5 routes no gradient to event_fn's parameters: compare y0, t0 and func's
        grads = torch.autograd.grad(event_t + solution[-1].sum(), [y, t, *func.parameters()])
        results[name] = (float(event_t.detach()), solution.detach(), grads)
    (t_p, s_p, g_p), (t_t, s_t, g_t) = results["pnode"], results["torchdiffeq"]
    assert abs(t_p - t_t) < 1e-8  # torchdiffeq bisects its interpolant to atol
    assert float((s_p - s_t).abs().max()) < 1e-8
    for a, b in zip(g_p, g_t):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm())


def test_odeint_interface_odeint_keeps_graphs_and_gives_the_same_gradients():
    func, event_fn, y0, t0 = _problem()
    results = []
    for interface in (pnode.odeint, pnode.odeint_adjoint):
        y = y0.clone().requires_grad_()
        event_t, solution = pnode.odeint_event(func, y, t0, event_fn=event_fn, odeint_interface=interface)
        results.append((event_t.detach(), torch.autograd.grad(event_t + solution[-1].sum(), [y, *func.parameters()])))
    (t_graphs, g_graphs), (t_states, g_states) = results
    assert torch.equal(t_graphs, t_states)
    for a, b in zip(g_graphs, g_states):
        assert float((a - b).norm()) <= 1e-12 * float(b.norm())


# ---------------------------------------------------------------------------------------------- errors
def test_no_event_before_max_t():
    with pytest.raises(pnode.SolverError, match=r"no event between t0=0 and max_t=0\.3.*raise options\['max_t'\]") as e:
        pnode.odeint_event(falling, dropped(), 0.0, event_fn=height, options={"max_t": 0.3})
    assert e.value.reason == "NO_EVENT" and abs(e.value.t_reached - 0.3) < 1e-12


def test_no_event_within_max_num_steps():
    with pytest.raises(pnode.SolverError, match=r"no event within 20 steps.*max_num_steps") as e:
        pnode.odeint_event(falling, dropped(), 0.0, event_fn=height, method="rk4",
                           options={"step_size": 0.01, "max_num_steps": 20})
    assert e.value.reason == "NO_EVENT"


@pytest.mark.parametrize("bad,message", [
    (lambda t, y: torch.stack([y, y]), r"returned shape \(2, 2\).*one real value per event function"),
    (lambda t, y: y[:0], r"returned shape \(0,\)"),
    (lambda t, y: float(y[0]), "returned float.*must return a tensor"),
    (lambda t, y: (y[0] > 0).long(), "returned dtype torch.int64.*real floating point"),
    (lambda t, y: y[0].to(torch.complex128), "returned dtype torch.complex128"),
])
def test_event_fn_must_return_one_real_value_per_event(bad, message):
    with pytest.raises(pnode.InputError, match=message):
        pnode.odeint_event(falling, dropped(), 0.0, event_fn=bad)


def test_event_fn_must_keep_its_number_of_events():
    def changing(t, y):
        return y[:1] if float(t) == 0.0 else y

    with pytest.raises(pnode.InputError, match="returned 2 values at t=.* but 1 at t0"):
        pnode.odeint_event(falling, dropped(), 0.0, event_fn=changing)


@pytest.mark.parametrize("event_fn,root", [(lambda t, y: (t - 0.3) ** 3 + 0 * y[0], 0.3),
                                           (lambda t, y: (y[0] - 0.5) ** 3, math.sqrt(2 * (H - 0.5) / G))],
                         ids=["time", "state"])
def test_grazing_event(event_fn, root):
    # a triple root: the event function crosses zero with zero slope, dg/dt + dg/dy . f = 0; the time is
    # found (a sign change, to the cube root of round-off), but it has no derivative, which a gradient asks for
    event_t, _ = pnode.odeint_event(falling, dropped(), 0.0, event_fn=event_fn)
    assert abs(float(event_t) - root) < 1e-4
    with pytest.raises(pnode.SolverError, match="touches zero without crossing it transversally") as e:
        pnode.odeint_event(falling, dropped().requires_grad_(), 0.0, event_fn=event_fn)
    assert e.value.reason == "GRAZING_EVENT"


def test_event_fn_without_autograd_is_reported_when_a_gradient_is_wanted():
    with pytest.raises(pnode.SolverError, match="build it from torch operations on t and y"):
        pnode.odeint_event(falling, dropped().requires_grad_(), 0.0,
                           event_fn=lambda t, y: torch.tensor(float(y[0].detach()), dtype=F64))


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "rk4"}, r"method 'rk4' takes fixed steps.*options=\{'step_size': h\}"),
    ({"method": "trapezoid"}, "method 'trapezoid' takes fixed steps"),
    ({"options": {"event_tol": -1.0}}, r"options\['event_tol'\] must be positive"),
    ({"options": {"max_t": -1.0}}, r"options\['max_t'\] = -1.0 must be finite and above t0 = 0"),
    ({"options": {"max_t": 1.0}, "reverse_time": True}, "must be finite and below t0"),
    ({"odeint_interface": lambda *a, **k: None}, "odeint_interface must be None or pnode.odeint_adjoint"),
    ({"reverse_time": 1}, "reverse_time must be True or False"),
    ({"event_fn": 3.0}, "event_fn must be callable"),
    ({"options": {"ts_adapt_dt_mx": 0.1}}, r"options \['ts_adapt_dt_mx'\] were not used by PETSc"),
    ({"options": {"jump_t": [0.2]}}, "a solve until an event has none"),
    ({"adjoint_method": "rk4"}, "adjoint_method='rk4' differs"),
])
def test_bad_arguments(kwargs, message):
    kwargs = {"event_fn": height, **kwargs}
    with pytest.raises(pnode.InputError, match=message):
        pnode.odeint_event(falling, dropped(), 0.0, **kwargs)


@pytest.mark.parametrize("t0,message", [(torch.zeros(2, dtype=F64), r"single time.*shape \(2,\)"),
                                        ("0", "t0 must be a number or a one-element tensor"),
                                        (float("inf"), "t0 must be finite")])
def test_bad_t0(t0, message):
    with pytest.raises(pnode.InputError, match=message):
        pnode.odeint_event(falling, dropped(), t0, event_fn=height)


def test_one_element_t0_like_torchdiffeq():
    event_t, _ = pnode.odeint_event(falling, dropped(), torch.tensor([0.0], dtype=F64), event_fn=height)
    assert event_t.shape == () and abs(float(event_t) - DROP) < 1e-13


# ---------------------------------------------------------------------------------------------- MPI
def test_two_ranks_match_one_rank(tmp_path_factory):
    from test_mpi import MPIRUN, launch

    if MPIRUN is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    results = launch(tmp_path_factory, "events.py", timeout=120, watchdog=90).check().results
    assert results[0]["event_t"] == results[1]["event_t"], "every rank stops at the same time"
    for key in ("event_t", "state", "y0_grad", "param_grad", "event_param_grad", "t0_grad"):
        assert results[0]["errors"][key] <= 1e-10, key


# ---------------------------------------------------------------------------------------------- example
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


@pytest.fixture
def bouncing_ball():
    sys.path.insert(0, EXAMPLES)
    import bouncing_ball

    threads = torch.get_num_threads()  # the example sets one thread (--threads 1)
    yield bouncing_ball
    torch.set_num_threads(threads)


def test_bouncing_ball_example_recovers_the_restitution_coefficient(bouncing_ball, tmp_path):
    # the defaults; the test process keeps glibc's policy for freed memory (the example would change it)
    summary = bouncing_ball.main(["--out", str(tmp_path), "--no-progress", "--freed-memory", "default"])
    assert abs(summary["restitution"] / summary["true_restitution"] - 1) < 0.02
    assert summary["bounce_time_error"] < 1e-10  # pnode's bounce times against the closed form, at the fitted e
    assert os.path.getsize(summary["figure"]) > 0


def test_bouncing_ball_resumed_run_equals_uninterrupted_run(bouncing_ball, tmp_path):
    args = ["--n-obs", "10", "--bounces", "2", "--no-plot", "--no-progress", "--freed-memory", "default"]
    bouncing_ball.main([*args, "--niters", "3", "--out", str(tmp_path / "whole")])
    bouncing_ball.main([*args, "--niters", "1", "--out", str(tmp_path / "parts")])
    bouncing_ball.main([*args, "--niters", "3", "--out", str(tmp_path / "parts"), "--resume"])
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 3
    assert torch.equal(a["model"]["logit"], b["model"]["logit"])


def test_bouncing_ball_help():
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "bouncing_ball.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--resume" in proc.stdout and "--true-e" in proc.stdout
