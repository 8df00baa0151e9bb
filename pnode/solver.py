"""The solver: owns one PETSc TS (with its vectors and shell operators), runs forward and adjoint solves.

A :class:`Solver` is built once per (state size, parameter count, configuration, communicator) and
reused across calls, since training calls it thousands of times; the right-hand side is swapped in
per call. PETSc's time always increases: decreasing output times are handled by :class:`RHS`.

Output times are hit exactly: a pre-step hook shortens the step that would cross the next output
time, and restores the uncut step size afterwards (so adaptivity does not restart from a sliver).
The step number at which each output time is reached is recorded, so that the adjoint can run
TSAdjoint segment by segment and add each output's cotangent at its exact step.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ._compat import PETSc, converged_reason_name, has_revolve
from .bridge import PETSC_DTYPE, PETSC_EPS, tensor_into_vec, vec_key, vec_view, writable_view
from .errors import CallbackErrorTrap, InputError, SolverError
from .methods import Method
from .operators import ParamJacobianShell, RHSJacobianShell, create_shell
from .options import scoped_options
from .rhs import RHS, same_stage_time

# A step is stretched to the output time when it would stop short by less than this fraction of
# itself: avoids a spurious round-off-sized step (0.1 + 0.1 + ... falls 1e-16 short of 1.0 in
# float64, 1e-7 in a single-precision PETSc, whose times are float32).
_SLIVER = max(1e-8, 100 * PETSC_EPS)

# TS types whose adjoint uses the RHS parameter Jacobian dG/dp directly.
_RHS_FORM_ADJOINT_TYPES = ("rk", "euler", "ssp")


def _same_time(a: float, b: float) -> bool:
    """Whether two PETSc times are equal up to the round-off of PETSc's real type (a few ulps).

    PETSc adds a step to its time in its own real type; in a single-precision build that sum can
    differ from the same sum in Python's float64 by an ulp.
    """
    return abs(a - b) <= 4 * PETSC_EPS * max(1.0, abs(a), abs(b))


@dataclass(frozen=True)
class SolverConfig:
    """Everything that fixes how a TS is configured (hashable: it is part of the cache key).

    Times are in PETSc's (increasing) time units, i.e. absolute values of the user's steps.
    """

    method: Method
    rtol: float
    atol: float
    step_size: Optional[float] = None
    first_step: Optional[float] = None
    min_step: Optional[float] = None
    max_step: Optional[float] = None
    max_num_steps: int = 2**31 - 1
    petsc_options: Tuple[Tuple[str, str], ...] = ()
    prefix: str = ""

    @property
    def adaptive(self) -> bool:
        return self.method.adaptive and self.step_size is None

    def derived_options(self) -> Mapping[str, object]:
        """The PETSc options that express ``method`` and the step settings (lowest precedence)."""
        opts = {"ts_type": self.method.ts_type,
                "ts_adapt_type": "basic" if self.adaptive else "none",
                "ts_trajectory_type": "memory"}
        if self.method.rk_type is not None:
            opts["ts_rk_type"] = self.method.rk_type
        if self.method.theta is not None:
            opts["ts_theta_theta"] = self.method.theta
        # Newton-Krylov on shell Jacobians: no matrix entries, so no preconditioner by default.
        opts.update({"ksp_type": "gmres", "pc_type": "none", "snes_type": "newtonls"})
        return opts


def expected_steps(config: SolverConfig, taus: np.ndarray) -> Optional[int]:
    """Steps a fixed-step forward solve over the PETSc output times ``taus`` takes (None if adaptive).

    Mirrors :meth:`Solver._pre_step`: each output interval of length ``L`` takes full steps of
    ``step_size`` and one final step cut (or, within a sliver, stretched) to the output time;
    without ``step_size`` a fixed-step method steps from output time to output time.
    """
    if config.adaptive:
        return None
    if config.step_size is None:
        return len(taus) - 1
    lengths = np.diff(np.asarray(taus, dtype=np.float64))
    return int(sum(np.floor(length / config.step_size - _SLIVER) + 1 for length in lengths))


@dataclass
class ForwardRecord:
    """What one forward solve leaves for its adjoint.

    Attributes:
        taus: output times in PETSc time, increasing, shape ``(n_times,)``.
        step_of_output: TS step number at which each output time was reached (0 for the first).
        outputs: the solution at every output time, ``(n_times, local_size)``, PETSc dtype, CPU.
        step_times: PETSc time at the end of every accepted step, starting with ``taus[0]``.
        step_sizes: the size PETSc gave every accepted step (``step_times[k + 1]`` is PETSc's sum
            ``step_times[k] + step_sizes[k]``, rounded; the difference of the two times can be an
            ulp off, which a replay must not be), read while its accepted attempt evaluated f (a
            rejected attempt is retried with a smaller size and no hook in between).
        fsal: whether the method reuses a step's last stage derivative as the next step's first
            (dopri5, bosh3: "first same as last"), seen from the forward pass (None: it took too
            few steps to tell). A step re-taken from a checkpoint must then start from that
            derivative, not evaluate ``f`` at the state, to repeat the forward pass bit for bit
            (the checkpoint store keeps it with the state).
        stages: evaluations of f in the first step, which evaluates every stage (None if PETSc
            retried it: then it evaluated more): an FSAL method's re-taken step needs no graph of
            its last one.
    """

    taus: np.ndarray
    step_of_output: List[int] = field(default_factory=list)
    outputs: Optional[torch.Tensor] = None
    step_times: List[float] = field(default_factory=list)
    step_sizes: List[float] = field(default_factory=list)
    fsal: Optional[bool] = None
    stages: Optional[int] = None


class Solver:
    """One PETSc TS configured for a problem size, reused across forward and adjoint solves.

    Args:
        config: the method and step settings.
        local_size: number of state entries on this rank.
        param_size: number of parameter entries (adjoint_params) on this rank.
        comm: the PETSc communicator the state is distributed over.
        record: whether forward solves store a trajectory for TSAdjoint.
    """

    def __init__(self, config: SolverConfig, local_size: int, param_size: int, comm, record: bool):
        self.config = config
        self.comm = comm
        self.record = record
        self.param_size = param_size
        self.rhs: Optional[RHS] = None
        self.trap = CallbackErrorTrap()
        self.solution = PETSc.Vec().createMPI((local_size, PETSc.DECIDE), comm=comm)
        self.jacobian = create_shell(RHSJacobianShell(self.trap), local_size, local_size, comm)
        self.adjoint_state = self.solution.duplicate() if record else None
        self.param_gradient = None
        self.param_jacobian = None
        if record and param_size:
            self.param_gradient = PETSc.Vec().createMPI((param_size, PETSc.DECIDE), comm=comm)
            self.param_jacobian = create_shell(ParamJacobianShell(self.trap), local_size, param_size, comm)
        self.ts = self._create_ts()
        self._record: Optional[ForwardRecord] = None
        self._segment_end: Optional[float] = None
        self._uncut_step: Optional[float] = None
        self._nonfinite_at: Optional[float] = None
        self._forced_times: Optional[np.ndarray] = None
        self._forced_sizes: Optional[Sequence[float]] = None
        self._step_size: Optional[float] = None  # the size of the step's current attempt, as PETSc holds it
        self._retries = 0  # PETSc's count of retried steps when this step began
        self._last_output = None  # the Vec the latest evaluation of f was written into
        self._pending_fsal: Optional[Tuple[int, float]] = None  # (step, its end time): FSAL still to tell
        self._first_derivative: Optional[torch.Tensor] = None  # a replay's first stage derivative
        # the times f was evaluated at in the forward pass, by the address of the stage Vec
        self._stage_times: Dict[int, List[float]] = {}
        self._sorted_stage_times: Optional[Dict[object, np.ndarray]] = None
        self._in_adjoint = False
        self._evaluations_in_step = 0
        self._graph_stages: Optional[int] = None
        self._store = None
        self._graphs: Optional[List] = None
        self._graph_limit: Optional[int] = None
        self._has_trajectory = record

    # ------------------------------------------------------------------ set-up
    def _create_ts(self):
        cfg = self.config
        ts = PETSc.TS().create(comm=self.comm)
        ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
        ts.setRHSFunction(self._rhs_function, None)  # explicit RK writes its stages; others get one made when needed
        ts.setRHSJacobian(self._rhs_jacobian, self.jacobian, self.jacobian)
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setTolerances(rtol=cfg.rtol, atol=cfg.atol)
        ts.setMaxSteps(cfg.max_num_steps)
        ts.setErrorIfStepFails(False)
        ts.setPreStep(self._pre_step)
        ts.setPostStep(self._post_step)
        if cfg.adaptive and (cfg.min_step is not None or cfg.max_step is not None):
            ts.setStepLimits(cfg.min_step or 0.0, cfg.max_step or PETSc.INFINITY)
        if self.record:
            ts.setSaveTrajectory()
        if cfg.prefix:
            ts.setOptionsPrefix(cfg.prefix)
        user = dict(cfg.petsc_options)
        with scoped_options(cfg.prefix, user, cfg.derived_options()) as user_names:
            if self.record:
                _check_revolve(cfg.prefix)
            ts.setFromOptions()
            _check_used(user_names)
        if self.param_jacobian is not None:
            # Explicit RK adjoints read dG/dp of the right-hand side; implicit ones (theta, cn,
            # beuler, ...) read dF/dp of F(udot, u) = udot - G(u), i.e. -dG/dp. Handing implicit
            # types the RHS form would make PETSc zero and AXPY into a copy of the shell.
            if ts.getType() in _RHS_FORM_ADJOINT_TYPES:
                ts.setRHSJacobianP(self._param_jacobian, self.param_jacobian)
            else:
                ts.setIJacobianP(self._param_ijacobian, self.param_jacobian)
        return ts

    def _renew_trajectory(self) -> None:
        """Give the TS a new trajectory, set up by the recording solve that follows.

        PETSc's memory trajectory sizes itself for the first solve it records (with fixed steps:
        from that solve's span and first step) and keeps its stack from one solve to the next. A
        later, longer solve on the same pooled TS (a longer span, or a checkpointing TS that
        recorded one step before) overran it, and reusing it after an adjoint run output interval
        by output interval left its stack inconsistent: PETSc crashed, at the latest when the TS was
        destroyed. A new trajectory costs ~0.03 ms (re-reading the options restores its type and
        settings) plus the allocation of its vectors, a small part of a training step
        (scripts/bench_memory.py).
        """
        cfg = self.config
        self.ts.removeTrajectory()
        self.ts.setSaveTrajectory()
        with scoped_options(cfg.prefix, dict(cfg.petsc_options), cfg.derived_options()):
            self.ts.setFromOptions()
        self._has_trajectory = True

    @property
    def ts_type(self) -> str:
        return self.ts.getType()

    @property
    def explicit(self) -> bool:
        """Whether each step is explicit (its RHS evaluations are exactly the adjoint's stage points)."""
        return self.ts_type in _RHS_FORM_ADJOINT_TYPES

    def detach(self) -> None:
        """Forget this call once it is over: its right-hand side and linearizations (their graphs hold
        the user's tensors), its forward record (a copy of every output) and its trajectory (every
        stored step), so that a pooled solver holds only its PETSc work vectors between calls."""
        self.rhs = None
        self._graphs = None
        self._record = None
        self._stage_times, self._sorted_stage_times = {}, None
        if self._has_trajectory:
            self.ts.removeTrajectory()  # the next recording solve makes a new one anyway
            self._has_trajectory = False
        self.jacobian.getPythonContext().linearization = None
        if self.param_jacobian is not None:
            self.param_jacobian.getPythonContext().linearization = None

    def drop_graphs(self) -> None:
        """Free the graphs kept by ``replay(..., keep_graphs=...)``."""
        self._graphs = None

    # ------------------------------------------------------------------ callbacks
    def _rhs_function(self, ts, tau, u, f):
        def run():
            if self._pending_fsal is not None:
                self._tell_fsal(tau)
            if self._forced_times is None:
                # PETSc retries a rejected step with a smaller size, with no hook in between: the
                # size its evaluations run with (as PETSc holds it) is the one the accepted attempt used
                self._step_size = ts.getTimeStep()
                if self.record:  # only an adjoint looks these up (_forward_time)
                    self._stage_times.setdefault(vec_key(u)[0], []).append(tau)
                    self._sorted_stage_times = None
            given, self._first_derivative = self._first_derivative, None
            stage, self._evaluations_in_step = self._evaluations_in_step, self._evaluations_in_step + 1
            if self._graphs is None or (self._graph_stages is not None and stage >= self._graph_stages):
                tensor_into_vec(self.rhs.evaluate(tau, vec_view(u)) if given is None else given, f)
            else:
                if self._graph_limit is not None and len(self._graphs) >= self._graph_limit:
                    self._graphs.pop(0)  # before the new graph is built: at most the limit at once
                value, lin = self.rhs.evaluate_linearized(tau, vec_view(u), vec_key(u))
                self._graphs.append(lin)  # the adjoint linearises f at this stage all the same
                tensor_into_vec(value if given is None else given, f)
            self._last_output = f
        self.trap.call(run)

    def _tell_fsal(self, tau: float) -> None:
        """At the first evaluation after step ``k``: did step ``k + 1`` evaluate its first stage?

        An explicit RK step evaluates its first stage at its start time unless it reuses the last
        stage of step ``k`` (FSAL). Then that derivative is still in the Vec the last evaluation of
        step ``k`` wrote, and is kept for a step ``k + 1`` re-taken from the state after step ``k``.
        """
        step, start = self._pending_fsal
        self._pending_fsal = None
        self._record.fsal = tau != start
        if self._record.fsal:
            self._store.keep_derivative(step, vec_view(self._last_output))

    def last_derivative(self) -> torch.Tensor:
        """A view of the latest evaluation of f (the last stage of the last step); valid until the next solve."""
        return vec_view(self._last_output)

    def _linearization_at(self, tau: float, u):
        """A linearization of f at ``(tau, u)`` (``u`` a Vec): the current one, a kept stage graph, or a new one."""
        candidates = [self.jacobian.getPythonContext().linearization, *(self._graphs or ())]
        key, view = vec_key(u), vec_view(u)
        for lin in candidates:
            if self.rhs.matches(lin, tau, view, key):
                return lin
        if self._in_adjoint:
            tau = self._forward_time(tau, key[0])
        return self.rhs.linearize(tau, view, key, single_vjp=self.explicit)

    def _forward_time(self, tau: float, address: int) -> float:
        """The forward pass's time for the adjoint's stage time ``tau`` at the stage Vec at ``address``.

        PETSc's RK adjoint recomputes a stage time as ``t_end - (1 - c_i) h``, which can round an
        ulp away from the forward's ``t + c_i h``; f is linearised at the time it was evaluated at,
        so that a time-dependent f gets the same gradient from a stored and from a re-taken step.
        The times evaluated at the same stage Vec come first (two stages can lie an ulp apart:
        dopri5's two with c = 1 in a float32 PETSc), then the step starts (an FSAL step's first
        stage, which reused the previous step's last evaluation, was evaluated at none: a re-taken
        step evaluates it at its start), then any forward time.
        """
        if self._sorted_stage_times is None:
            every = [t for times in self._stage_times.values() for t in times]
            steps = list(self._record.step_times) if self._record is not None else []
            self._sorted_stage_times = {key: np.unique(np.asarray(times, dtype=np.float64)) for key, times in
                                        [*self._stage_times.items(), ("steps", steps), ("every", every)]}
        for key in (address, "steps", "every"):
            nearest = _nearest(self._sorted_stage_times.get(key), tau)
            if nearest is not None and same_stage_time(nearest, tau):
                return nearest
        return tau

    def _rhs_jacobian(self, ts, tau, u, jac, pre):
        def run():
            self.jacobian.getPythonContext().reset(self._linearization_at(tau, u))
        self.trap.call(run)

    def _param_jacobian(self, ts, tau, u, jac_p):
        def run():
            self.param_jacobian.getPythonContext().reset(self._linearization_at(tau, u))
        self.trap.call(run)

    def _param_ijacobian(self, ts, tau, u, udot, shift, jac_p):
        self._param_jacobian(ts, tau, u, jac_p)
        self.param_jacobian.getPythonContext().scale(jac_p, -1.0)

    def _pre_step(self, ts):
        self._evaluations_in_step = 0
        if self._forced_times is not None:
            self.trap.call(self._force_next_step, ts)
            return
        tau, dt = ts.getTime(), ts.getTimeStep()
        if self.config.step_size is not None and not self.config.adaptive:
            # Steps of exactly step_size, the last one of an interval cut (torchdiffeq's grid).
            # PETSc would instead split the last two steps before its final time evenly.
            dt = self.config.step_size
        target = self._record.taus[len(self._record.step_of_output)]
        remaining = target - tau
        if dt >= remaining or remaining - dt < _SLIVER * dt:
            ts.setTimeStep(remaining)
            self._segment_end = tau + remaining
            self._uncut_step = dt
        else:
            ts.setTimeStep(dt)
            self._segment_end = None
        self._retries = retried_steps(ts)

    def _force_next_step(self, ts) -> None:
        """Replay: give the next step its recorded size, which repeats it bit for bit (or stop: it took more steps)."""
        following = ts.getStepNumber() + 1
        if following >= len(self._forced_times):
            raise self._replay_mismatch(following)
        ts.setTimeStep(self._forced_sizes[following - 1])

    def _replay_mismatch(self, steps_taken: int) -> SolverError:
        return SolverError(f"recomputing {len(self._forced_times) - 1} recorded steps took {steps_taken} "
                           f"({converged_reason_name(self.ts.getConvergedReason())}): the right-hand side is "
                           "not deterministic, so checkpointing cannot reproduce the forward pass",
                           t_reached=self.rhs.direction * self.ts.getTime(), reason="REPLAY_MISMATCH")

    def _post_step(self, ts):
        if self._forced_times is not None:
            return  # a replay repeats checked steps; replay() checks the state it ends with
        tau = ts.getTime()
        if not np.isfinite(ts.getSolution().norm()):
            self._nonfinite_at = tau
            ts.setConvergedReason(PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED)
            return
        self._record.step_times.append(tau)
        self._record.step_sizes.append(self._step_size)
        if len(self._record.step_sizes) == 1 and retried_steps(ts) == self._retries:
            self._record.stages = self._evaluations_in_step
        at_output = self._segment_end is not None and _same_time(tau, self._segment_end)
        if self._store is not None and not at_output:
            self._store.offer(ts.getStepNumber(), vec_view(ts.getSolution()))
        if self._store is not None and self.explicit and self._record.fsal is not False and (
                at_output or ts.getStepNumber() in self._store.states):
            self._pending_fsal = (ts.getStepNumber(), tau)  # told by the next step's first evaluation
        if at_output:
            record = self._record
            record.step_of_output.append(ts.getStepNumber())
            record.outputs[len(record.step_of_output) - 1].copy_(vec_view(ts.getSolution()))
            self._segment_end = None
            next_output = len(record.step_of_output)
            if self.config.step_size is None and not self.config.adaptive:
                # A fixed-step method without step_size steps from output to output (torchdiffeq's grid).
                if next_output < len(record.taus):
                    ts.setTimeStep(record.taus[next_output] - tau)
                return
            next_dt = ts.getTimeStep()
            # Like PETSc's own evaluation-time logic: a cut step that was not too large gives
            # the step size back that the controller (or the fixed step) had chosen.
            if next_dt >= tau - ts.getPrevTime():
                ts.setTimeStep(max(next_dt, self._uncut_step))

    # ------------------------------------------------------------------ forward
    def _use(self, rhs: RHS) -> None:
        self.rhs = rhs
        if self.param_jacobian is not None:
            self.param_jacobian.getPythonContext().param_numels = tuple(p.numel() for p in rhs.params)

    def replay(self, rhs: RHS, times: np.ndarray, y_start: torch.Tensor, sizes: Sequence[float],
               keep_graphs: Optional[int] = 0, copy: bool = True, trajectory: Optional[bool] = None,
               first_derivative: Optional[torch.Tensor] = None, graph_stages: Optional[int] = None) -> torch.Tensor:
        """Take exactly the steps ``times[0] -> times[1] -> ...`` (PETSc time) from ``y_start``.

        Used by checkpointing to recompute recorded steps: the same step sizes from the same
        state repeat the original arithmetic, so an adaptive controller accepts every step again.
        ``sizes``: the recorded size of each step (:attr:`ForwardRecord.step_sizes`, ``len(times) - 1``
        of them; the difference of two recorded times can be an ulp off). ``first_derivative``: for
        an FSAL method, the derivative the original first step started from
        (:attr:`pnode.checkpoint.CheckpointStore.derivatives`); the replay's first evaluation writes it instead
        of ``f`` at ``y_start`` (still building that stage's graph when graphs are kept).
        ``graph_stages``: keep graphs of the first ``graph_stages`` evaluations of each step only
        (an FSAL method's adjoint never linearises its last stage).
        With a trajectory (``trajectory``, default: ``record``) the steps are left in it for
        :meth:`adjoint_steps`.
        With ``keep_graphs`` (explicit methods), evaluations keep their graphs until
        :meth:`drop_graphs`, so the adjoint of these steps reuses them instead of re-evaluating:
        ``None`` keeps every graph, ``n > 0`` the last ``n`` (each new one drops the oldest; the
        adjoint reverses the stages last to first, so it uses those first), 0 none.

        Returns:
            the state at ``times[-1]`` (PETSc dtype, CPU): a copy, or with ``copy=False`` a view
            of this solver's solution Vec, valid until its next solve.
        """
        self._use(rhs)
        self._graphs = [] if keep_graphs != 0 and self.explicit else None
        self._graph_limit = keep_graphs
        self._forced_times = times
        self._forced_sizes = sizes
        self._first_derivative = first_derivative
        self._graph_stages = graph_stages
        try:
            self._solve(y_start, float(times[0]), float(times[-1]), float(times[1] - times[0]), "recomputation",
                        self.record if trajectory is None else trajectory)
            if self.ts.getStepNumber() != len(times) - 1:
                raise self._replay_mismatch(self.ts.getStepNumber())
            if not np.isfinite(self.solution.norm()):
                raise self._nonfinite_error(self.ts.getTime())
        finally:
            self._forced_times = self._forced_sizes = self._first_derivative = self._graph_stages = None
        return vec_view(self.solution).clone() if copy else vec_view(self.solution)

    def forward(self, rhs: RHS, taus: np.ndarray, y0: torch.Tensor, store=None,
                trajectory: Optional[bool] = None) -> ForwardRecord:
        """Integrate from ``taus[0]`` through every output time.

        Args:
            rhs: the right-hand side for this call.
            taus: strictly increasing PETSc output times, ``(n_times,)`` float64.
            y0: initial state, flat, PETSc dtype, CPU, ``(local_size,)``.
            store: a :class:`pnode.checkpoint.CheckpointStore` offered the state after every step
                that is not an output time (checkpointing without a trajectory), or None.
            trajectory: whether to record the trajectory (default: ``record``); a checkpointed
                solve runs its forward pass without one on a solver that can record.

        Returns:
            the :class:`ForwardRecord` (outputs ``(n_times, local_size)``).
        """
        self._use(rhs)
        record = ForwardRecord(taus=taus, step_of_output=[0], step_times=[float(taus[0])])
        record.outputs = torch.empty((len(taus), y0.numel()), dtype=PETSC_DTYPE)
        record.outputs[0].copy_(y0)
        self._record = record
        if len(taus) == 1:
            return record
        self._store = store
        self._pending_fsal = None
        self._stage_times, self._sorted_stage_times = {}, None
        try:
            self._solve(y0, float(taus[0]), float(taus[-1]), self._first_step(rhs, taus, y0), "forward",
                        self.record if trajectory is None else trajectory)
        finally:
            self._store = self._pending_fsal = None
        self._check_forward(record)
        return record

    def _solve(self, y_start: torch.Tensor, t_start: float, t_end: float, first_step: float, phase: str,
               trajectory: bool) -> None:
        """Integrate from ``y_start`` at ``t_start`` to ``t_end`` (PETSc time), recording the
        trajectory or not (a recording solve gets a new one, see :meth:`_renew_trajectory`)."""
        if trajectory and not self.record:
            raise ValueError("this solver was built without adjoint vectors (record=False): it cannot record")
        if trajectory:
            self._renew_trajectory()
        elif self._has_trajectory:
            self.ts.removeTrajectory()  # a solve that checkpointing reverses keeps no trajectory
            self._has_trajectory = False
        if not _views(y_start, self.solution):  # a replay may start from the solution it left
            tensor_into_vec(y_start, self.solution)
        ts = self.ts
        ts.setTime(t_start)
        ts.setStepNumber(0)
        ts.setMaxTime(t_end)
        ts.setTimeStep(first_step)
        self._nonfinite_at = None
        self._run(lambda: ts.solve(self.solution), phase)

    def _first_step(self, rhs: RHS, taus: np.ndarray, y0: torch.Tensor) -> float:
        cfg = self.config
        if cfg.step_size is not None:
            return cfg.step_size
        if not cfg.adaptive:
            return float(taus[1] - taus[0])
        if cfg.first_step is not None:
            return cfg.first_step
        return self._select_initial_step(rhs, taus, y0)

    def _select_initial_step(self, rhs: RHS, taus: np.ndarray, y0: torch.Tensor) -> float:
        """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4), in PETSc's weighted RMS norm.

        ``y0``: the initial state, flat, PETSc dtype, CPU.
        """
        cfg = self.config
        tau0 = float(taus[0])
        scale = cfg.atol + cfg.rtol * y0.abs()
        f0 = rhs.evaluate(tau0, y0).to(PETSC_DTYPE).cpu()
        d0, d1 = self._rms(y0 / scale), self._rms(f0 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, float(taus[-1] - tau0))
        f1 = rhs.evaluate(tau0 + h0, y0 + h0 * f0).to(PETSC_DTYPE).cpu()
        d2 = self._rms((f1 - f0) / scale) / h0
        order = cfg.method.order
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        return min(100 * h0, h1, float(taus[-1] - tau0))

    def _rms(self, x: torch.Tensor) -> float:
        local = np.array([float(torch.sum(x * x)), float(x.numel())])
        if self.comm.getSize() > 1:
            local = self.comm.tompi4py().allreduce(local)
        return float(np.sqrt(local[0] / local[1]))

    def _check_forward(self, record: ForwardRecord) -> None:
        reached = len(record.step_of_output)
        if reached == len(record.taus):
            return
        tau = self.ts.getTime()
        t_user = self.rhs.direction * tau
        if self._nonfinite_at is not None:
            raise self._nonfinite_error(self._nonfinite_at)
        reason = self.ts.getConvergedReason()
        name = converged_reason_name(reason)
        if reason < 0:
            hint = {"DIVERGED_STEP_REJECTED": "the step size fell below what the tolerances allow; "
                    "the problem may be stiff (try method='cn' or 'beuler'), or loosen rtol/atol",
                    "DIVERGED_NONLINEAR_SOLVE": "Newton failed to converge; try a smaller step_size, "
                    "or tune it with options={'snes_max_it': ..., 'ksp_max_it': ...}"}.get(
                name, "see PETSc's -ts_monitor/-ts_adapt_monitor output for details")
            raise SolverError(f"the solve stopped at t={t_user:.6g} after {self.ts.getStepNumber()} steps "
                              f"({name}): {hint}", t_reached=t_user, reason=name)
        raise SolverError(f"the solve stopped at t={t_user:.6g} after {self.ts.getStepNumber()} steps "
                          f"({name}) before reaching the last output time "
                          f"{self.rhs.direction * record.taus[-1]:.6g}: raise options['max_num_steps'] "
                          "(or -ts_max_steps), or loosen rtol/atol", t_reached=t_user, reason=name)

    def _nonfinite_error(self, tau: float) -> SolverError:
        t_user = self.rhs.direction * tau
        return SolverError(
            f"the solution became non-finite (NaN/inf) after t={t_user:.6g} (step {self.ts.getStepNumber()}); "
            "the ODE may blow up in finite time, or the steps are too large for it: try smaller "
            "options['step_size'], an adaptive method ('dopri5'), or an implicit one ('cn', 'beuler')",
            t_reached=t_user, reason="NONFINITE_STATE")

    # ------------------------------------------------------------------ adjoint
    def begin_adjoint(self, cotangent: torch.Tensor) -> None:
        """Start an adjoint pass: ``lambda = cotangent`` (flat, PETSc dtype), parameter gradient zero."""
        tensor_into_vec(cotangent, self.adjoint_state)
        if self.param_gradient is not None:
            self.param_gradient.zeroEntries()
            self.ts.setCostGradients(self.adjoint_state, self.param_gradient)
        else:
            self.ts.setCostGradients(self.adjoint_state)

    def adjoint_steps(self, steps: int) -> None:
        """Run TSAdjoint back over the last ``steps`` recorded steps (accumulating into lambda and mu)."""
        if steps <= 0:
            return
        self.ts.adjointSetSteps(steps)
        # An implicit adjoint step solves a transposed linear system; a Krylov solve that does not
        # converge would leave a silently wrong gradient, so make it an error for the adjoint only
        # (inexact Newton in the forward pass tolerates it).
        ksp = None if self.explicit else self.ts.getSNES().getKSP()
        if ksp is not None:
            ksp.setErrorIfNotConverged(True)
        self._in_adjoint = True
        try:
            self._run(self.ts.adjointSolve, "adjoint")
        finally:
            self._in_adjoint = False
            if ksp is not None:
                ksp.setErrorIfNotConverged(False)

    def add_to_adjoint_state(self, cotangent: torch.Tensor) -> None:
        writable_view(self.adjoint_state).add_(cotangent)

    def adjoint_state_tensor(self) -> torch.Tensor:
        return vec_view(self.adjoint_state).clone()

    def param_gradient_tensor(self) -> Optional[torch.Tensor]:
        return None if self.param_gradient is None else vec_view(self.param_gradient).clone()

    def adjoint(self, grad_outputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Run TSAdjoint back through the steps of the last :meth:`forward`.

        Args:
            grad_outputs: ``dL/d outputs``, ``(n_times, local_size)``, PETSc dtype, CPU.

        Returns:
            ``(grad_y0, adjoint_before_first_output, grad_params)``: the state cotangent at the
            first output time with and without that output's own cotangent (the latter gives the
            gradient w.r.t. ``t[0]``), and the local parameter gradient ``(param_size,)`` or None.
        """
        record = self._record
        if record is None:
            raise SolverError("backward called twice on the same solve; run the forward pass again "
                              "(pnode frees the trajectory after backward)")
        self.begin_adjoint(grad_outputs[-1])
        for i in range(len(record.taus) - 1, 0, -1):
            self.adjoint_steps(record.step_of_output[i] - record.step_of_output[i - 1])
            if i > 1:
                self.add_to_adjoint_state(grad_outputs[i - 1])
        before_first = self.adjoint_state_tensor()
        self._record = None
        return before_first + grad_outputs[0], before_first, self.param_gradient_tensor()

    # ------------------------------------------------------------------ errors
    def _run(self, call, phase: str) -> None:
        try:
            call()
        except PETSc.Error as exc:
            original = self.trap.pop()
            if original is not None:
                raise original.with_traceback(original.__traceback__) from None
            tau = self.ts.getTime()
            if "not-a-number" in str(exc):
                raise self._nonfinite_error(tau) from None
            hint = ("Run with -ts_monitor -ts_adapt_monitor -snes_converged_reason to see where."
                    if phase != "adjoint" or self.explicit else
                    "The adjoint's transposed linear solve (GMRES, no preconditioner) did not converge: "
                    "loosen ksp_rtol, raise ksp_max_it/ksp_gmres_restart, or take smaller steps; "
                    "-ksp_converged_reason shows each solve.")
            raise SolverError(f"PETSc failed in the {phase} solve at t={self.rhs.direction * tau:.6g}: {exc}. {hint}",
                              t_reached=self.rhs.direction * tau, reason=f"PETSC_ERROR_{exc.ierr}") from None
        error = self.trap.pop()
        if error is not None:
            raise error


def _nearest(sorted_times: Optional[np.ndarray], tau: float) -> Optional[float]:
    """The entry of ``sorted_times`` nearest to ``tau`` (None when there is none)."""
    if sorted_times is None or not len(sorted_times):
        return None
    i = int(np.searchsorted(sorted_times, tau))
    return float(min(sorted_times[max(i - 1, 0):i + 1], key=lambda x: abs(x - tau)))


def retried_steps(ts) -> int:
    """Steps PETSc has retried so far: rejected by the step-size controller, or by a failed nonlinear solve."""
    return ts.getStepRejections() + ts.getSNESFailures()


def _views(tensor: torch.Tensor, vec) -> bool:
    """Whether ``tensor`` is the whole local part of ``vec`` in place (same memory, dtype and size)."""
    view = vec_view(vec)
    return (tensor.device.type == "cpu" and tensor.dtype == view.dtype and tensor.numel() == view.numel()
            and tensor.data_ptr() == view.data_ptr())


def _check_used(names) -> None:
    db = PETSc.Options()
    used = getattr(db, "used", None)
    if used is None:
        return
    unused = [n for n in names if not used(n)]
    if unused:
        raise InputError(f"options {unused} were not used by PETSc: they are neither pnode options "
                         "(step_size, first_step, min_step, max_step, max_num_steps, theta, checkpoints, "
                         "checkpoint_graphs) nor PETSc options this solver reads; check the spelling (PETSc names are "
                         "e.g. 'ts_trajectory_type', 'ksp_rtol', 'snes_max_it')")


def _check_revolve(prefix: str) -> None:
    """Refuse PETSc's limited-memory trajectory up front on a build without Revolve (it fails mid-solve)."""
    db = PETSc.Options()
    asked = [prefix + name for name in ("ts_trajectory_max_cps_ram", "ts_trajectory_max_cps_disk")
             if db.hasName(prefix + name)]
    if asked and not has_revolve():
        raise InputError(f"-{asked[0]} needs PETSc configured with Revolve, which this PETSc lacks; use pnode's "
                         "own checkpointing instead: options={'checkpoints': K} or -pnode_checkpoints K "
                         "(at most K states held, binomial schedule, same gradients)")
