"""Watching for an event during a forward solve: the user's ``event_fn`` at every step end.

:class:`EventFunction` checks and evaluates ``event_fn`` (summed over MPI ranks, so that every rank
stops at the same time). :class:`EventWatch` is what a forward solve with an event consults
(:class:`pnode._impl.solver.EventStop`): it keeps the sign each event function started with, tells the
solver when a step has left it (the solver rolls that step back before anything records it), and
locates the event inside that step (:func:`pnode._impl.event_refine.locate`), from the cubic Hermite
interpolant of the step and then on one-step solves of the method from the step's start.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .._compat import converged_reason_name
from ..distributed import check_consistent
from .bridge import StateLayout, petsc_eps
from .errors import InputError, SolverError
from .event_refine import SAMPLES, Crossing, crossed, locate
from .rhs import RHS

# The step limit of an event search when options['max_num_steps'] is not given: a search that finds
# no crossing stops with an error instead of integrating for ever.
DEFAULT_MAX_NUM_STEPS = 10_000
# The default event tolerance, in round-off units of the coarser of the state's dtype and PETSc's
# real type: values of an event function within it of zero count as zero at the initial point (a
# zero at t0, up to round-off, is not an event) and tell a jump from a root.
EVENT_TOL_ULPS = 100.0

Stepper = Callable[[float, torch.Tensor, float], torch.Tensor]
"""``stepper(base_tau, base_state, h)``: one step of the method of length ``h`` from ``base_state``
(flat, PETSc dtype, on the solver's device) at PETSc time ``base_tau``; the state at its end, likewise."""


# ---------------------------------------------------------------------------------------------- event function
class EventFunction:
    """The user's ``event_fn`` as the search and the refinement see it.

    Args:
        event_fn: ``event_fn(t, y)``, returning a real 0-dim or 1-D tensor.
        layout: the state's layout (``y`` is unflattened for ``event_fn``).
        comm: the PETSc communicator; with several ranks, values are summed over them.

    Attributes:
        count: the number of event functions, set by :meth:`check_first`.
    """

    def __init__(self, event_fn: Callable, layout: StateLayout, comm):
        self.event_fn = event_fn
        self.layout = layout
        self.comm = comm
        self.count: Optional[int] = None

    def local(self, t: torch.Tensor, y_flat: torch.Tensor) -> torch.Tensor:
        """``event_fn(t, y)`` on this rank as a 1-D tensor (keeps its graph when grad is enabled)."""
        value = self.event_fn(t, self.layout.unflatten(y_flat))
        return self._checked(value, t)

    def check_first(self, t: torch.Tensor, y_flat: torch.Tensor) -> np.ndarray:
        """Evaluate at the initial point, fix :attr:`count` (the same on every rank) and return the values."""
        with torch.no_grad():
            vector = self.local(t, y_flat)
        self.count = vector.numel()
        check_consistent(self.comm, "the number of event functions", self.count,
                         "event_fn must return the same number of values on every rank")
        return self.sum_over_ranks(_copy(vector))

    def values(self, t: torch.Tensor, y_flat: torch.Tensor) -> np.ndarray:
        """The event functions' values summed over the ranks, float64 ``(count,)`` (collective)."""
        with torch.no_grad():
            vector = self.local(t, y_flat)
        values = self.sum_over_ranks(_copy(vector))
        if not np.isfinite(values).all():
            raise SolverError(f"event_fn returned a non-finite value ({values.tolist()}) at t={float(t):.6g}; "
                              "it must be finite along the solution", t_reached=float(t), reason="NONFINITE_EVENT")
        return values

    def sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        if self.comm.getSize() == 1:
            return values
        from mpi4py import MPI

        total = np.ascontiguousarray(values, dtype=np.float64).copy()
        self.comm.tompi4py().Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return total

    def _checked(self, value, t: torch.Tensor) -> torch.Tensor:
        where = f"at t={float(t.detach()):.6g}"
        if not isinstance(value, torch.Tensor):
            raise InputError(f"event_fn returned {type(value).__name__} {where}; it must return a tensor: 0-dim for "
                             "one event function, or 1-D with one value per event function")
        if value.is_complex() or not value.is_floating_point():
            raise InputError(f"event_fn returned dtype {value.dtype} {where}; event functions must be real floating "
                             "point (their sign changes mark the events)")
        if value.dim() > 1 or value.numel() == 0:
            raise InputError(f"event_fn returned shape {tuple(value.shape)} {where}; it must return one real value "
                             "per event function: a 0-dim tensor, or a 1-D tensor of several (reduce a batch, e.g. "
                             "with .sum() or .amin(), or flatten it with .reshape(-1) for one event per entry)")
        if self.count is not None and value.numel() != self.count:
            raise InputError(f"event_fn returned {value.numel()} values {where} but {self.count} at t0; it must "
                             "return the same number of event functions at every point")
        return value.reshape(-1)


def _copy(values: torch.Tensor) -> np.ndarray:
    """``values`` as a new float64 array: an event function may return a view of the state, which
    can be a view of a PETSc vector that the next step overwrites."""
    return values.detach().to("cpu", torch.float64).numpy().copy()


# ---------------------------------------------------------------------------------------------- watch
@dataclass
class Located:
    """An event, located.

    Attributes:
        base_tau: PETSc time of the start of the step that crossed (the last step end before the event).
        base_state: the state there, flat, PETSc dtype, the solver's device (this rank's rows).
        base_values: the event functions there (summed over the ranks).
        steps: accepted steps up to the base.
        crossing: where the event lies in that step.
    """

    base_tau: float
    base_state: torch.Tensor
    base_values: np.ndarray
    steps: int
    crossing: Crossing

    @property
    def tau(self) -> float:
        """The event's PETSc time (the sum PETSc forms for the step to it)."""
        return self.base_tau + self.crossing.length


class EventWatch:
    """The event functions at every accepted step end of a forward solve (see :class:`pnode._impl.solver.EventStop`).

    An event function starts with the sign of its value at ``t0``, or, within ``tolerance`` of zero
    there (a zero at ``t0`` is not an event), with the sign it first takes beyond it. A step ends
    with an event when some function has left its starting sign (an exact zero counts).

    Args:
        events: the event functions.
        tolerance: values within it of zero are zeros at ``t0`` and tell a jump from a root.
        tau_max: the search's PETSc time limit (``inf``: none).
        stepper: one step of the method from a state (see :data:`Stepper`), for locating the event.

    Attributes:
        located: the event, once :meth:`locate` has run.
    """

    def __init__(self, events: EventFunction, tolerance: float, tau_max: float, stepper: Stepper):
        self.events = events
        self.tolerance = tolerance
        self.tau_max = tau_max
        self.stepper = stepper
        self.signs: Optional[np.ndarray] = None
        self.first_values: Optional[np.ndarray] = None
        self.base_values: Optional[np.ndarray] = None  # at the last accepted step end
        self.end: Optional[Tuple[float, torch.Tensor, np.ndarray]] = None  # the crossing step's end
        self.tau0, self.steps = math.nan, 0
        self.lower: Optional[np.ndarray] = None  # where in the crossing step each function's sign counts from
        self.previous: Optional[Tuple[float, torch.Tensor]] = None  # the last step end, while a sign is open
        self.located: Optional[Located] = None

    def start(self, rhs: RHS, tau0: float, y0: torch.Tensor) -> None:
        values = self.events.check_first(rhs.user_time(tau0), rhs.to_user(y0))
        self.signs = np.where(np.abs(values) >= self.tolerance, np.sign(values), 0.0)
        self.first_values = self.base_values = values
        self.tau0, self.steps = tau0, 0
        self.lower = np.zeros_like(values)
        self.previous = (tau0, y0.clone()) if (self.signs == 0).any() else None

    def crossed(self, rhs: RHS, tau: float, u: torch.Tensor) -> bool:
        values = self.events.values(rhs.user_time(tau), rhs.to_user(u))
        self.lower = np.zeros_like(values)
        inside = self._settle_inside(rhs, tau, u, values) if self.previous is not None else False
        if inside or crossed(values, self.signs).any():
            self.end = (tau, u.clone(), values)
            return True
        self.base_values = values
        self.steps += 1
        self.previous = (tau, u.clone()) if (self.signs == 0).any() else None
        return False

    def _settle_inside(self, rhs: RHS, tau: float, u: torch.Tensor, values: np.ndarray) -> bool:
        """For the functions still within the tolerance of zero at the step's start: the sign each first
        takes beyond it along the step (on the step's Hermite interpolant, at the same points
        :func:`pnode._impl.event_refine.locate` samples), from where it counts (:attr:`lower`); whether one
        then leaves it again inside the step. A flight that starts at zero, rises and ends past a
        terminal time where the function is exactly zero is seen this way."""
        base_tau, base_state = self.previous
        length = tau - base_tau
        interpolant = _hermite(rhs, base_tau, base_state, tau, u)
        open_ = self.signs == 0
        left = np.zeros(len(values), dtype=bool)
        for k in range(1, SAMPLES + 1):
            h = length * k / SAMPLES if k < SAMPLES else length
            v = values if k == SAMPLES else self.events.values(rhs.user_time(base_tau + h),
                                                               rhs.to_user(interpolant(h / length)))
            left |= open_ & (self.signs != 0) & (np.sign(v) != self.signs)
            settle = open_ & (self.signs == 0) & (np.abs(v) >= self.tolerance)
            self.signs = np.where(settle, np.sign(v), self.signs)
            self.lower = np.where(settle, h, self.lower)
        return bool(left.any())

    def locate(self, rhs: RHS, base_tau: float, base_state: torch.Tensor) -> float:
        end_tau, end_state, end_values = self.end
        length = end_tau - base_tau
        interpolant = _hermite(rhs, base_tau, base_state, end_tau, end_state)

        def cheap(h: float) -> np.ndarray:
            return self.events.values(rhs.user_time(base_tau + h), rhs.to_user(interpolant(h / length)))

        def exact(h: float) -> np.ndarray:
            return self.events.values(rhs.user_time(base_tau + h), rhs.to_user(self.stepper(base_tau, base_state, h)))

        resolution = 4 * petsc_eps() * max(abs(base_tau), abs(end_tau), length)
        crossing = locate(cheap, exact, self.signs, length, self.base_values, end_values, resolution, self.tolerance,
                          self.lower)
        self.located = Located(base_tau, base_state, self.base_values, self.steps, crossing)
        return crossing.length

    def not_found(self, ts, rhs: RHS) -> SolverError:
        t_user, t0 = rhs.direction * ts.getTime(), rhs.direction * self.tau0
        seen = f"event_fn was {_format(self.first_values)} at t0 and {_format(self.base_values)} at t={t_user:.6g}"
        if math.isfinite(self.tau_max) and ts.getTime() >= self.tau_max:
            return SolverError(f"no event between t0={t0:.6g} and max_t={t_user:.6g}: {seen}, with no zero crossing in "
                               "between; raise options['max_t'], or check the sign of event_fn", t_reached=t_user,
                               reason="NO_EVENT")
        reason = converged_reason_name(ts.getConvergedReason())
        return SolverError(f"no event within {ts.getStepNumber()} steps (options['max_num_steps'], default "
                           f"{DEFAULT_MAX_NUM_STEPS} for event solves; {reason}): {seen}; raise "
                           "options['max_num_steps'], take larger steps, or check the sign of event_fn",
                           t_reached=t_user, reason="NO_EVENT")


def _hermite(rhs: RHS, tau0: float, y0: torch.Tensor, tau1: float, y1: torch.Tensor):
    """The cubic Hermite interpolant of a step, ``theta -> y`` for ``theta`` in [0, 1] (PETSc dtype, device of y0)."""
    length = tau1 - tau0
    f0 = rhs.evaluate(tau0, y0).to(y0) * length
    f1 = rhs.evaluate(tau1, y1).to(y1) * length

    def at(theta: float) -> torch.Tensor:
        t2, t3 = theta * theta, theta * theta * theta
        return ((2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + theta) * f0 + (3 * t2 - 2 * t3) * y1
                + (t3 - t2) * f1)
    return at


def _format(values: Optional[np.ndarray]) -> str:
    if values is None:
        return "?"
    return f"{values[0]:.6g}" if len(values) == 1 else "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
