"""Refining an event time: Newton's method on the event function along the computed crossing step.

PETSc's event handler localises a sign change only to ``event_tol``. :func:`refine` moves the event
time to a root of ``phi(h) = g(t(h), y(h))``, ``y(h)`` one step of the method from the search's base
to ``t(h)``, to round-off, so that the event time is a smooth function of ``y0`` and the parameters
(see :mod:`pnode.events`). The crossing steps are taken by a :class:`pnode.events.StepSolves`.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Tuple

import numpy as np
import torch

from .bridge import petsc_eps
from .errors import SolverError
from .event_search import EventFunction, Located

if TYPE_CHECKING:
    from .events import StepSolves

# Newton iterations that refine PETSc's event time: from |g| < event_tol a simple root converges
# quadratically in two to five; a grazing (multiple) root converges linearly and exhausts them.
_NEWTON_ITERATIONS = 16


@dataclass
class Event:
    """The refined event.

    Attributes:
        tau: the event time in PETSc time.
        step: the crossing step's length, ``tau`` minus the base (PETSc time).
        index: which event function crossed.
        state: the state at the event, flat, user dtype and device.
        slope: ``d phi / d step`` for ``phi(step) = g(t(step), y(step))`` along the computed crossing step,
            summed over the ranks: the discrete counterpart of ``d (dg/dt + dg/dy . f)`` (``d`` the direction).
    """

    tau: float
    step: float
    index: int
    state: torch.Tensor
    slope: float


def _crossing_value(solves: "StepSolves", events: EventFunction, step: float, index: int) -> Tuple[Event, float]:
    """``(event, value)``: the crossing step of length ``step`` from the base with the derivative of event
    function ``index`` along it (one pnode step and its adjoint), and that function's value (summed over the
    ranks)."""
    length = torch.tensor(step, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        state = solves.crossing_step(solves.base_state, length)
        value = events.local(solves.user_time(length), state)[index]
    slope = torch.autograd.grad(value, length, allow_unused=True)[0] if value.requires_grad else None
    total = events.sum_over_ranks(np.array([float(value.detach()), 0.0 if slope is None else float(slope)]))
    event = Event(solves.base_time + step, step, index, state.detach(), float(total[1]))
    return event, float(total[0])


def refine(solves: "StepSolves", events: EventFunction, located: Located) -> Event:
    """Newton's method on each event PETSc reported; the earliest root wins."""
    refined = [_newton(solves, events, located, index) for index in located.fired or range(events.count)]
    return min(refined, key=lambda event: event.tau)


def _newton(solves: "StepSolves", events: EventFunction, located: Located, index: int) -> Event:
    """A root of ``phi(h) = g(t(h), y(h))`` near PETSc's event time, ``y(h)`` the crossing step of length ``h``.

    Converged when the next correction is below the resolution of the time, or when it no longer
    reduces ``|phi|`` once ``|phi|`` is within the event tolerance (the state's round-off, in float32).
    """
    base = solves.base_time
    step, previous = located.event_time - base, None
    for _ in range(_NEWTON_ITERATIONS):
        event, value = _crossing_value(solves, events, step, index)
        if previous is not None and abs(value) >= abs(previous[1]) and abs(previous[1]) < located.tolerance:
            return previous[0]
        if value == 0.0:
            return event
        if event.slope == 0.0 or not math.isfinite(event.slope):
            raise _grazing(solves.direction * event.tau, index, event.slope)
        correction = -value / event.slope
        if abs(correction) <= 4 * petsc_eps() * max(abs(event.tau), step):
            return event
        previous = (event, value)
        step += correction
        if not step > 0:
            break
    raise _grazing(solves.direction * (base + step), index, event.slope, converged=False)


def _grazing(t_user: float, index: int, slope: float, converged: bool = True) -> SolverError:
    which = f"event function {index}" if index else "event_fn"
    if converged:
        detail = f"its time derivative along the computed solution is {slope:.3g} at t={t_user:.6g}"
    else:
        detail = (f"Newton's method could not refine its zero crossing near t={t_user:.6g} (time derivative "
                  f"{slope:.3g} along the computed solution): the crossing is grazing (a multiple root) or "
                  f"{which} is not smooth there")
    return SolverError(f"{which} touches zero without crossing it transversally: {detail}. The event time is then "
                       "not differentiable; use an event function that crosses zero with a nonzero slope "
                       "(dg/dt + dg/dy . f != 0), and build it from torch operations on t and y (autograd takes its "
                       "derivatives)", t_reached=t_user, reason="GRAZING_EVENT")
