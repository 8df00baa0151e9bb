"""pnode on either PETSc precision: the default float64 build and a single-precision (float32) one.

Every test here runs on whichever build this interpreter's petsc4py has, with tolerances scaled
by that build's machine epsilon; ``scripts/test_petsc_single.sh`` runs them on a single-precision
build (PETSc keeps both the state and the time in float32 there).
"""

import os

import numpy as np
import pytest
import torch
from conftest import rel_err, skip_if_zero_weight_broken
from problems import MLPField, ReLUField, stable_matrix

import pnode
from pnode._compat import PETSc
from pnode._impl.bridge import petsc_dtype, petsc_eps
from pnode._impl.odeint import odeint_adjoint_reported
from pnode.testing.networks import ODENetFunc
from pnode.testing.petsc_arithmetic import forward_record_of, petsc_rk_reference, petsc_tableau
from pnode.testing.references import TABLEAUS, in_dtype, reference, relative_error, rk_solve

SINGLE = petsc_eps() > 1e-10


def test_precision_constants_follow_the_build():
    assert petsc_eps() == float(np.finfo(PETSc.RealType).eps)
    assert petsc_dtype() == torch.from_numpy(np.zeros(1, dtype=PETSc.ScalarType)).dtype
    assert petsc_dtype() == (torch.float32 if SINGLE else torch.float64)
    # scripts/test_petsc_single.sh sets this: its build must really be a single-precision one
    expected = os.environ.get("PNODE_EXPECT_PETSC_PRECISION")
    if expected:
        assert ("single" if SINGLE else "double") == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_at_times_that_are_not_binary_fractions(dtype):
    """0.1, 0.2, ... are inexact in binary, and in a float32 PETSc its time sums round differently
    from float64's: every output must still be hit with no extra sliver step, and be accurate."""
    A = stable_matrix(3)
    y0 = torch.randn(3, dtype=torch.float64)
    t = torch.linspace(0, 1, 11, dtype=dtype)
    counter = pnode._impl.rhs.EvaluationCounter()
    ys = odeint_adjoint_reported(lambda t, y: y @ A.to(y.dtype).T, y0.to(dtype), t, method="rk4",
                              options={"step_size": 0.03}, counter=counter)
    # 0.1 / 0.03: three full steps and one cut step per interval, four evaluations each.
    assert counter.forward == 10 * 4 * 4
    exact = torch.stack([torch.linalg.matrix_exp(A * float(ti)) @ y0 for ti in t.double()])
    scale = float(exact.abs().max())
    # rk4's error at h = 0.03 is ~1e-7 here; round-off is the larger of the two dtypes' epsilons.
    tol = 1e-6 + 50 * max(petsc_eps(), torch.finfo(dtype).eps)
    assert float((ys.double() - exact).abs().max()) <= tol * scale


def _steps_to(end: float, h: float, planned=None) -> int:
    """Fixed steps of ``h`` from 0 to ``end`` with the time summed in float32, as a single-precision
    PETSc sums it, each step decided by :func:`pnode._impl.schedule.lands_on_output`."""
    from pnode._impl.schedule import lands_on_output

    t, steps = np.float32(0.0), 0
    while True:
        steps += 1
        if lands_on_output(end - float(t), h, planned is not None and steps >= planned):
            return steps
        t = np.float32(t + np.float32(h))


@pytest.mark.parametrize("end,h,steps,short", [(5.0, 0.1, 50, True), (1.0, 0.001, 1000, True),
                                                (1.0, 0.002, 500, True), (1.0, 0.3, 4, False),
                                                (7.0, 0.07, 100, False)])
def test_the_planned_last_fixed_step_absorbs_a_float32_time_sum_s_drift(end, h, steps, short):
    """``short``: the float32 sum falls short of ``end`` by more than a sliver, and without the
    count a sliver step would follow (the sum can also overshoot: then the last step is cut)."""
    from pnode._impl.schedule import fixed_steps_in

    assert fixed_steps_in(end, h) == steps
    assert _steps_to(end, h, planned=steps) == steps
    assert _steps_to(end, h) == steps + short


def test_the_planned_last_step_is_stretched_by_half_a_step_at_most():
    """A miscounted interval (or one with a retried step, which is not the planned last) is stepped,
    not swallowed by a stretched last step."""
    from pnode._impl.schedule import lands_on_output

    assert not lands_on_output(0.16, 0.1, planned_last=True)
    assert not lands_on_output(0.1 * (1 + 2e-3), 0.1, planned_last=False)
    assert lands_on_output(0.1 * (1 + 2e-3), 0.1, planned_last=True)


@pytest.mark.parametrize("end,h,steps", [(5.0, 0.1, 50), (1.0, 0.001, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_fixed_steps_end_on_the_output_time_without_a_sliver_step(dtype, end, h, steps):
    """A float32 PETSc's time sum drifts from the output time by ~1e-4 of a step after 50 steps of
    0.1, by several percent after 1000 of 0.001: more than the round-off of one addition. The last
    step still lands on the output (no extra step)."""
    A = stable_matrix(2)
    counter = pnode._impl.rhs.EvaluationCounter()
    odeint_adjoint_reported(lambda t, y: y @ A.to(y.dtype).T, torch.ones(2, dtype=dtype),
                         torch.tensor([0.0, end], dtype=dtype), method="rk4", options={"step_size": h},
                         counter=counter)
    assert counter.forward == steps * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_gradients_match_autograd_through_the_same_steps(method, dtype):
    func = MLPField().to(dtype)
    y0 = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 0.35, 1.0], dtype=dtype)
    h = 0.1
    params = (y0, *func.parameters())
    out = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": h})
    got = torch.autograd.grad(out.pow(2).sum(), params)
    # the reference runs in float64 whatever the state's dtype
    ref_func = MLPField().double()
    ref_func.load_state_dict({k: v.double() for k, v in func.state_dict().items()})
    y0_ref = y0.detach().double().requires_grad_(True)
    ref_out = rk_solve(ref_func, y0_ref, [0.0, 0.35, 1.0], h, TABLEAUS[method])
    want = torch.autograd.grad(ref_out.pow(2).sum(), (y0_ref, *ref_func.parameters()))
    # relative round-off of ~20 steps in the coarser of PETSc's and the state's precision
    tol = 1e3 * max(petsc_eps(), torch.finfo(dtype).eps)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert rel_err(g, w) <= tol


@pytest.mark.skipif(SINGLE, reason="a float32 PETSc sums in float32: the state's own precision")
@pytest.mark.parametrize("method", ["euler", "rk4", "bosh3", "dopri5"])
def test_float32_gradients_equal_autograd_through_pnode_s_mixed_arithmetic(method):
    """On a float64 PETSc a float32 state is summed in float64 and evaluated in float32. Autograd
    through the same steps done that way gives pnode's gradient to float32 VJP round-off, whatever
    the ReLUs do (a float32-throughout reference flips some of them)."""
    skip_if_zero_weight_broken(method)
    torch.manual_seed(3)
    func = ReLUField()
    y0 = torch.randn(64, 6, requires_grad=True)
    times, h = [0.0, 0.3, 1.0], 0.05
    params = (y0, *func.parameters())
    out = pnode.odeint_adjoint(func, y0, torch.tensor(times), method=method, options={"step_size": h})
    got = torch.autograd.grad(out.pow(2).sum(), params)

    def mixed(t, y):  # what pnode hands the network: float32 casts of float64 stage values and times
        return func(torch.tensor(t, dtype=torch.float64).float(), y.float()).double()

    ref = rk_solve(mixed, y0.double(), times, h, TABLEAUS[method]).float()
    want = torch.autograd.grad(ref.pow(2).sum(), params)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert rel_err(g, w) <= 30 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", {}), ("cn", {"step_size": 0.1})])
def test_checkpointed_gradients_equal_store_all(method, options):
    """The recomputed steps repeat the forward arithmetic in PETSc's precision too."""
    skip_if_zero_weight_broken(method)
    func = MLPField()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    params = (y0, *func.double().parameters())

    def grads(extra):
        out = pnode.odeint_adjoint(func, y0, t, method=method, rtol=1e-4, atol=1e-4,
                                   options={**options, **extra})
        return torch.autograd.grad(out.pow(2).sum(), params)

    for a, b in zip(grads({"checkpoints": 3}), grads({})):
        assert rel_err(a, b) <= 10 * petsc_eps()


@pytest.mark.parametrize("method", ["adaptive_heun", "bosh3", "dopri5"])
def test_checkpointed_adaptive_steps_repeat_the_forward_bit_for_bit(method):
    """Checkpointed gradients equal store-all ones bit for bit, for a time-dependent f, on either
    PETSc precision. Three things make a re-taken step repeat the stored one exactly:

    * its size is the one PETSc gave the step, not the difference of the recorded times (PETSc's
      rounded ``t + h`` can put that an ulp off);
    * an FSAL method (dopri5, bosh3) starts it from the derivative the original step reused
      from the step before, not from ``f`` at the state (a few ulps apart);
    * f is linearised at the time the forward pass evaluated it, not at the adjoint's recomputed
      ``t_end - (1 - c_i) h``, for stored steps as for re-taken ones.

    Without any of these the two differed by 1e-17 to 3e-16 in float64 and 1e-8 to 3e-7 in
    float32. (A step PETSc rejected and retried starts from a rolled-back state a few ulps off the
    stored one, which a re-taken step cannot know. These tolerances reject none.)"""
    skip_if_zero_weight_broken(method)
    torch.manual_seed(5)
    func = MLPField().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64)
    params = (y0, *func.parameters())

    def run(extra):
        out = pnode.odeint_adjoint(func, y0, t, method=method, rtol=1e-5, atol=1e-7, options=extra)
        return out.detach(), torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                                 params)

    ys, want = run({})
    for checkpoints in (1, 4):
        ys_ck, got = run({"checkpoints": checkpoints})
        assert torch.equal(ys_ck, ys)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", {}), ("bosh3", {})])
def test_benchmark_reference_repeats_petsc_s_arithmetic_bit_for_bit(method, options):
    """The PETSc-arithmetic reference (autograd through :func:`petsc_rk_reference`) is only a
    reference if it computes what PETSc computed: the same states, bit for bit, so that the ReLUs
    of the benchmark's block switch where pnode's did."""
    torch.manual_seed(2)
    func = ReLUField().to(petsc_dtype())
    y0 = torch.randn(8, 6, dtype=petsc_dtype())
    record, tableau = forward_record_of(func, y0, method, options, 1e-4, 1e-4, read_ts=petsc_tableau)
    assert tableau is not None and tableau[3] == (method != "rk4")  # FSAL: dopri5, bosh3
    assert None not in record.step_sizes and len(record.step_sizes) >= 3
    with torch.no_grad():
        y1 = petsc_rk_reference(func, y0, record.step_times, record.step_sizes, tableau)
    assert torch.equal(y1, record.outputs[-1].view_as(y1))


@pytest.mark.parametrize("method,train_steps", [("rk4", 0), ("rk4", 3), ("dopri5", 3)])
def test_odenet_float32_gradients_equal_autograd_in_pnode_s_own_arithmetic(method, train_steps):
    """The ODE-Net block (ReLU, GroupNorm) in float32, at its initial weights and after some SGD
    steps: autograd through the same steps done as pnode does them gives pnode's gradient to the
    round-off of float32 VJPs. On the default build pnode sums the steps in float64 and evaluates
    the network in float32 (:func:`in_dtype`); on a single build PETSc sums them in float32 in its
    own order (:func:`petsc_rk_reference`, with PETSc's tableau and step sizes)."""
    skip_if_zero_weight_broken(method)
    torch.manual_seed(0)
    func = ODENetFunc(16)
    x, t = torch.randn(8, 16, 6, 6), torch.tensor([0.0, 1.0])
    target = torch.randn_like(x)
    options = {"step_size": 1 / 8} if method == "rk4" else {}
    optimizer = torch.optim.SGD(func.parameters(), lr=1e-3, momentum=0.9)

    def gradients(solve):
        y0 = x.detach().requires_grad_(True)
        loss = ((solve(y0) - target) ** 2).mean()
        return torch.autograd.grad(loss, (y0, *func.parameters()))

    def pnode_solve(y0):
        return pnode.odeint_adjoint(func, y0, t, method=method, rtol=1e-4, atol=1e-4, options=options)[-1]

    for _ in range(train_steps):
        optimizer.zero_grad()
        for p, g in zip(func.parameters(), gradients(pnode_solve)[1:]):
            p.grad = g
        optimizer.step()
    record, tableau = forward_record_of(func, x, method, options, 1e-4, 1e-4, read_ts=petsc_tableau)
    assert len(record.step_sizes) >= 3
    if SINGLE:
        def same_steps(y0):
            return petsc_rk_reference(func, y0, record.step_times, record.step_sizes, tableau)
    else:
        def same_steps(y0):
            network = in_dtype(func, torch.float32)
            return reference(network, y0.to(petsc_dtype()), record.step_times, method).to(y0.dtype)
    want, got = gradients(same_steps), gradients(pnode_solve)
    worst = max(relative_error(got[:1], want[:1]), relative_error(got[1:], want[1:]))
    assert worst < 2e-6


def test_checkpointed_training_steps_repeat_store_all_bit_for_bit():
    """Three SGD steps of the benchmark's ODE-Net block (small) with dopri5, checkpointed and not:
    the same gradients bit for bit at every step. In a float32 PETSc dopri5's two stages with
    c = 1 are evaluated an ulp apart, and at the end of the previous step: a stored step's stage
    must be linearised at its own stage's forward time (found by its stage Vec), an FSAL step's
    first stage at the step's start, as the re-taken step evaluates them (before: 1e-8 apart)."""
    skip_if_zero_weight_broken("dopri5")

    def train(options):
        torch.manual_seed(0)
        func = ODENetFunc(16).to(petsc_dtype())
        x = torch.randn(16, 16, 8, 8, dtype=petsc_dtype())
        target = torch.randn_like(x)
        optimizer = torch.optim.SGD(func.parameters(), lr=1e-3, momentum=0.9)
        grads = []
        for _ in range(3):
            optimizer.zero_grad()
            y = pnode.odeint_adjoint(func, x, torch.tensor([0.0, 1.0], dtype=petsc_dtype()), method="dopri5",
                                     rtol=1e-3, atol=1e-3, options=options)[-1]
            ((y - target) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in func.parameters()])
            optimizer.step()
        return grads

    for got, want in zip(train({"checkpoints": 4}), train({})):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_time_gradients_on_either_precision(dtype):
    """dL/dt_i = <dL/dy_i, f(t_i, y_i)> for i >= 1: the solution at an output time moves with the
    velocity f when the time moves. (A float32 PETSc's cotangent met a float64 velocity here.)"""
    A = stable_matrix(3)
    func = lambda t, y: y @ A.to(y.dtype).T  # noqa: E731
    y0 = torch.randn(2, 3, dtype=dtype)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=dtype, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, t, method="rk4", options={"step_size": 0.05})
    w = torch.randn(ys.shape, dtype=dtype)
    (grad_t,) = torch.autograd.grad((ys * w).sum(), t)
    with torch.no_grad():
        want = torch.stack([(w[i] * func(t[i], ys[i])).sum() for i in (1, 2)]).double()
    tol = 100 * max(petsc_eps(), torch.finfo(dtype).eps)
    assert grad_t.dtype == dtype
    assert float((grad_t[1:].double() - want).abs().max()) <= tol * float(want.abs().max())


def test_recorded_step_sizes_are_the_ones_petsc_added_to_its_time():
    """Also for steps that PETSc rejected and retried with a smaller size (no hook runs in between:
    the size is read while the accepted attempt evaluates f)."""
    problem_t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    torch.manual_seed(2)
    func = MLPField().double()
    y0 = torch.randn(4, 3, dtype=torch.float64)
    from pnode._impl.adjoint import acquire_solver, release_solver
    from pnode._impl.problem import check_inputs
    from pnode._impl.rhs import RHS
    # a first step far too large for the tolerance: the controller rejects it, on either build
    problem = check_inputs(func, y0, problem_t, 1e-7, 1e-9, "dopri5", {"first_step": 0.3}, None)
    key, solver = acquire_solver(problem, 0, False)
    try:
        record = solver.forward(RHS(func, problem.layout, (), 1.0), problem.span, y0.to(petsc_dtype()).flatten())
        rejected = solver.ts.getStepRejections()
    finally:
        release_solver(key, solver)
    times = np.asarray(record.step_times, dtype=PETSc.RealType)
    sizes = np.asarray(record.step_sizes, dtype=PETSc.RealType)
    assert rejected > 0 and len(sizes) == len(times) - 1 >= 4
    assert np.array_equal(times[:-1] + sizes, times[1:])  # PETSc's sums, in its real type


def test_krylov_tolerance_below_the_build_precision_is_warned_about():
    """1e-8 is fine in float64 and out of reach in float32 (each solve would hit its iteration cap)."""
    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1], dtype=torch.float64)
    options = {"step_size": 0.1, "ksp_rtol": 1e-8, "snes_rtol": 1e-6}
    if SINGLE:
        with pytest.warns(UserWarning, match=r"ksp_rtol.*below what this PETSc's float32 can resolve"):
            pnode.odeint(lambda t, y: -y, y0, t, method="cn", options=options)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pnode.odeint(lambda t, y: -y, y0, t, method="cn", options=options)
