"""The public entry points ``odeint`` and ``odeint_adjoint`` (torchdiffeq's call, PETSc underneath)."""

import warnings
from typing import Callable, Optional, Union

import torch

from ._compat import PETSC_VERSION
from .adjoint import AdjointSolve, release_solver, solve_forward, zero_weight_param_gradients_ok
from .errors import InputError
from .problem import check_inputs, resolve_params
from .rhs import EvaluationCounter

Tensors = Union[torch.Tensor, tuple]


def odeint(func: Callable, y0: Tensors, t, *, rtol: float = 1e-7, atol: float = 1e-9,
           method: Optional[str] = None, options: Optional[dict] = None, comm=None,
           _prefix: Optional[str] = None, _counter: Optional[EvaluationCounter] = None) -> Tensors:
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
            ``max_step``, ``max_num_steps``, ``theta``; torchdiffeq's ``safety``/``ifactor``/
            ``dfactor``; any other key is a PETSc option for this solve (``{'ksp_rtol': 1e-12}``).
        comm: an mpi4py or petsc4py communicator; each rank passes its shard of the state.

    Returns:
        ``(len(t), *y0.shape)`` tensor (a tuple of such for a tuple ``y0``), dtype and device of ``y0``.

    Raises:
        pnode.InputError: bad arguments (unknown method, non-finite y0, non-monotonic t, ...).
        pnode.SolverError: the solve could not reach the last output time.
    """
    problem = check_inputs(func, y0, t, rtol, atol, method, options, comm, prefix=_prefix, counter=_counter)
    if torch.is_grad_enabled() and _wants_grad(func, problem.y0_flat):
        warnings.warn("pnode.odeint does not differentiate; use pnode.odeint_adjoint (same arguments) "
                      "for gradients", stacklevel=2)
    key, solver, result = solve_forward(problem, (), record=False)
    release_solver(key, solver)
    layout = problem.layout
    return layout.unflatten(result.outputs.to(device=layout.device, dtype=layout.dtype))


def odeint_adjoint(func: Callable, y0: Tensors, t, *, rtol: float = 1e-7, atol: float = 1e-9,
                   method: Optional[str] = None, options: Optional[dict] = None,
                   adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                   adjoint_method: Optional[str] = None, adjoint_options: Optional[dict] = None,
                   adjoint_params=None, comm=None, _prefix: Optional[str] = None,
                   _counter: Optional[EvaluationCounter] = None) -> Tensors:
    """Solve like :func:`odeint`, differentiable by PETSc TSAdjoint (the discrete adjoint).

    Gradients are those of the computed solution itself: equal, to round-off, to backpropagating
    through every step the solver took (unlike torchdiffeq's continuous adjoint, which solves a
    second ODE backwards). They flow to ``y0``, to ``adjoint_params`` and to ``t`` when ``t``
    requires grad (the latter by the exact-flow formula ``dL/dt_i = <dL/dy_i, f(t_i, y_i)>``).

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
                           counter=_counter)
    layout = problem.layout
    needs_grad = torch.is_grad_enabled() and (
        problem.y0_flat.requires_grad or problem.t.requires_grad or len(params) > 0)
    if not needs_grad:
        key, solver, result = solve_forward(problem, (), record=False)
        release_solver(key, solver)
        return layout.unflatten(result.outputs.to(device=layout.device, dtype=layout.dtype))
    if params and problem.config.method.zero_weight_stage and not zero_weight_param_gradients_ok():
        raise InputError(
            f"method {problem.config.method.name!r} has a zero-weight RK stage, and this PETSc "
            f"({'.'.join(map(str, PETSC_VERSION))}) drops the parameter gradient of such stages in "
            "TSAdjointStep_RK (fixed in newer PETSc, e.g. 3.26). Use a method without one ('rk4', "
            "'bosh3', 'adaptive_heun', 'euler'), or upgrade petsc4py (bash scripts/setup.sh builds 3.26.1)")
    outputs = AdjointSolve.apply(problem, problem.t, problem.y0_flat, *params)
    return layout.unflatten(outputs)


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
