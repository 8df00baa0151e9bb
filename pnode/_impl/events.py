"""Events: integrate until an event function crosses zero, with gradients through the event time.

``odeint_event`` is torchdiffeq's call of that name with PETSc underneath, and ``odeint``/``odeint_adjoint``
with ``event_fn=`` run the same code. One call is one forward solve:

1. **Search.** The problem's solver integrates from ``t0`` with an event watch
   (:class:`pnode._impl.event_search.EventWatch`): after every step, the event functions at its end. A step
   that ends with an event function off its starting sign (a zero counts) is rolled back before
   PETSc records it, and the solve stops at its start, the *base*.
2. **Locate.** The event is the first point of that step where an event function leaves its sign,
   whatever the function does at the step's end (:mod:`pnode._impl.event_refine`): found on the step's
   cubic Hermite interpolant, then refined to round-off on one-step solves of the method from the
   base: a root of ``phi(h) = g(t(h), y(h))``, ``y(h)`` one step of length ``h``.
3. **Step to it.** The solver takes that one step from the base, and the solve ends there. Its
   trajectory (or kept graphs, or checkpoints: the call's adjoint strategy) holds exactly the steps
   up to the event, so one discrete adjoint differentiates the state at the event at a fixed ``h``.
4. **Differentiate the event time** (when a gradient is wanted). With ``phi(h, p) = g(t_e, y_e)``
   and ``p`` everything else (``y0``, ``t0``, the parameters of ``func`` and ``event_fn``), the
   implicit function theorem gives ``dh = -(d phi/dp) dp / (d phi/dh)``, where
   ``d phi/dh = dg/dt + dg/dy . dy_e/dh`` is the computed step's counterpart of ``dg/dt + dg/dy . f``
   and ``dy_e/dh`` comes from the step solved on the ODE rescaled to unit time, whose length is then
   a variable PETSc's adjoint differentiates. The gradients are those of the returned event time
   and state, what finite differences of the call see (with the step sizes of the adaptive search
   held fixed, as everywhere in pnode). An event where the function jumps (a branch on the time
   that returns exactly zero, as torchdiffeq's physics examples end a solve) has a time with no
   derivative: the state at it is differentiated at that fixed time.

Moving ``t0`` moves every step with it: the solve from ``t0 + dt`` is the solve from ``t0`` of
``f(t + dt, y)`` (and ``g(t + dt, y)``), so ``dt`` enters as one more parameter, zero in value.
"""

import dataclasses
import math
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from ..distributed import check_consistent
from .errors import InputError, SolverError
from .event_search import DEFAULT_MAX_NUM_STEPS, EVENT_TOL_ULPS, EventFunction, EventWatch, Located
from .options import get_global_option
from .pool import acquire_solver, release_solver
from .problem import Problem, check_inputs, reachable_params
from .solve import solve, solve_once
from .solver import Replay
from .tableaus import petsc_tableau

Tensors = Union[torch.Tensor, tuple]

# options keys of odeint_event itself (the others go to the solves)
_EVENT_KEYS = ("event_tol", "max_t")
# keys that steer the adaptive search only; the unit-time step that differentiates the event is fixed
_STEP_CONTROL_KEYS = ("step_size", "first_step", "min_step", "max_step", "max_num_steps", "safety", "ifactor",
                      "dfactor")
_SEARCH_ONLY_PREFIXES = ("ts_adapt_", "ts_event_")
# A slope along the crossing step below this fraction of the chord's marks a multiple root (grazing).
_GRAZING_SLOPE = 1e-6


def solve_until_event(func: Callable, y0: Tensors, t0, event_fn: Callable, reverse_time: bool,
                      adjoint: Optional[str], rtol, atol, method: Optional[str], options: Optional[dict],
                      params: Optional[Tuple[torch.Tensor, ...]], comm) -> Tuple[torch.Tensor, Tensors]:
    """The call behind :func:`odeint_event` and ``odeint(..., event_fn=...)``.

    ``adjoint``: the adjoint strategy when ``options`` chooses none (``None``: stored states,
    ``'graphs'``: kept graphs); ``params``: the tensors to differentiate (None: every tensor
    requiring grad that ``func`` holds, as backprop through ``odeint`` reaches).
    """
    if not callable(event_fn):
        raise InputError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if not isinstance(reverse_time, bool):
        raise InputError(f"reverse_time must be True or False, got {reverse_time!r}")
    direction = -1.0 if reverse_time else 1.0
    t0 = _check_t0(t0, y0)
    opts, step_options, event_tol, max_t = _split_options(options, float(t0.detach()), direction)
    if params is None:
        params = reachable_params(func) if torch.is_grad_enabled() else ()
    shift = t0 - t0.detach() if torch.is_grad_enabled() and t0.requires_grad else None
    if shift is not None:
        func, event_fn, params = _shifted(func, shift), _shifted(event_fn, shift), (*params, shift)
    start = t0.detach().to("cpu", torch.float64)
    problem = check_inputs(func, y0, torch.stack([start, start + direction]), rtol, atol, method, opts, comm,
                           params=params, default_adjoint=adjoint or "states")
    _check_event_problem(problem)
    events = EventFunction(event_fn, problem.layout, problem.comm)
    stepper = _Stepper(problem)
    tau_max = max_t if max_t is not None else math.inf
    watch = EventWatch(events, _event_tolerance(event_tol, problem.config), tau_max, stepper)
    problem = dataclasses.replace(problem, taus=np.array([problem.taus[0], tau_max]), event=watch)
    needs_grad = torch.is_grad_enabled() and (problem.y0_flat.requires_grad or len(params) > 0)
    try:
        outputs = solve_once(problem, params if needs_grad else (), differentiable=needs_grad)
        tableau = stepper.tableau() if needs_grad else None
    finally:
        stepper.close()
    gradients = _EventGradients(problem, events, watch.located, step_options, tableau)
    event_t, y_event = gradients.attach(outputs[-1], shift, needs_grad)
    event_t = event_t.to(device=t0.device, dtype=t0.dtype)
    return event_t, problem.layout.unflatten(torch.stack([outputs[0], y_event]))


def _shifted(fn: Callable, shift: torch.Tensor) -> Callable:
    """``fn`` seen from a start moved by ``shift`` (zero in value): ``fn(t + shift, y)``."""
    def moved(t, y):
        return fn(t + shift.to(t.dtype), y)
    return moved


def _event_tolerance(event_tol: Optional[float], config) -> float:
    """``-[<prefix>]ts_event_tol`` (the command line wins, as for every PETSc option), else
    ``options['event_tol']``, else 100 round-off units of the arithmetic f runs in."""
    prefix = config.prefix
    for name in dict.fromkeys((prefix + "ts_event_tol", "ts_event_tol")):
        text = get_global_option(name)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                raise InputError(f"-{name} must be a positive number, got {text!r}") from None
    if event_tol is not None:
        return event_tol
    return EVENT_TOL_ULPS * config.resolution


# ---------------------------------------------------------------------------------------------- inputs
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
    """``(search, steps, event_tol, max_t)``: the options of the solve and of the unit-time step that
    differentiates the event, the event tolerance (None: the default) and the time limit in PETSc
    time (None: none)."""
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
             if key not in _STEP_CONTROL_KEYS and not key.lstrip("-").startswith(_SEARCH_ONLY_PREFIXES)}
    return search, steps, event_tol, max_t


def _check_event_problem(problem: Problem) -> None:
    cfg = problem.config
    if not cfg.adaptive and cfg.step_size is None and cfg.first_step is None:
        raise InputError(f"method {cfg.method.name!r} takes fixed steps, and an event search has no output time to "
                         "step to: pass options={'step_size': h}, or use an adaptive method (e.g. 'dopri5')")
    if problem.plan is not None:
        raise InputError("options 'jump_t', 'step_t' and 'grid_constructor' prescribe steps up to output times; a "
                         "solve until an event has none: leave them out, or split the solve at those times yourself")


# ---------------------------------------------------------------------------------------------- steps
class _Stepper:
    """One step of the method from a state, on a pooled solver that records nothing (for locating)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.rhs = problem.rhs(())
        self.pooled = None

    def __call__(self, base_tau: float, base_state: torch.Tensor, length: float) -> torch.Tensor:
        if self.pooled is None:
            self.pooled = acquire_solver(self.problem, 0, False)
        end = base_tau + length
        replay = Replay(np.array([base_tau, end]), [end - base_tau], accept_all=True)
        return self.pooled[1].replay(self.rhs, base_state, replay)

    def tableau(self) -> Optional[tuple]:
        """PETSc's ``(A, b, c, fsal)`` of an explicit RK method (see :func:`pnode._impl.tableaus.petsc_tableau`),
        else None."""
        if self.problem.config.method.ts_type != "rk":
            return None
        if self.pooled is None:
            self.pooled = acquire_solver(self.problem, 0, False)
        return petsc_tableau(self.pooled[1].ts) if self.pooled[1].ts.getType() == "rk" else None

    def close(self) -> None:
        if self.pooled is not None:
            release_solver(*self.pooled)
            self.pooled = None


class _EventGradients:
    """The event time and state with the implicit function theorem's graph attached (see the module docstring).

    Args:
        problem: the event solve's problem.
        events: its event functions.
        located: where the event was found.
        step_options: the options of the unit-time step that differentiates the event.
    """

    def __init__(self, problem: Problem, events: EventFunction, located: Located, step_options: dict,
                 tableau: Optional[tuple] = None):
        self.problem = problem
        self.events = events
        self.located = located
        self.tableau = tableau
        cfg = problem.config
        self.keywords = dict(rtol=cfg.rtol, atol=cfg.atol, method=cfg.method.name, comm=problem.comm,
                             options=dict(step_options, step_size=2.0))

    def attach(self, y_fixed: torch.Tensor, shift: Optional[torch.Tensor],
               differentiable: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(event_t, y_event)``: the event time (user time, float64) and the state at it (``y_fixed``,
        the solve's last output, differentiated at a fixed step length), each moving with the event's
        step length ``h`` by the implicit function theorem when gradients are wanted."""
        problem, located = self.problem, self.located
        direction, index = problem.direction, located.crossing.index
        t_event = torch.tensor(direction * located.tau, dtype=torch.float64)
        if shift is not None:
            t_event = t_event + shift.to(torch.float64)
        if not differentiable or located.crossing.jump:
            return t_event, y_fixed
        with torch.enable_grad():
            value = self.events.local(self.user_time(located.crossing.length), y_fixed)[index]
        moves = value.requires_grad
        check_consistent(problem.comm, "whether odeint_event is differentiated", moves,
                         "Every rank must take the same gradients (y0, t0, parameters, event_fn's tensors)")
        if not moves:
            self._check_autograd(index, y_fixed)
            return t_event, y_fixed
        along = self._along_step()
        slope = self.slope(index, along, y_fixed)
        step_change = (value - value.detach()).to("cpu", torch.float64) * (-1.0 / slope)
        if problem.comm.getSize() > 1:
            step_change = _SumOverRanks.apply(step_change, problem.comm)
        moved = _AlongTheStep.apply(step_change, along, y_fixed)
        return t_event + direction * step_change, y_fixed + moved

    def _along_step(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``w -> w . dy_e/dh`` (float64 0-dim) for cotangents ``w`` of the state at the event.

        For an explicit RK method, one step of PETSc's tableau in torch with ``h`` as a variable:
        its graph (``s`` evaluations of ``f``) serves every cotangent. Otherwise the step solved by
        pnode on the ODE rescaled to unit time (:meth:`step_end`), once per cotangent.
        """
        length = torch.tensor(self.located.crossing.length, dtype=torch.float64, requires_grad=True)
        if self.tableau is not None:
            with torch.enable_grad():
                end = self._tableau_step(length)
            if end.requires_grad:
                return lambda w: _length_gradient(end, length, w, retain_graph=True)

        def rescaled(w: torch.Tensor) -> torch.Tensor:
            fresh = length.detach().requires_grad_(True)
            with torch.enable_grad():
                return _length_gradient(self.step_end(fresh), fresh, w, retain_graph=False)
        return rescaled

    def _tableau_step(self, length: torch.Tensor) -> torch.Tensor:
        """One explicit RK step of ``length`` from the base with PETSc's tableau, float64, flat: the
        crossing step, in PETSc's coefficients (its arithmetic differs from PETSc's in rounding only)."""
        a, b, c, _ = self.tableau
        problem, layout = self.problem, self.problem.layout
        base = self.located.base_state.to(device=layout.device, dtype=torch.float64)
        used = [i for i in range(len(b)) if b[i] != 0 or any(a[j, i] != 0 for j in range(i + 1, len(b)))]
        ks = {}
        for i in range(max(used) + 1):
            stage = base
            for j in range(i):
                if a[i, j] != 0 and j in ks:
                    stage = stage + (float(a[i, j]) * length) * ks[j]
            t = problem.direction * (self.located.base_tau + float(c[i]) * length)
            out = layout.flatten(problem.func(t.to(layout.dtype), layout.unflatten(stage.to(layout.dtype))))
            ks[i] = problem.direction * out.to(torch.float64)
        end = base
        for i in used:
            if b[i] != 0:
                end = end + (float(b[i]) * length) * ks[i]
        return end

    def user_time(self, length: torch.Tensor) -> torch.Tensor:
        """The user's time (0-dim, the state's dtype) ``length`` after the base."""
        layout = self.problem.layout
        t = self.problem.direction * (self.located.base_tau + length)
        return torch.as_tensor(t, dtype=torch.float64).to(device=layout.device, dtype=layout.dtype)

    def step_end(self, length: torch.Tensor) -> torch.Tensor:
        """The crossing step of ``length`` (a float64 0-dim tensor that may require grad) from the base,
        solved on the ODE rescaled to unit time: the state at its end, flat, differentiable in ``length``.

        ``dy/ds = d h f(d (tau_b + s h), y)`` for ``s`` in [0, 1] (``d`` the direction, ``tau_b`` the
        base): one step of size 1 of it is, to round-off, one step of length ``h`` of the ODE. ``h``
        rides along as a constant entry of the state, so PETSc's adjoint differentiates it.
        """
        problem, layout = self.problem, self.problem.layout
        func, direction, base, numel = problem.func, problem.direction, self.located.base_tau, layout.numel
        start = torch.cat([self.located.base_state.to(device=layout.device, dtype=layout.dtype),
                           length.reshape(1).to(device=layout.device, dtype=layout.dtype)])

        def rescaled(s, z):
            h = z[numel].to(torch.float64)
            t = (direction * (base + s.to(torch.float64) * h)).to(layout.dtype)
            velocity = layout.flatten(func(t, layout.unflatten(z[:numel])))
            return torch.cat([(direction * h).to(layout.dtype) * velocity, torch.zeros_like(z[numel:])])

        unit = torch.tensor([0.0, 1.0], dtype=torch.float64)
        keywords = self.keywords
        unit_problem = check_inputs(rescaled, start, unit, keywords["rtol"], keywords["atol"], keywords["method"],
                                    keywords["options"], keywords["comm"])
        return solve(unit_problem, (), differentiable=start.requires_grad)[-1, :numel]

    def slope(self, index: int, along: Callable[[torch.Tensor], torch.Tensor], y_event: torch.Tensor) -> float:
        """``d phi / dh = dg/dt + dg/dy . dy_e/dh`` of event function ``index`` along the computed
        crossing step at the event, summed over ranks: the discrete counterpart of ``dg/dt + dg/dy . f``.

        Raises a ``GRAZING_EVENT`` error where it (nearly) vanishes: below a millionth of the slope of
        the chord from the base to the event (a multiple root, whose time has no finite derivative).
        """
        length = torch.tensor(self.located.crossing.length, dtype=torch.float64, requires_grad=True)
        y = y_event.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.events.local(self.user_time(length), y)[index]
        grads = torch.autograd.grad(value, (length, y), allow_unused=True) if value.requires_grad else (None, None)
        local = 0.0 if grads[0] is None else float(grads[0])
        if grads[1] is not None:
            local += float(along(grads[1]))
        return self._checked_slope(float(self.events.sum_over_ranks(np.array([local]))[0]), index)

    def _checked_slope(self, slope: float, index: int) -> float:
        """``slope``, unless it marks a grazing event (see :meth:`slope`)."""
        located = self.located
        chord = abs(located.base_values[index]) / located.crossing.length
        if not math.isfinite(slope) or abs(slope) <= _GRAZING_SLOPE * chord:
            raise _grazing(self.problem.direction * located.tau, index, slope)
        return slope

    def _check_autograd(self, index: int, y_fixed: torch.Tensor) -> None:
        """Raise when event function ``index`` depends on neither ``t`` nor ``y`` as autograd sees it
        (built from Python floats, or detached): its event time could not move."""
        t = self.user_time(torch.tensor(self.located.crossing.length, dtype=torch.float64)).requires_grad_()
        with torch.enable_grad():
            value = self.events.local(t, y_fixed.detach().requires_grad_())[index]
        if not value.requires_grad:
            raise _grazing(self.problem.direction * self.located.tau, index, 0.0)


def _length_gradient(end: torch.Tensor, length: torch.Tensor, cotangent: torch.Tensor,
                     retain_graph: bool) -> torch.Tensor:
    """``cotangent . d end / d length`` (float64 0-dim; zero where ``end`` does not depend on it)."""
    (grad,) = torch.autograd.grad(end, length, grad_outputs=cotangent.to(end), retain_graph=retain_graph,
                                  allow_unused=True)
    return torch.zeros((), dtype=torch.float64) if grad is None else grad.detach()


class _AlongTheStep(torch.autograd.Function):
    """Zero in value; its derivative in the step length ``h`` is the crossing step's ``dy_e/dh``
    (``along(w) = w . dy_e/dh``)."""

    @staticmethod
    def forward(ctx, step_change: torch.Tensor, along: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor):
        ctx.along = along
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor):
        return ctx.along(cotangent), None, None


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


def _grazing(t_user: float, index: int, slope: float) -> SolverError:
    which = f"event function {index}" if index else "event_fn"
    return SolverError(f"{which} touches zero without crossing it transversally: its derivative along the computed "
                       f"solution is {slope:.3g} at t={t_user:.6g}. The event time is then not differentiable; use an "
                       "event function that crosses zero with a nonzero slope (dg/dt + dg/dy . f != 0), and build it "
                       "from torch operations on t and y (autograd takes its derivatives)", t_reached=t_user,
                       reason="GRAZING_EVENT")
