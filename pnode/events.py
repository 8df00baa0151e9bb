"""Events: integrate until an event function crosses zero, with gradients through the event time.

``odeint_event`` is torchdiffeq's call of that name with PETSc underneath. One call runs in three parts:

1. **Locate.** A TS of its own (the call's method and options, no trajectory) integrates from ``t0``
   with PETSc's event handler (``TSSetEventHandler``) watching ``event_fn``, and stops where PETSc has
   localised the first sign change to ``|event_fn| < event_tol``. The search remembers its *base*:
   the last step end PETSc accepted before it first saw the sign change, with the steps up to it.
2. **Refine.** Newton's method on ``t -> event_fn(t, step(t))``, where ``step(t)`` is one step of the
   method from the base to ``t``, moves PETSc's time to a root of the event function along the
   computed solution, to round-off. The result no longer depends on the trial steps PETSc's
   localisation took, so it is a smooth function of ``y0`` and of the parameters: the function the
   gradients below differentiate, and that finite differences of the call see.
3. **Differentiate** (only when a gradient is wanted). :func:`pnode.odeint_adjoint` takes the same
   steps again, recording them for TSAdjoint: the step ends up to the base as output times with one
   fixed step each, then the crossing step on the ODE rescaled to unit time, whose length ``h`` is
   then a variable PETSc's adjoint differentiates. With ``phi(h, p) = g(t_e, y_e)`` at the end of
   that step and ``p`` everything else (``y0``, ``t0``, the parameters of ``func`` and ``event_fn``),
   the implicit function theorem gives ``dh = -(d phi/dp) dp / (d phi/dh)``, where
   ``d phi/dh = dg/dt + dg/dy . dy_e/dh`` is the computed step's counterpart of
   ``dg/dt + dg/dy . f``. Autograd composes it with the discrete adjoint of the steps: the gradients
   are those of the computed event time and state, what finite differences of the call see (with
   the step sizes of an adaptive search held fixed, as everywhere in pnode).

The returned values are those of parts 1 and 2 whether or not a gradient is taken; part 3 adds the
graph of solves that take the same steps (equal to round-off).
"""

import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .bridge import StateLayout
from .distributed import check_consistent
from .errors import InputError
from .event_refine import Event, refine
from .event_search import DEFAULT_MAX_NUM_STEPS, SEARCH_ONLY_PREFIXES, EventFunction, EventSearch, Located
from .odeint import _check_adjoint_keywords, _wants_grad, odeint, odeint_adjoint
from .problem import Problem, check_inputs, resolve_params

Tensors = Union[torch.Tensor, tuple]

# options keys of odeint_event itself (the others go to the solves)
_EVENT_KEYS = ("event_tol", "max_t")
# keys that steer the adaptive search; the replayed steps are fixed, so their solves leave them out
_STEP_CONTROL_KEYS = ("step_size", "first_step", "min_step", "max_step", "max_num_steps", "safety", "ifactor",
                      "dfactor")


def odeint_event(func: Callable, y0: Tensors, t0, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Optional[Callable] = None, rtol: float = 1e-7, atol: float = 1e-9,
                 method: Optional[str] = None, options: Optional[dict] = None, adjoint_params=None, comm=None,
                 adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                 adjoint_method: Optional[str] = None,
                 adjoint_options: Optional[dict] = None) -> Tuple[torch.Tensor, Tensors]:
    """Solve ``dy/dt = func(t, y)`` from ``y(t0) = y0`` until ``event_fn(t, y)`` crosses zero.

    torchdiffeq's ``odeint_event``: the event is located by PETSc's event handler, its time refined
    to a root of ``event_fn`` along the computed solution, and gradients flow through the event
    time (implicit function theorem) composed with the discrete adjoint of the steps taken: they
    are the derivatives of the returned event time and state (see :mod:`pnode.events`).

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
        odeint_interface: ``None`` or :func:`pnode.odeint_adjoint` (differentiable), or
            :func:`pnode.odeint` (no gradients).
        rtol, atol, method, adjoint_params, comm: as in :func:`pnode.odeint_adjoint`. A fixed-step
            method needs ``options={'step_size': h}``. Gradients flow to ``y0``, ``t0``,
            ``adjoint_params`` (default ``func.parameters()`` for an ``nn.Module``) and to every
            tensor ``event_fn`` computes with (its parameters, closed-over tensors).
        options: as in :func:`pnode.odeint`, plus ``event_tol`` (PETSc's ``-ts_event_tol``: the
            crossing is localised to ``|event_fn| < event_tol``, default 1e-6, 1e-4 in a
            single-precision PETSc; the time is then refined to round-off), ``max_t`` (stop with
            an error if no event occurs before this time; default: no limit) and
            ``max_num_steps`` (here default 10000, including PETSc's localisation steps).
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
            grazing event where ``gdot = dg/dt + dg/dy . f`` vanishes (``reason='GRAZING_EVENT'``),
            or a failed solve.
    """
    differentiable = _check_interface(odeint_interface)
    _check_adjoint_keywords(method, adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options)
    if not callable(event_fn):
        raise InputError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if not isinstance(reverse_time, bool):
        raise InputError(f"reverse_time must be True or False, got {reverse_time!r}")
    direction = -1.0 if reverse_time else 1.0
    t0 = _check_t0(t0, y0)
    search_options, step_options, event_tol, max_t = _split_options(options, float(t0.detach()), direction)
    params = resolve_params(func, adjoint_params) if differentiable else ()
    start = t0.detach().to("cpu", torch.float64)
    problem = check_inputs(func, y0, torch.stack([start, start + direction]), rtol, atol, method, search_options,
                           comm, params=params)
    _check_steps(problem)
    if not differentiable and torch.is_grad_enabled() and _wants_grad(func, problem.y0_flat):
        warnings.warn("odeint_event(odeint_interface=pnode.odeint) gives no gradients; leave odeint_interface=None "
                      "(pnode.odeint_adjoint) for them", stacklevel=2)
    events = EventFunction(event_fn, problem.layout, problem.comm)
    located = EventSearch(problem, events, event_tol, max_t).run()
    solves = StepSolves(problem, step_options, located)
    event = refine(solves, events, located)
    event_t, y_event = _attach_gradients(solves, events, event, t0, problem, params,
                                         differentiable and torch.is_grad_enabled())
    start_state = problem.y0_flat if differentiable else problem.y0_flat.detach()
    return event_t, problem.layout.unflatten(torch.stack([start_state, y_event]))


# ---------------------------------------------------------------------------------------------- inputs
def _check_interface(odeint_interface) -> bool:
    """Whether the call is differentiable: ``odeint_adjoint``/``None`` yes, ``odeint`` no."""
    if odeint_interface is None or odeint_interface is odeint_adjoint:
        return True
    if odeint_interface is odeint:
        return False
    name = getattr(odeint_interface, "__module__", "") + "." + getattr(odeint_interface, "__name__", "")
    raise InputError(f"odeint_interface must be None or pnode.odeint_adjoint (differentiable), or pnode.odeint "
                     f"(no gradients); got {name.strip('.') or type(odeint_interface).__name__}")


def _check_t0(t0, y0) -> torch.Tensor:
    """``t0`` as a 0-dim floating tensor (a number becomes one of ``y0``'s dtype); keeps its graph."""
    if isinstance(t0, (int, float)) and not isinstance(t0, bool):
        first = y0[0] if isinstance(y0, (tuple, list)) and y0 else y0
        dtype = first.dtype if isinstance(first, torch.Tensor) and first.is_floating_point() else torch.float64
        t0 = torch.tensor(float(t0), dtype=dtype)
    if not isinstance(t0, torch.Tensor):
        raise InputError(f"t0 must be a number or a one-element tensor, got {type(t0).__name__}")
    if t0.numel() != 1:
        raise InputError(f"t0 must be a single time (0-dim or one-element tensor), got shape {tuple(t0.shape)}; "
                         "odeint_event integrates from one initial time until the event")
    if not t0.is_floating_point():
        t0 = t0.to(torch.float64)
    if not math.isfinite(float(t0.detach())):
        raise InputError(f"t0 must be finite, got {float(t0.detach())}")
    return t0.reshape(())


def _split_options(options, t0: float, direction: float):
    """``(search, steps, event_tol, max_t)``: the options of the event search and of the replayed
    fixed steps, the event tolerance (None: PETSc's) and the time limit in PETSc time (None: none)."""
    if not isinstance(options, (dict, type(None))):
        raise InputError(f"options must be a dict, got {type(options).__name__}")
    opts = dict(options or {})
    event_tol = opts.pop("event_tol", None)
    if event_tol is not None:
        try:
            event_tol = float(event_tol)
        except (TypeError, ValueError):
            raise InputError(f"options['event_tol'] must be a positive number, got {event_tol!r}") from None
        if not (math.isfinite(event_tol) and event_tol > 0):
            raise InputError(f"options['event_tol'] must be positive and finite, got {event_tol!r}")
    max_t = opts.pop("max_t", None)
    if max_t is not None:
        try:
            max_t = float(max_t)
        except (TypeError, ValueError):
            raise InputError(f"options['max_t'] must be a number, got {max_t!r}") from None
        if not math.isfinite(max_t) or direction * (max_t - t0) <= 0:
            side = "below" if direction < 0 else "above"
            raise InputError(f"options['max_t'] = {max_t!r} must be finite and {side} t0 = {t0:.6g} "
                             f"(the direction of integration{', reverse_time=True' if direction < 0 else ''})")
        max_t = direction * max_t
    search = dict(opts)
    search.setdefault("max_num_steps", DEFAULT_MAX_NUM_STEPS)
    steps = {key: value for key, value in opts.items()
             if key not in _STEP_CONTROL_KEYS and not key.lstrip("-").startswith(SEARCH_ONLY_PREFIXES)}
    return search, steps, event_tol, max_t


def _check_steps(problem: Problem) -> None:
    cfg = problem.config
    if not cfg.adaptive and cfg.step_size is None and cfg.first_step is None:
        raise InputError(f"method {cfg.method.name!r} takes fixed steps, and an event search has no output time to "
                         "step to: pass options={'step_size': h}, or use an adaptive method (e.g. 'dopri5')")


# ---------------------------------------------------------------------------------------------- steps
class StepSolves:
    """pnode solves of the steps the search took, for the refinement and for the adjoint.

    The crossing step is solved on the ODE rescaled to unit time, ``dy/ds = d h f(d (tau_b + s h) + o, y)``
    for ``s`` in ``[0, 1]`` (``d`` the direction, ``tau_b`` the base, ``o`` a shift of every time, 0 in
    value): one step of size 1 of it is, to round-off, one step of length ``h`` of the ODE. ``h`` and
    ``o`` ride along as two constant entries of the state (``dh/ds = do/ds = 0``), so PETSc's discrete
    adjoint gives the derivatives of the computed step with respect to where it ends and when the
    solve started, and ``func`` closes over no tensor with a history of its own (an adjoint's
    vector-Jacobian products would otherwise run into it). The steps up to the base are replayed with
    their ends as output times, one fixed step each: pnode shortens a step to the next output time,
    and ``step_size`` is longer than any of them.

    Args:
        problem: the canonical problem.
        step_options: the call's options without the search's own (step control, events).
        located: where the search stopped.
    """

    def __init__(self, problem: Problem, step_options: Dict[str, object], located: Located):
        self.problem = problem
        self.located = located
        span = abs(located.event_time - float(problem.taus[0]))
        self.replay_options = dict(step_options, step_size=4.0 * span + 1.0)
        self.unit_options = dict(step_options, step_size=2.0)
        cfg = problem.config
        self.keywords = dict(rtol=cfg.rtol, atol=cfg.atol, method=cfg.method.name, comm=problem.comm)
        layout = problem.layout
        self.base_state = located.base_state.to(device=layout.device, dtype=layout.dtype)

    @property
    def direction(self) -> float:
        return self.problem.direction

    @property
    def base_time(self) -> float:
        """The base in PETSc time."""
        return self.located.step_times[-1]

    def user_time(self, step: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The user's time (0-dim, the state's dtype) ``step`` after the base; ``offset`` shifts it."""
        t = self.direction * (self.base_time + step)
        if offset is not None:
            t = t + offset
        return t.to(device=self.problem.layout.device, dtype=self.problem.layout.dtype)

    def crossing_step(self, state: torch.Tensor, step: torch.Tensor, params: Sequence[torch.Tensor] = (),
                      offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One step of length ``step`` (a float64 0-dim tensor, PETSc time) from the base, where the state is
        ``state`` (flat): the state at its end, flat, differentiable with respect to ``state``, ``step``,
        ``offset`` and ``params``."""
        problem, layout = self.problem, self.problem.layout
        func, direction, base, numel = problem.func, self.direction, self.base_time, layout.numel
        shift = torch.zeros((), dtype=torch.float64) if offset is None else offset
        extra = torch.stack([step, shift]).to(device=layout.device, dtype=layout.dtype)
        start = torch.cat([state, extra])

        def rescaled(s, z):
            length, moved = z[numel].to(torch.float64), z[numel + 1].to(torch.float64)
            t = (direction * (base + s.to(torch.float64) * length) + moved).to(layout.dtype)
            velocity = layout.flatten(func(t, layout.unflatten(z[:numel])))
            return torch.cat([(direction * length).to(layout.dtype) * velocity, torch.zeros_like(z[numel:])])

        unit = torch.tensor([0.0, 1.0], dtype=torch.float64)
        if start.requires_grad or params:
            states = odeint_adjoint(rescaled, start, unit, options=self.unit_options, adjoint_params=tuple(params),
                                    **self.keywords)
        else:
            with torch.no_grad():
                states = odeint(rescaled, start, unit, options=self.unit_options, **self.keywords)
        return states[-1, :numel]

    def replay_to_base(self, params: Sequence[torch.Tensor], offset: Optional[torch.Tensor]) -> torch.Tensor:
        """The state at the base from ``pnode.odeint_adjoint`` over the search's steps, flat, with its graph
        (to ``y0``, ``params`` and, as a shift of every time, ``offset``)."""
        problem, layout = self.problem, self.problem.layout
        times = torch.tensor(self.located.step_times, dtype=torch.float64) * self.direction
        if len(times) == 1:
            return problem.y0_flat
        if offset is None:
            states = odeint_adjoint(problem.func, layout.unflatten(problem.y0_flat), times,
                                    options=self.replay_options, adjoint_params=tuple(params), **self.keywords)
            return _last(layout, states)
        func, numel = problem.func, layout.numel

        def shifted(t, z):
            velocity = layout.flatten(func(t + z[numel], layout.unflatten(z[:numel])))
            return torch.cat([velocity, torch.zeros_like(z[numel:])])

        start = torch.cat([problem.y0_flat, offset.to(device=layout.device, dtype=layout.dtype).reshape(1)])
        states = odeint_adjoint(shifted, start, times, options=self.replay_options, adjoint_params=tuple(params),
                                **self.keywords)
        return states[-1, :numel]


def _last(layout: StateLayout, states) -> torch.Tensor:
    """The last output of a solve, flat."""
    if layout.is_tuple:
        return layout.flatten(tuple(s[-1] for s in states))
    return states[-1].reshape(-1)


# ---------------------------------------------------------------------------------------------- gradients
class _SumOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the cotangent over the ranks.

    Every rank holds the same event time, and each rank's loss contributes its own cotangent to it;
    the implicit function theorem spreads their sum over every rank's state and parameters.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, comm):
        ctx.comm = comm
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = ctx.comm.tompi4py().allreduce(float(grad))
        return grad.new_tensor(total), None


def _attach_gradients(solves: StepSolves, events: EventFunction, event: Event, t0: torch.Tensor,
                      problem: Problem, params, differentiable: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(event_t, y_event)``: the refined values, with the graph of the implicit function theorem over the
    same steps attached when gradients are wanted (their values are left exactly as they are).

    With ``phi(h, p) = g(t_e, y_e)`` for the crossing step of length ``h`` and everything else ``p``,
    ``dh = -(d phi / dp) dp / (d phi / dh)``; the event time moves with ``h`` and the state at the
    event with the step's end.
    """
    comm = problem.comm
    direction = solves.direction
    t_event = torch.tensor(direction * event.tau, dtype=torch.float64)
    through_state = differentiable and (problem.y0_flat.requires_grad or t0.requires_grad or len(params) > 0)
    # every time shifts with t0: the solve from t0 + dt is the solve from t0 with f(t + dt, y)
    offset = (t0 - t0.detach()).to("cpu", torch.float64) if differentiable and t0.requires_grad else None
    length = torch.tensor(event.step, dtype=torch.float64)
    if through_state:
        base_state = solves.replay_to_base(params, offset)
        end_state = solves.crossing_step(base_state, length, params, offset)
    else:
        end_state = event.state
    value = None
    if differentiable:
        with torch.enable_grad():
            value = events.local(solves.user_time(length, offset), end_state)[event.index]
    moves = value is not None and value.requires_grad
    check_consistent(comm, "whether odeint_event is differentiated", (through_state, moves),
                     "Every rank must take the same gradients (y0, t0, parameters, event_fn's tensors)")
    if not moves:
        return t_event.to(device=t0.device, dtype=t0.dtype), event.state
    step_change = (value - value.detach()).to("cpu", torch.float64) * (-1.0 / event.slope)
    if comm.getSize() > 1:
        step_change = _SumOverRanks.apply(step_change, comm)
    event_t = t_event + direction * step_change
    if offset is not None:
        event_t = event_t + offset
    moved = solves.crossing_step(base_state if through_state else solves.base_state, length + step_change, params,
                                 offset)
    y_event = event.state + (moved - moved.detach())
    return event_t.to(device=t0.device, dtype=t0.dtype), y_event
