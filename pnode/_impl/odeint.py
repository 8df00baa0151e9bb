"""The public entry points ``odeint``, ``odeint_adjoint`` and ``odeint_event`` (torchdiffeq's calls, PETSc underneath).

torchdiffeq's two modes map onto pnode's adjoint strategies (:mod:`pnode._impl.strategies`):
``odeint`` is backpropagation through the solver, and pnode gives it by keeping every stage's
autograd graph for the discrete adjoint (``adjoint='graphs'``: backprop's memory, its speed);
``odeint_adjoint`` is the memory-lean mode and stores states (``adjoint='states'``). Both give the
same, exact gradients of the steps taken; ``options={'adjoint': ...}`` (or ``checkpoints``,
``memory_budget``) chooses explicitly for either. With ``event_fn`` both solve until the event
(:mod:`pnode._impl.events`).
"""

from typing import Callable, Optional, Tuple, Union

import torch

from .._compat import petsc_version, serialized
from .adjoint import zero_weight_param_gradients_ok
from .errors import InputError
from .events import solve_until_event
from .methods import adjoint_available
from .problem import check_adjoint_keywords, check_inputs, reachable_params, resolve_params
from .rhs import EvaluationCounter
from .solve import solve
from .stats import SolveStats

Tensors = Union[torch.Tensor, tuple]
Tolerance = Union[float, torch.Tensor, tuple]


def odeint(func: Callable, y0: Tensors, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
           method: Optional[str] = None, options: Optional[dict] = None, event_fn: Optional[Callable] = None,
           comm=None):
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0``, with PETSc TS and return ``y`` at every ``t``.

    torchdiffeq's ``odeint``, differentiable like backpropagation through the solver: gradients
    reach ``y0``, ``t`` and every tensor requiring grad that ``func`` holds (an ``nn.Module``'s
    parameters, the module of a bound method, tensors and modules it closes over). pnode keeps
    every stage's autograd graph for PETSc's discrete adjoint (``adjoint='graphs'``), so the
    gradients are exact for the steps taken, at backprop's memory and about its speed. For flat
    memory use :func:`odeint_adjoint` (same arguments).

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` is a 0-dim tensor, ``y`` shaped like ``y0``; returns a
            tensor (or tuple) of the same shapes and dtype. An ``nn.Module`` or any callable.
        y0: initial state: a floating tensor of any shape, or a tuple of such tensors (same dtype and
            device). float32 works (PETSc integrates in float64; values are cast at the boundary),
            CUDA tensors work (staged through the host).
        t: 1-D tensor of output times, strictly increasing or strictly decreasing, in the same units
            as ``func``'s ``t``. ``t[0]`` is the initial time. Every output time is a step end.
        rtol, atol: relative and absolute tolerances of the adaptive controller (weighted RMS norm):
            numbers, 0-dim tensors, or tensors shaped like the state (a tuple of such for a tuple
            state), one tolerance per entry (PETSc's vector tolerances).
        method: a name from :func:`pnode.available_methods` (default ``'dopri5'``, adaptive).
            Fixed-step methods without ``step_size`` take one step per output interval.
        options: pnode keys ``step_size`` (fixed steps of this size), ``first_step``, ``min_step``,
            ``max_step`` (``inf``: no limit), ``max_num_steps``, ``theta``, ``adjoint``,
            ``checkpoints``, ``memory_budget``; torchdiffeq's ``safety``/``ifactor``/``dfactor``;
            ``step_t`` (times every solve must step to), ``jump_t`` (times where ``func`` jumps:
            the integration restarts there) and ``grid_constructor`` (``grid_constructor(func, y0,
            t)``: the steps of a fixed-step method), all in ``t``'s time; ``interp`` is accepted
            and has no effect (every output time is a step end); any other key is a PETSc option
            for this solve (``{'ksp_rtol': 1e-12}``).
        event_fn: solve until ``event_fn(t, y)`` crosses zero instead, from ``t[0]`` (the rest of
            ``t`` only gives the direction), and return ``(event_t, solution)`` as
            :func:`pnode.odeint_event` does, with its options ``event_tol`` and ``max_t``.
        comm: an mpi4py or petsc4py communicator; each rank passes its shard of the state.

    ``func`` may define torchdiffeq's step callbacks ``callback_step(t0, y0, dt)``,
    ``callback_accept_step`` and ``callback_reject_step`` (see :mod:`pnode._impl.callbacks`).

    Returns:
        ``(len(t), *y0.shape)`` tensor (a tuple of such for a tuple ``y0``), dtype and device of ``y0``.

    Raises:
        pnode.InputError: bad arguments (unknown method, non-finite y0, non-monotonic t, ...).
        pnode.SolverError: the solve could not reach the last output time.
    """
    return odeint_reported(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                           comm=comm)


@serialized
def odeint_reported(func: Callable, y0: Tensors, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                    method: Optional[str] = None, options: Optional[dict] = None,
                    event_fn: Optional[Callable] = None, comm=None, prefix: Optional[str] = None,
                    stats: Optional[SolveStats] = None, counter: Optional[EvaluationCounter] = None):
    """:func:`odeint` for pnode's own callers (:class:`pnode.ODEBlock`, tests, benchmarks): PETSc options
    read under ``prefix``, and the call's report written into ``stats`` (else into a new
    :class:`SolveStats` counting evaluations into ``counter``)."""
    if event_fn is not None:
        return _until_event(func, y0, t, event_fn, "graphs", rtol, atol, method, options, None, comm)
    params = reachable_params(func) if torch.is_grad_enabled() else ()
    problem = check_inputs(func, y0, t, rtol, atol, method, options, comm, params=params, prefix=prefix,
                           stats=_stats_of(stats, counter), default_adjoint="graphs")
    return problem.layout.unflatten(_differentiate(problem, params))


def odeint_adjoint(func: Callable, y0: Tensors, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                   method: Optional[str] = None, options: Optional[dict] = None,
                   event_fn: Optional[Callable] = None,
                   adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                   adjoint_method: Optional[str] = None, adjoint_options: Optional[dict] = None,
                   adjoint_params=None, comm=None):
    """Solve like :func:`odeint`, differentiable by PETSc TSAdjoint with flat memory (stored states).

    Gradients are those of the computed solution itself: equal, to round-off, to backpropagating
    through every step the solver took (unlike torchdiffeq's continuous adjoint, which solves a
    second ODE backwards). They flow to ``y0``, to ``adjoint_params`` and to ``t`` when ``t``
    requires grad (the latter by the exact-flow formula ``dL/dt_i = <dL/dy_i, f(t_i, y_i)>``).
    Between the passes pnode holds every step's state and stages (``adjoint='states'``), not the
    network's activations; the backward pass evaluates f once more per stage.

    A second backward pass through the same outputs works where torch allows one
    (``retain_graph=True``, ``torch.autograd.gradcheck``, ``torch.autograd.functional.jacobian``): it
    solves again from the saved ``y0`` and parameters (the same steps, bit for bit) and runs the
    adjoint over that. ``func``'s ``callback_step_adjoint`` and ``callback_accept_step_adjoint`` are
    called for every step of the backward pass (see :mod:`pnode._impl.callbacks`).

    Args (beyond :func:`odeint`'s):
        adjoint_params: tensors to differentiate; default ``func.parameters()`` for an
            ``nn.Module``. A plain function must list the tensors it closes over.
        adjoint_method: must be ``None`` or equal to ``method``: the discrete adjoint retraces the
            forward steps, it cannot use another method (``InputError`` otherwise).
        adjoint_rtol, adjoint_atol, adjoint_options: accepted for compatibility; the backward pass
            has no tolerance of its own (it reuses the forward steps), so they are ignored with a
            warning. Tune implicit adjoint linear solves with PETSc options (``ksp_rtol``).
    """
    return odeint_adjoint_reported(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                   event_fn=event_fn, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                   adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                                   adjoint_params=adjoint_params, comm=comm)


@serialized
def odeint_adjoint_reported(func: Callable, y0: Tensors, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                            method: Optional[str] = None, options: Optional[dict] = None,
                            event_fn: Optional[Callable] = None,
                            adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                            adjoint_method: Optional[str] = None, adjoint_options: Optional[dict] = None,
                            adjoint_params=None, comm=None, prefix: Optional[str] = None,
                            stats: Optional[SolveStats] = None, counter: Optional[EvaluationCounter] = None):
    """:func:`odeint_adjoint` for pnode's own callers, with :func:`odeint_reported`'s ``prefix``,
    ``stats`` and ``counter``."""
    check_adjoint_keywords(method, adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options)
    params = resolve_params(func, adjoint_params)
    if event_fn is not None:
        return _until_event(func, y0, t, event_fn, None, rtol, atol, method, options, params, comm)
    problem = check_inputs(func, y0, t, rtol, atol, method, options, comm, params=params, prefix=prefix,
                           stats=_stats_of(stats, counter))
    return problem.layout.unflatten(_differentiate(problem, params))


def _differentiate(problem, params) -> torch.Tensor:
    """The problem's solution, differentiable when a gradient can flow (grad mode, an input that requires it)."""
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
    return solve(problem, params if needs_grad else (), differentiable=needs_grad)


def _until_event(func, y0, t, event_fn, adjoint, rtol, atol, method, options, params, comm):
    """torchdiffeq's ``odeint(..., event_fn=...)``: from ``t[0]`` until the event, in ``t``'s direction."""
    times = torch.as_tensor(t) if not isinstance(t, torch.Tensor) else t
    if times.dim() != 1 or times.numel() == 0:
        raise InputError(f"t must be a 1-D tensor with at least one time, got shape {tuple(times.shape)}")
    reverse = times.numel() > 1 and bool(times[1] < times[0])
    return solve_until_event(func, y0, times[0], event_fn, reverse, adjoint, rtol, atol, method, options, params,
                             comm)


def _stats_of(stats: Optional[SolveStats], counter: Optional[EvaluationCounter]) -> SolveStats:
    """The stats object a call fills (an ODEBlock's, or a new one counting into ``counter``)."""
    if stats is not None:
        return stats
    return SolveStats(counter=counter) if counter is not None else SolveStats()


@serialized
def odeint_event(func: Callable, y0: Tensors, t0, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Optional[Callable] = None, rtol=1e-7, atol=1e-9,
                 method: Optional[str] = None, options: Optional[dict] = None, adjoint_params=None, comm=None,
                 adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                 adjoint_method: Optional[str] = None,
                 adjoint_options: Optional[dict] = None) -> Tuple[torch.Tensor, Tensors]:
    """Solve ``dy/dt = func(t, y)`` from ``y(t0) = y0`` until ``event_fn(t, y)`` crosses zero.

    torchdiffeq's ``odeint_event``: the event is the first point where an event function leaves the
    sign it started with (a zero counts), located to round-off along the computed solution, and
    gradients flow through the event time (implicit function theorem) composed with the discrete
    adjoint of the steps taken: they are the derivatives of the returned event time and state (see
    :mod:`pnode._impl.events`).

    Args:
        func: ``func(t, y) -> dy/dt`` as for :func:`pnode.odeint`.
        y0: initial state: a floating tensor of any shape, or a tuple of such tensors.
        t0: initial time, a scalar (0-dim or one-element tensor, or a number), in ``func``'s time
            units. It may require grad: moving ``t0`` moves every step with it (the derivative of
            the computed solve from ``t0 + dt``, which is the solve from ``t0`` of ``f(t + dt, y)``).
        event_fn: ``event_fn(t, y)`` with ``t`` a 0-dim tensor and ``y`` shaped like ``y0``; returns
            a real 0-dim tensor (one event function) or a 1-D tensor (several; the first to cross
            zero ends the solve). Built from torch operations on ``t`` and ``y`` (its time
            derivative is taken by autograd). A zero at ``t0`` itself (``|event_fn| < event_tol``)
            is not an event: integration goes on to the next crossing (as after a bounce).
        reverse_time: integrate towards decreasing ``t`` (the event time is then below ``t0``).
        odeint_interface: how the solve is differentiated, as torchdiffeq's two modes:
            ``None`` or :func:`pnode.odeint_adjoint` (stored states, flat memory) or
            :func:`pnode.odeint` (kept stage graphs, backprop's memory and speed). Both give the
            same gradients; ``options={'adjoint': ...}`` chooses explicitly.
        rtol, atol, method, adjoint_params, comm: as in :func:`pnode.odeint_adjoint`. A fixed-step
            method needs ``options={'step_size': h}``. Gradients flow to ``y0``, ``t0``,
            ``adjoint_params`` (default ``func.parameters()`` for an ``nn.Module``; with
            ``odeint_interface=pnode.odeint`` every tensor ``func`` holds) and to every tensor
            ``event_fn`` computes with (its parameters, closed-over tensors).
        options: as in :func:`pnode.odeint`, plus ``event_tol`` (values within it of zero count as
            zero at ``t0`` and tell a jump from a root; default 1e-6, or ``-ts_event_tol``),
            ``max_t`` (stop with an error if no event occurs before this time; default: no limit)
            and ``max_num_steps`` (here default 10000).
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: as in
            :func:`pnode.odeint_adjoint` (compatibility only).

    Returns:
        ``(event_t, solution)``: ``event_t`` a 0-dim tensor (dtype and device of ``t0``, or of
        ``y0`` for a number) and ``solution`` a ``(2, *y0.shape)`` tensor (a tuple of such for a
        tuple ``y0``) holding ``y0`` and the state at ``event_t``, dtype and device of ``y0``.
        Under MPI (``comm`` of several ranks) the event function's value is summed over the ranks
        (write it as a sum of per-rank contributions), every rank returns the same ``event_t`` and
        its own rows of the state.

    Raises:
        pnode.InputError: bad arguments, or ``event_fn`` returned something other than one real
            value per event.
        pnode.SolverError: no event before ``max_t``/``max_num_steps`` (``reason='NO_EVENT'``), a
            grazing event where ``d phi/dh`` vanishes (``reason='GRAZING_EVENT'``), or a failed solve.
    """
    adjoint = _interface_strategy(odeint_interface)
    check_adjoint_keywords(method, adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options)
    params = resolve_params(func, adjoint_params) if adjoint is None or adjoint_params is not None else None
    return solve_until_event(func, y0, t0, event_fn, reverse_time, adjoint, rtol, atol, method, options, params,
                             comm)


def _interface_strategy(odeint_interface) -> Optional[str]:
    """The default adjoint strategy of ``odeint_interface``: None (stored states) for
    ``odeint_adjoint``/None, ``'graphs'`` for ``odeint``."""
    if odeint_interface is None or odeint_interface is odeint_adjoint:
        return None
    if odeint_interface is odeint:
        return "graphs"
    name = getattr(odeint_interface, "__module__", "") + "." + getattr(odeint_interface, "__name__", "")
    raise InputError(f"odeint_interface must be None or pnode.odeint_adjoint (stored states), or pnode.odeint "
                     f"(kept graphs); got {name.strip('.') or type(odeint_interface).__name__}")
