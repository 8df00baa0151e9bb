"""Step schedules: what happens before and after each PETSc step of one solve.

A solve carries one schedule, whose ``before_step``/``after_step`` the solver's pre- and post-step
hooks call:

* :class:`OutputSchedule` (a forward pass): lands a step exactly on every output time (the step
  that would cross it is shortened, and the uncut size given back afterwards, so adaptivity does
  not restart from a sliver), and records what the adjoint needs in a :class:`ForwardRecord`:
  step ends and sizes, the step of each output, FSAL reuse, states offered to a checkpoint store;
* :class:`ReplaySchedule` (checkpointing re-taking recorded steps): gives every step its
  recorded size, which repeats it bit for bit;
* :class:`NoSteps` (an adjoint pass): nothing.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence

import numpy as np
import torch

from .._compat import PETSc
from .bridge import petsc_eps, vec_key, vec_view
from .config import SolverConfig
from .evaluation import StageTimes


def sliver() -> float:
    """A step is stretched to the output time when it would stop short by less than this fraction of itself.

    It avoids a spurious round-off-sized step (0.1 + 0.1 + ... falls 1e-16 short of 1.0 in
    float64, 1e-7 in a single-precision PETSc, whose times are float32).
    """
    return max(1e-8, 100 * petsc_eps())


def same_time(a: float, b: float) -> bool:
    """Whether two PETSc times are equal up to the round-off of PETSc's real type (a few ulps).

    PETSc adds a step to its time in its own real type; in a single-precision build that sum can
    differ from the same sum in Python's float64 by an ulp.
    """
    return abs(a - b) <= 4 * petsc_eps() * max(1.0, abs(a), abs(b))


def retried_steps(ts) -> int:
    """Steps PETSc has retried so far: rejected by the step-size controller, or by a failed nonlinear solve."""
    return ts.getStepRejections() + ts.getSNESFailures()


def expected_steps(config: SolverConfig, taus: np.ndarray) -> Optional[int]:
    """Steps a fixed-step forward solve over the PETSc output times ``taus`` takes (None if adaptive).

    Mirrors :meth:`OutputSchedule.before_step`: each output interval of length ``L`` takes full
    steps of ``step_size`` and one final step cut (or, within a sliver, stretched) to the output
    time; without ``step_size`` a fixed-step method steps from output time to output time.
    """
    if config.adaptive:
        return None
    if not np.isfinite(taus[-1]):
        return None  # an event search: the event decides
    if config.step_size is None:
        return len(taus) - 1
    lengths = np.diff(np.asarray(taus, dtype=np.float64))
    return sum(fixed_steps_in(length, config.step_size) for length in lengths)


def fixed_steps_in(length: float, step_size: float) -> Optional[int]:
    """Steps of ``step_size`` an output interval of ``length`` takes: full steps, then one cut (or,
    within a sliver, stretched) to the output time; computed in float64. None for an interval
    without end (an event search)."""
    if not np.isfinite(length):
        return None
    return int(np.floor(length / step_size - sliver())) + 1


def lands_on_output(remaining: float, dt: float, planned_last: bool) -> bool:
    """Whether a step of ``dt`` with ``remaining`` to the next output time is cut or stretched to it.

    Cut when it would cross the output; stretched when it would stop short by a sliver of itself.
    ``planned_last``: this is the interval's last fixed step by the count of :func:`fixed_steps_in`,
    and PETSc retried no step of the interval. Every step before it was then exactly ``dt``, and
    what is left differs from the planned last step only by the rounding of PETSc's time sum,
    which grows with the number of steps (in a single-precision PETSc, 50 steps of 0.1 drift from
    5 by about 1e-4 of a step, 1000 steps of 0.001 from 1 by several percent of one). That step
    lands on the output whatever the drift; half a step bounds it, against a miscount.
    """
    short = remaining - dt
    return dt >= remaining or short < sliver() * dt or (planned_last and short < 0.5 * dt)


@dataclass
class ForwardRecord:
    """What one forward solve leaves for its adjoint.

    Attributes:
        taus: output times in PETSc time, increasing, shape ``(n_times,)``.
        step_of_output: TS step number at which each output time was reached (0 for the first).
        outputs: the solution at every output time, ``(n_times, local_size)``, PETSc dtype, on the solver's device.
        step_times: PETSc time at the end of every accepted step, starting with ``taus[0]``.
        step_sizes: the size PETSc gave every accepted step (``step_times[k + 1]`` is PETSc's sum
            ``step_times[k] + step_sizes[k]``, rounded; the difference of the two times can be an
            ulp off, which a replay must not be), read while its accepted attempt evaluated f (a
            rejected attempt is retried with a smaller size and no hook in between).
        fsal: whether the method reuses a step's last stage derivative as the next step's first
            (dopri5, bosh3: "first same as last"), seen from the forward pass (None: it took too
            few steps to tell). A step re-taken from a checkpoint must then start from that
            derivative, not evaluate ``f`` at the state, to repeat the forward pass bit for bit.
        stages: evaluations of f in the first step, which evaluates every stage (None if PETSc
            retried it: then it evaluated more).
        stage_times: the times f was evaluated at (None: not recorded, no adjoint will run).
        next_step: the step size the controller proposed after the last step (PETSc time): where
            an integration goes on past the last output time (a jump), it starts with it.
    """

    taus: np.ndarray
    step_of_output: List[int] = field(default_factory=list)
    outputs: Optional[torch.Tensor] = None
    step_times: List[float] = field(default_factory=list)
    step_sizes: List[float] = field(default_factory=list)
    fsal: Optional[bool] = None
    stages: Optional[int] = None
    stage_times: Optional[StageTimes] = None
    next_step: Optional[float] = None

    @property
    def steps(self) -> int:
        return len(self.step_sizes)


class Schedule(Protocol):
    """What a solve does around each PETSc step (the solver's pre- and post-step hooks call these)."""

    def before_step(self, ts) -> None:
        """Before a step: its size, and what the schedule records about it."""

    def after_step(self, ts) -> None:
        """After an accepted step."""


class StateStore(Protocol):
    """Where a forward pass offers states to keep (:class:`pnode._impl.checkpoint.CheckpointStore`)."""

    states: Dict[int, torch.Tensor]

    def offer(self, step: int, state: torch.Tensor) -> None:
        """The state after ``step`` (a view: copied if kept)."""

    def keep_derivative(self, step: int, derivative: torch.Tensor) -> None:
        """The FSAL derivative the step after ``step`` started from (a view: copied)."""


class StepObserver(Protocol):
    """Told about every accepted step of a forward pass (:class:`pnode._impl.dense.DenseRecorder`)."""

    def start(self, evaluator, tau0: float, y0: torch.Tensor, solution) -> None:
        """The initial point (flat, PETSc dtype), the solve's evaluator and its solution Vec."""

    def after_step(self, ts) -> None:
        """After an accepted step."""

    def close(self) -> None:
        """The solve is over."""


class NoSteps:
    """The schedule of an adjoint pass: PETSc's own re-steps (solution-only trajectories) need nothing."""

    def before_step(self, ts) -> None:
        pass

    def after_step(self, ts) -> None:
        pass


class ReplaySchedule:
    """Re-take recorded steps: step ``k + 1`` of the replay gets ``sizes[k]`` (the step PETSc took).

    Args:
        sizes: the recorded sizes of the steps to re-take, in order.
        mismatch: builds the error to raise when PETSc takes more steps than recorded.
    """

    def __init__(self, sizes: Sequence[float], mismatch):
        self.sizes = sizes
        self.mismatch = mismatch

    def before_step(self, ts) -> None:
        following = ts.getStepNumber() + 1
        if following > len(self.sizes):
            raise self.mismatch(following)
        ts.setTimeStep(self.sizes[following - 1])

    def after_step(self, ts) -> None:
        pass


class OutputSchedule:
    """A forward pass's step control and recording, filling ``record``.

    Args:
        config: the solver configuration (fixed ``step_size`` or adaptive steps).
        record: the record to fill (``taus``, ``outputs[0]`` and ``step_times[0]`` set).
        store: a :class:`pnode._impl.checkpoint.CheckpointStore` offered the state after every step
            that is not an output time (checkpointing without a trajectory), or None.
        explicit: the method is explicit RK (FSAL reuse can be told from its evaluations).
        dense: told every accepted step (``dense.after_step(ts)``: dense output), or None.
    """

    def __init__(self, config: SolverConfig, record: ForwardRecord, store: Optional[StateStore] = None,
                 explicit: bool = True, dense: Optional[StepObserver] = None):
        self.config = config
        self.record = record
        self.store = store
        self.dense = dense
        self.explicit = explicit
        self.segment_end: Optional[float] = None
        self.uncut_step: Optional[float] = None
        self.step_size: Optional[float] = None  # the size of the step's current attempt, as PETSc holds it
        self.retries = 0  # PETSc's count of retried steps when this step began
        self.interval_retries = 0  # ... and when the current output interval began
        self.evaluations = 0
        self.pending_fsal = None  # (step, its end time): FSAL still to tell at the next evaluation
        self.nonfinite_at: Optional[float] = None
        self._stage_vecs: List[int] = []  # stage Vecs whose times the step in progress recorded

    def before_step(self, ts) -> None:
        self.evaluations = 0
        self._stage_vecs = []
        tau, dt = ts.getTime(), ts.getTimeStep()
        record, planned_last = self.record, False
        output = len(record.step_of_output)
        if self.config.step_size is not None and not self.config.adaptive:
            # Steps of exactly step_size, the last one of an interval cut (torchdiffeq's grid).
            # PETSc would instead split the last two steps before its final time evenly.
            dt = self.config.step_size
            step_in_interval = ts.getStepNumber() - record.step_of_output[-1] + 1
            if step_in_interval == 1:
                self.interval_retries = retried_steps(ts)
            planned = fixed_steps_in(record.taus[output] - record.taus[output - 1], dt)
            planned_last = (planned is not None and step_in_interval >= planned
                            and retried_steps(ts) == self.interval_retries)
        remaining = record.taus[output] - tau
        if lands_on_output(remaining, dt, planned_last):
            ts.setTimeStep(remaining)
            self.segment_end, self.uncut_step = tau + remaining, dt
        else:
            ts.setTimeStep(dt)
            self.segment_end = None
        self.retries = retried_steps(ts)

    def observe(self, ts, tau: float, u, last_output) -> None:
        """Before each evaluation of f: FSAL to tell (``last_output``: the Vec the previous evaluation
        wrote), the attempt's step size, the stage time."""
        if self.pending_fsal is not None:
            self._tell_fsal(tau, last_output)
        # PETSc retries a rejected step with a smaller size, with no hook in between: the size its
        # evaluations run with (as PETSc holds it) is the one the accepted attempt used
        self.step_size = ts.getTimeStep()
        self.evaluations += 1
        if self.record.stage_times is not None:
            address = vec_key(u)[0]
            self.record.stage_times.add(address, tau)
            self._stage_vecs.append(address)

    def discard_step(self) -> None:
        """Forget the stage times of the step in progress (PETSc rolled it back)."""
        for address in reversed(self._stage_vecs):
            self.record.stage_times.remove_last(address)
        self._stage_vecs = []

    def _tell_fsal(self, tau: float, last_output) -> None:
        """At the first evaluation after step ``k``: did step ``k + 1`` evaluate its first stage?

        An explicit RK step evaluates its first stage at its start time unless it reuses the last
        stage of step ``k`` (FSAL). Then that derivative is still in the Vec the last evaluation of
        step ``k`` wrote, and is kept for a step ``k + 1`` re-taken from the state after step ``k``.
        """
        step, start = self.pending_fsal
        self.pending_fsal = None
        self.record.fsal = tau != start
        if self.record.fsal:
            self.store.keep_derivative(step, vec_view(last_output))

    def after_step(self, ts) -> None:
        tau, record = ts.getTime(), self.record
        if not np.isfinite(ts.getSolution().norm()):
            self.nonfinite_at = tau
            ts.setConvergedReason(PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED)
            return
        record.step_times.append(tau)
        record.step_sizes.append(self.step_size)
        if self.dense is not None:
            self.dense.after_step(ts)
        if record.stage_times is not None:
            record.stage_times.step_ends.append(tau)
        if len(record.step_sizes) == 1 and retried_steps(ts) == self.retries:
            record.stages = self.evaluations
        at_output = self.segment_end is not None and same_time(tau, self.segment_end)
        step = ts.getStepNumber()
        if self.store is not None:
            if not at_output:
                self.store.offer(step, vec_view(ts.getSolution()))
            if self.explicit and record.fsal is not False and (at_output or step in self.store.states):
                self.pending_fsal = (step, tau)  # told by the next step's first evaluation
        if at_output:
            self._reached_output(ts, tau)

    def _reached_output(self, ts, tau: float) -> None:
        record = self.record
        record.step_of_output.append(ts.getStepNumber())
        record.outputs[len(record.step_of_output) - 1].copy_(vec_view(ts.getSolution()))
        self.segment_end = None
        next_output = len(record.step_of_output)
        if self.config.step_size is None and not self.config.adaptive:
            # A fixed-step method without step_size steps from output to output (torchdiffeq's grid).
            if next_output < len(record.taus):
                ts.setTimeStep(record.taus[next_output] - tau)
            return
        next_dt = ts.getTimeStep()
        # Like PETSc's own evaluation-time logic: a cut step that was not too large gives the step
        # size back that the controller (or the fixed step) had chosen.
        if next_dt >= tau - ts.getPrevTime():
            ts.setTimeStep(max(next_dt, self.uncut_step))
