"""The public entry points ``odeint`` and ``odeint_adjoint`` (torchdiffeq's call, PETSc underneath)."""

import dataclasses
import warnings
from typing import Callable, Optional, Union

import numpy as np
import torch

from ._compat import petsc_version
from .adjoint import AdjointSolve, solve_forward, zero_weight_param_gradients_ok
from .distributed import local_sizes
from .errors import InputError
from .methods import adjoint_available
from .pool import release_solver
from .problem import Problem, check_inputs, resolve_params
from .rhs import EvaluationCounter
from .stats import SolveStats
from .timeplan import segments

Tensors = Union[torch.Tensor, tuple]


def odeint(func: Callable, y0: Tensors, t, *, rtol: float = 1e-7, atol: float = 1e-9,
           method: Optional[str] = None, options: Optional[dict] = None, comm=None,
           _prefix: Optional[str] = None, _stats: Optional[SolveStats] = None,
           _counter: Optional[EvaluationCounter] = None) -> Tensors:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0``, with PETSc TS and return ``y`` at every ``t``.

    This call only solves; it records no trajectory and gives no gradients. Use
    :func:`odeint_adjoint` (same arguments) to differentiate.

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` is a 0-dim tensor, ``y`` shaped like ``y0``; returns a
            tensor (or tuple) of the same shapes and dtype. An ``nn.Module`` or any callable.
        y0: initial state: a floating tensor of any shape, or a tuple of such tensors (same dtype and
            device). float32 works (PETSc integrates in float64; values are cast at the boundary),
            CUDA tensors work (staged through the host).
        t: 1-D tensor of output times, strictly increasing or strictly decreasing, in the same units
            as ``func``'s ``t``. ``t[0]`` is the initial time. Every output time is a step end.
        rtol, atol: relative and absolute tolerances of the adaptive controller (weighted RMS norm).
        method: a name from :func:`pnode.available_methods` (default ``'dopri5'``, adaptive).
            Fixed-step methods without ``step_size`` take one step per output interval.
        options: pnode keys ``step_size`` (fixed steps of this size), ``first_step``, ``min_step``,
            ``max_step`` (``inf``: no limit), ``max_num_steps``, ``theta``; torchdiffeq's
            ``safety``/``ifactor``/``dfactor``; ``step_t`` (times every solve must step to),
            ``jump_t`` (times where ``func`` jumps: the integration restarts there) and
            ``grid_constructor`` (``grid_constructor(func, y0, t)``: the steps of a fixed-step
            method), all in ``t``'s time; any other key is a PETSc option for this solve
            (``{'ksp_rtol': 1e-12}``).
        comm: an mpi4py or petsc4py communicator; each rank passes its shard of the state.

    ``func`` may define torchdiffeq's step callbacks ``callback_step(t0, y0, dt)``,
    ``callback_accept_step`` and ``callback_reject_step`` (see :mod:`pnode.callbacks`).

    Returns:
        ``(len(t), *y0.shape)`` tensor (a tuple of such for a tuple ``y0``), dtype and device of ``y0``.

    Raises:
        pnode.InputError: bad arguments (unknown method, non-finite y0, non-monotonic t, ...).
        pnode.SolverError: the solve could not reach the last output time.
    """
    problem = check_inputs(func, y0, t, rtol, atol, method, options, comm, prefix=_prefix,
                           stats=_stats_of(_stats, _counter))
    if torch.is_grad_enabled() and _wants_grad(func, problem.y0_flat):
        warnings.warn("pnode.odeint does not differentiate; use pnode.odeint_adjoint (same arguments) "
                      "for gradients", stacklevel=2)
    return problem.layout.unflatten(_solve(problem, (), differentiable=False))


def odeint_adjoint(func: Callable, y0: Tensors, t, *, rtol: float = 1e-7, atol: float = 1e-9,
                   method: Optional[str] = None, options: Optional[dict] = None,
                   adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                   adjoint_method: Optional[str] = None, adjoint_options: Optional[dict] = None,
                   adjoint_params=None, comm=None, _prefix: Optional[str] = None,
                   _stats: Optional[SolveStats] = None, _counter: Optional[EvaluationCounter] = None) -> Tensors:
    """Solve like :func:`odeint`, differentiable by PETSc TSAdjoint (the discrete adjoint).

    Gradients are those of the computed solution itself: equal, to round-off, to backpropagating
    through every step the solver took (unlike torchdiffeq's continuous adjoint, which solves a
    second ODE backwards). They flow to ``y0``, to ``adjoint_params`` and to ``t`` when ``t``
    requires grad (the latter by the exact-flow formula ``dL/dt_i = <dL/dy_i, f(t_i, y_i)>``).

    A second backward pass through the same outputs works where torch allows one
    (``retain_graph=True``, ``torch.autograd.gradcheck``, ``torch.autograd.functional.jacobian``): it
    solves again from the saved ``y0`` and parameters (the same steps, bit for bit) and runs the
    adjoint over that. ``func``'s ``callback_step_adjoint`` and ``callback_accept_step_adjoint`` are
    called for every step of the backward pass (see :mod:`pnode.callbacks`).

    Args (beyond :func:`odeint`'s):
        adjoint_params: tensors to differentiate; default ``func.parameters()`` for an
            ``nn.Module``. A plain function must list the tensors it closes over.
        adjoint_method: must be ``None`` or equal to ``method``: the discrete adjoint retraces the
            forward steps, it cannot use another method (``InputError`` otherwise).
        adjoint_rtol, adjoint_atol, adjoint_options: accepted for compatibility; the backward pass
            has no tolerance of its own (it reuses the forward steps), so they are ignored with a
            warning. Tune implicit adjoint linear solves with PETSc options (``ksp_rtol``).
    """
    _check_adjoint_keywords(method, adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options)
    params = resolve_params(func, adjoint_params)
    problem = check_inputs(func, y0, t, rtol, atol, method, options, comm, params=params, prefix=_prefix,
                           stats=_stats_of(_stats, _counter))
    needs_grad = torch.is_grad_enabled() and (
        problem.y0_flat.requires_grad or problem.t.requires_grad or len(params) > 0)
    if needs_grad and params and problem.config.method.zero_weight_stage and not zero_weight_param_gradients_ok():
        raise InputError(
            f"method {problem.config.method.name!r} has a zero-weight RK stage, and this PETSc "
            f"({'.'.join(map(str, petsc_version()))}) drops the parameter gradient of such stages in "
            "TSAdjointStep_RK (fixed in newer PETSc, e.g. 3.26). Use a method without one ('rk4', "
            "'bosh3', 'adaptive_heun', 'euler'), or upgrade petsc4py (bash scripts/setup.sh builds 3.26.1)")
    if needs_grad and not adjoint_available(problem.config.method):
        method = problem.config.method
        raise InputError(
            f"method {method.name!r} needs PETSc >= {'.'.join(map(str, method.adjoint_since))} for its adjoint "
            f"(this PETSc is {'.'.join(map(str, petsc_version()))}: TS {method.ts_type} has no adjoint or a wrong "
            "one there); use 'beuler' or 'cn' (error-controlled, L-stable / A-stable), or upgrade petsc4py "
            "(bash scripts/setup.sh builds 3.26.1)")
    return problem.layout.unflatten(_solve(problem, params if needs_grad else (), differentiable=needs_grad))


def _solve(problem: Problem, params, differentiable: bool) -> torch.Tensor:
    """The solution at every output time, ``(len(t), numel)`` in the state's dtype and device.

    An empty state has nothing to integrate (an adaptive controller has no norm to measure it
    with); an integration with prescribed jumps or step times is split into solves
    (:func:`pnode.timeplan.segments`), each starting from the state the previous one ended with.
    """
    if sum(local_sizes(problem.comm, problem.layout.numel)) == 0:
        return problem.y0_flat.unsqueeze(0).expand(len(problem.t), -1).clone()
    if problem.plan is None:
        return _solve_once(problem, params, differentiable)
    outputs = [None] * len(problem.t)
    y0_flat = problem.y0_flat
    for segment in segments(problem.plan, problem.t):
        taus = np.ascontiguousarray(problem.direction * segment.t.detach().to("cpu", torch.float64).numpy())
        piece = _solve_once(dataclasses.replace(problem, y0_flat=y0_flat, t=segment.t, taus=taus, plan=None),
                            params, differentiable)
        for row, value in zip(segment.rows, piece):
            if row >= 0 and outputs[row] is None:
                outputs[row] = value
        y0_flat = piece[-1]
    return torch.stack(outputs)


def _solve_once(problem: Problem, params, differentiable: bool) -> torch.Tensor:
    layout = problem.layout
    if differentiable:
        return AdjointSolve.apply(problem, problem.t, problem.y0_flat, *params)
    key, solver, result = solve_forward(problem, (), record=False)
    problem.stats.record_forward(solver)
    release_solver(key, solver)
    return result.outputs.to(device=layout.device, dtype=layout.dtype)


def _check_adjoint_keywords(method, adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options) -> None:
    if adjoint_method is not None and adjoint_method != method:
        raise InputError(f"adjoint_method={adjoint_method!r} differs from method={method!r}: pnode's "
                         "discrete adjoint retraces the forward steps and cannot change method; "
                         "leave adjoint_method=None")
    ignored = [name for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                                        ("adjoint_options", adjoint_options)) if value]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} ignored: the discrete adjoint retraces the forward steps and "
                      "has no tolerances of its own; tune implicit adjoint solves with PETSc options "
                      "(e.g. options={'ksp_rtol': 1e-12})", stacklevel=3)


def _wants_grad(func, y0_flat: torch.Tensor) -> bool:
    if y0_flat.requires_grad:
        return True
    return isinstance(func, torch.nn.Module) and any(p.requires_grad for p in func.parameters())


def _stats_of(stats: Optional[SolveStats], counter: Optional[EvaluationCounter]) -> SolveStats:
    """The stats object a call fills (an ODEBlock's, or a new one counting into ``counter``)."""
    if stats is not None:
        return stats
    return SolveStats(counter=counter) if counter is not None else SolveStats()
