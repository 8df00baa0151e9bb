"""Locating an event: a TS with PETSc's event handler watching the user's ``event_fn``.

:class:`EventFunction` checks and evaluates ``event_fn`` (summed over MPI ranks, so that every rank
stops at the same time); :class:`EventSearch` integrates from ``t0`` until PETSc has localised the
first sign change, and returns where it stopped as a :class:`Located` (with the *base*: the last
step end PETSc accepted before it first saw the sign change). :mod:`pnode.events` refines that time
and differentiates through it.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._compat import PETSc, converged_reason_name
from .bridge import StateLayout, petsc_dtype, petsc_eps, tensor_into_vec, tensor_to_petsc_cpu, vec_key, vec_view
from .distributed import check_consistent
from .errors import CallbackErrorTrap, InputError, SolverError
from .operators import RHSJacobianShell, create_shell
from .options import option_value, scoped_options
from .problem import Problem
from .rhs import RHS
from .ts_setup import initial_step

# The step limit of an event search when options['max_num_steps'] is not given: a search that finds
# no crossing stops with an error instead of integrating for ever.
DEFAULT_MAX_NUM_STEPS = 10_000
# options that steer the search only (the replayed steps are fixed)
SEARCH_ONLY_PREFIXES = ("ts_adapt_", "ts_event_")


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
        return self.sum_over_ranks(vector.detach().to("cpu", torch.float64).numpy())

    def values(self, t: torch.Tensor, y_flat: torch.Tensor) -> np.ndarray:
        """The event functions' values summed over the ranks, float64 ``(count,)`` (collective)."""
        with torch.no_grad():
            vector = self.local(t, y_flat)
        values = self.sum_over_ranks(vector.detach().to("cpu", torch.float64).numpy())
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


# ---------------------------------------------------------------------------------------------- search
@dataclass
class Located:
    """Where PETSc's event handler stopped.

    Attributes:
        step_times: PETSc times of the accepted steps up to the base, ``step_times[0]`` the initial
            time; the step that crosses starts at ``step_times[-1]``.
        base_state: the state there, flat, PETSc dtype, CPU (this rank's rows).
        event_time: PETSc's event time (PETSc time), where ``|event_fn| < event_tol``.
        fired: the indices of the event functions PETSc reported there.
        tolerance: the event tolerance PETSc used.
    """

    step_times: List[float]
    base_state: torch.Tensor
    event_time: float
    fired: Tuple[int, ...]
    tolerance: float


def _signs(values: np.ndarray, tolerance: float) -> np.ndarray:
    """PETSc's event signs (``TSEventCalcSigns``): 0 within the tolerance, else the sign."""
    return np.where(np.abs(values) < tolerance, 0, np.sign(values)).astype(np.int64)


def _crosses(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether PETSc sees a crossing between two points (either direction): a sign change, or a value
    that falls within the tolerance from outside it."""
    return bool(np.any((before * after < 0) | ((after == 0) & (before != 0))))


class EventSearch:
    """A TS with PETSc's event handler that integrates from ``t0`` until the first event (no trajectory).

    Built per call and destroyed after :meth:`run`. Besides PETSc's event time it records the base
    of the crossing step: PETSc rolls a step that crosses back and retries shorter ones, and may
    accept some of those before it stops; the base is the step end it had accepted when it first
    saw the sign change, mirrored here with PETSc's own sign rule and tolerance.

    Args:
        problem: the canonical problem (method, options, state, communicator).
        events: the event functions.
        event_tol: ``options['event_tol']`` or None (the command line's ``-ts_event_tol`` wins over
            it, PETSc's default 1e-6 applies without either).
        max_t: the time limit in PETSc time, or None.
    """

    def __init__(self, problem: Problem, events: EventFunction, event_tol: Optional[float], max_t: Optional[float]):
        self.problem = problem
        self.events = events
        self.max_t = max_t
        layout, comm = problem.layout, problem.comm
        self.rhs = RHS(problem.func, layout, (), problem.direction, problem.counter)
        self.trap = CallbackErrorTrap()
        self.solution = PETSc.Vec().createMPI((layout.numel, PETSc.DECIDE), comm=comm)
        self.jacobian = create_shell(RHSJacobianShell(self.trap), layout.numel, layout.numel, comm)
        self.step_times: List[float] = []
        self.accepted_state = torch.empty(layout.numel, dtype=petsc_dtype())
        self.accepted_signs: Optional[np.ndarray] = None
        self.pending_signs: Optional[np.ndarray] = None
        self.base: Optional[Tuple[int, torch.Tensor]] = None
        self.fired: Tuple[int, ...] = ()
        self.last_values: Optional[np.ndarray] = None
        self.nonfinite_at: Optional[float] = None
        self.tau0 = float(problem.taus[0])
        self.first_values = events.check_first(self.rhs.user_time(self.tau0), problem.y0_flat.detach())
        self.ts, self.tolerance = self._create_ts(event_tol)

    def _create_ts(self, event_tol: Optional[float]):
        cfg = self.problem.config
        ts = PETSc.TS().create(comm=self.problem.comm)
        ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
        ts.setRHSFunction(self._rhs_function, None)
        ts.setRHSJacobian(self._rhs_jacobian, self.jacobian, self.jacobian)
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setTolerances(rtol=cfg.rtol, atol=cfg.atol)
        ts.setMaxSteps(min(cfg.max_num_steps, 2**31 - 2))  # PETSc needs a finite limit of steps or time
        ts.setMaxTime(self.max_t if self.max_t is not None else float(np.finfo(PETSc.RealType).max))
        ts.setErrorIfStepFails(False)
        ts.setPostStep(self._post_step)
        if cfg.adaptive and (cfg.min_step is not None or cfg.max_step is not None):
            ts.setStepLimits(cfg.min_step or 0.0, cfg.max_step or PETSc.INFINITY)
        if cfg.prefix:
            ts.setOptionsPrefix(cfg.prefix)
        user = dict(cfg.petsc_options)
        if event_tol is not None:
            user["ts_event_tol"] = option_value(event_tol)
        count = self.events.count
        with scoped_options(cfg.prefix, user, cfg.derived_options()) as user_names:
            ts.setFromOptions()
            # after setFromOptions: the handler reads -ts_event_* and the adaptor's step limits
            ts.setEventHandler([0] * count, [True] * count, self._indicator, self._post_event)
            default = 1e-4 if petsc_eps() > 1e-10 else 1e-6  # TSSetEventHandler's own default
            tolerance = PETSc.Options().getReal(cfg.prefix + "ts_event_tol", default)
            _check_search_options_used(user_names)
        ts.setEventTolerances(tolerance)  # the value _indicator's copy of PETSc's sign rule uses
        return ts, tolerance

    # ------------------------------------------------------------------ callbacks
    def _rhs_function(self, ts, tau, u, f):
        self.trap.call(lambda: tensor_into_vec(self.rhs.evaluate(tau, vec_view(u)), f))

    def _rhs_jacobian(self, ts, tau, u, jac, pre):
        def run():
            self.jacobian.getPythonContext().reset(self.rhs.linearize(tau, vec_view(u), vec_key(u)))
        self.trap.call(run)

    def _indicator(self, ts, tau, u, fvalue):
        def run():
            values = self.events.values(self.rhs.user_time(tau), self.rhs.to_user(vec_view(u)))
            fvalue[:] = values
            self.last_values = values
            signs = _signs(values, self.tolerance)
            if self.accepted_signs is None:  # the initial point (TSEventInitialize)
                self.accepted_signs = signs
            elif self.base is None and _crosses(self.accepted_signs, signs):
                self.base = (len(self.step_times), self.accepted_state.clone())
            self.pending_signs = signs
        self.trap.call(run)

    def _post_step(self, ts):
        def run():
            u = ts.getSolution()
            if not np.isfinite(u.norm()):
                self.nonfinite_at = ts.getTime()
                ts.setConvergedReason(PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED)
                return
            self.step_times.append(ts.getTime())
            self.accepted_state.copy_(vec_view(u))
            self.accepted_signs = self.pending_signs
        self.trap.call(run)

    def _post_event(self, ts, events_zero, tau, u, forward):
        self.fired = tuple(int(i) for i in events_zero)

    # ------------------------------------------------------------------ solve
    def run(self) -> Located:
        """Integrate until the event; returns where it is (collective)."""
        y0 = tensor_to_petsc_cpu(self.problem.y0_flat)
        tau0 = self.tau0
        try:
            tensor_into_vec(y0, self.solution)
            self.step_times = [tau0]
            self.accepted_state.copy_(y0)
            ts = self.ts
            ts.setTime(tau0)
            ts.setStepNumber(0)
            ts.setTimeStep(self._first_step(tau0, y0))
            self._solve()
            return self._located()
        finally:
            self.ts.destroy()
            self.jacobian.destroy()
            self.solution.destroy()

    def _solve(self) -> None:
        try:
            self.ts.solve(self.solution)
        except PETSc.Error as exc:
            original = self.trap.pop()
            if original is not None:
                raise original.with_traceback(original.__traceback__) from None
            t_user = self.problem.direction * self.ts.getTime()
            raise SolverError(f"PETSc failed in the event search at t={t_user:.6g}: {exc}. Run with -ts_monitor "
                              "-ts_event_monitor -ts_adapt_monitor to see where", t_reached=t_user,
                              reason=f"PETSC_ERROR_{exc.ierr}") from None
        error = self.trap.pop()
        if error is not None:
            raise error

    def _first_step(self, tau0: float, y0: torch.Tensor) -> float:
        cfg = self.problem.config
        if cfg.step_size is not None:
            return cfg.step_size
        if cfg.first_step is not None:
            return cfg.first_step
        return initial_step(self.rhs, cfg.rtol, cfg.atol, cfg.method.order, tau0, y0, self.problem.comm)

    def _located(self) -> Located:
        ts = self.ts
        reason = ts.getConvergedReason()
        direction = self.problem.direction
        t_user = direction * ts.getTime()
        if reason == PETSc.TS.ConvergedReason.CONVERGED_EVENT:
            if self.base is None:
                raise SolverError(f"PETSc reported an event at t={t_user:.6g} that pnode's copy of its sign rule did "
                                  "not see (a PETSc whose event handler differs from 3.26's?); please report it",
                                  t_reached=t_user, reason="EVENT_MISMATCH")
            count, state = self.base
            return Located(self.step_times[:count], state, ts.getTime(), self.fired, self.tolerance)
        if self.nonfinite_at is not None:
            raise SolverError(f"the solution became non-finite (NaN/inf) after t={direction * self.nonfinite_at:.6g} "
                              "while searching for the event; try smaller steps, an adaptive method ('dopri5') or an "
                              "implicit one ('cn', 'beuler')", t_reached=direction * self.nonfinite_at,
                              reason="NONFINITE_STATE")
        name = converged_reason_name(reason)
        seen = (f"event_fn was {_format(self.first_values)} at t0 and {_format(self.last_values)} at "
                f"t={t_user:.6g}")
        t0 = direction * self.tau0
        if reason == PETSc.TS.ConvergedReason.CONVERGED_TIME:
            raise SolverError(f"no event between t0={t0:.6g} and max_t={t_user:.6g}: {seen}, with no zero crossing "
                              "in between; raise options['max_t'], or check the sign of event_fn",
                              t_reached=t_user, reason="NO_EVENT")
        if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS and self.base is not None:
            crossed = direction * self.step_times[self.base[0] - 1]
            raise SolverError(f"event_fn changed sign after t={crossed:.6g}, but the event search ran out of steps "
                              f"({ts.getStepNumber()}, options['max_num_steps']) localising the crossing; raise "
                              "options['max_num_steps'] or options['event_tol']", t_reached=t_user, reason="NO_EVENT")
        if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS:
            raise SolverError(f"no event within {ts.getStepNumber()} steps (options['max_num_steps'], default "
                              f"{DEFAULT_MAX_NUM_STEPS} for odeint_event) from t0={t0:.6g}: {seen}; raise "
                              "options['max_num_steps'], take larger steps, or check the sign of event_fn",
                              t_reached=t_user, reason="NO_EVENT")
        raise SolverError(f"the event search stopped at t={t_user:.6g} after {ts.getStepNumber()} steps ({name}); "
                          "the problem may be stiff (try method='cn' or 'beuler'), or loosen rtol/atol",
                          t_reached=t_user, reason=name)


def _format(values: Optional[np.ndarray]) -> str:
    if values is None:
        return "?"
    return f"{values[0]:.6g}" if len(values) == 1 else "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _check_search_options_used(names: Sequence[str]) -> None:
    """Raise for an adaptivity or event option (given in ``options``) that the search TS did not read.

    The other options also reach pnode's own solves of the same steps, which check them.
    """
    db = PETSc.Options()
    used = getattr(db, "used", None)
    if used is None:
        return
    unused = [n for n in names if _search_only(n) and not used(n)]
    if unused:
        raise InputError(f"options {unused} were not used by PETSc's event search; check the spelling (PETSc names "
                         "are e.g. 'ts_event_tol', 'ts_adapt_dt_max'), or use options['event_tol']")


def _search_only(name: str) -> bool:
    return any(part in name for part in SEARCH_ONLY_PREFIXES)
