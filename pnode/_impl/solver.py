"""The solver: a thin driver that owns one PETSc TS, its vectors and shell operators.

A :class:`Solver` is built once per (state size, parameter count, configuration, communicator) and
reused across calls, since training calls it thousands of times. It holds no mode: each solve
carries a :class:`Call` (its step schedule, its evaluator and its linearizer, see
:mod:`pnode._impl.schedule` and :mod:`pnode._impl.evaluation`), which PETSc's callbacks consult while that
solve runs. What a forward pass or a replay should do travels as a value (:class:`ForwardPlan`,
:class:`Replay`); the strategies of :mod:`pnode._impl.strategies` decide which.

PETSc's time always increases: decreasing output times are handled by :class:`pnode._impl.rhs.RHS`.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from .._compat import (
    PETSC_ERR_PYTHON,
    PETSc,
    converged_reason_name,
    post_evaluate_type,
    set_max_time,
    set_post_evaluate,
)
from .bridge import (
    CPU,
    cached_views,
    check_vec_device,
    create_vec,
    petsc_dtype,
    place_operator,
    tensor_into_vec,
    vec_view,
    writable_view,
)
from .config import SolverConfig
from .errors import CallbackErrorTrap, SolverError
from .evaluation import Evaluator, GraphStore, Linearizer, StageTimes
from .failures import check_forward, nonfinite_error, petsc_failure
from .hints import watch_steps
from .methods import steps_explicitly
from .operators import ParamJacobianShell, RHSJacobianShell, create_shell
from .rhs import RHS
from .rk_adjoint import ParamGradientSum
from .schedule import ForwardRecord, NoSteps, OutputSchedule, ReplaySchedule, Schedule, StateStore, StepObserver
from .ts_setup import accepting_every_step, configure_ts, renew_trajectory, starting_step


class EventStop(Protocol):
    """What a forward solve that ends at an event asks of its event watch (:mod:`pnode._impl.event_search`).

    Attributes:
        tau_max: the PETSc time the search may run to (``inf``: no limit).
    """

    tau_max: float

    def start(self, rhs: RHS, tau0: float, y0: torch.Tensor) -> None:
        """The initial point (flat, PETSc dtype, the solver's device): where the event functions' signs begin."""

    def crossed(self, rhs: RHS, tau: float, u: torch.Tensor) -> bool:
        """Whether the step that has just ended at ``(tau, u)`` crossed an event (it is then rolled back)."""

    def locate(self, rhs: RHS, base_tau: float, base_state: torch.Tensor) -> float:
        """The length of the step from the base (where the crossing step started) to the event."""

    def not_found(self, ts, rhs: RHS) -> SolverError:
        """The error of a search that ended (at ``tau_max`` or its step limit) without an event."""


@dataclass(frozen=True)
class Span:
    """What one forward solve covers and how it starts (per call; the solver is shared by many).

    Attributes:
        taus: strictly increasing PETSc output times, ``(n_times,)`` float64; with ``event``,
            ``[tau0, event.tau_max]``.
        first_step: the first step's size, instead of the configured or estimated one (an
            integration continued past a jump keeps the size its controller had reached), or None.
        tolerances: per-entry ``(rtol, atol)`` of this call (flat, PETSc dtype, any device), for a
            solver configured with vector tolerances; None for scalar ones (the configuration's).
        event: the event that ends the solve, or None.
    """

    taus: np.ndarray
    first_step: Optional[float] = None
    tolerances: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    event: Optional[EventStop] = None


@dataclass
class Call:
    """What PETSc's callbacks do during one solve: ``schedule`` steps, ``evaluator`` evaluates f,
    ``linearizer`` gives the Jacobian shells their linearization; ``phase`` names it in errors;
    ``event``: a forward solve stops at the first step that crosses an event and rolls it back."""

    schedule: Schedule
    evaluator: Optional[Evaluator]
    linearizer: Linearizer
    phase: str
    event: Optional[EventStop] = None


@dataclass(frozen=True)
class ForwardPlan:
    """How a forward pass runs.

    Attributes:
        trajectory: record PETSc's trajectory for TSAdjoint (False: none, e.g. checkpointing).
        solution_only: the trajectory keeps states only; PETSc re-takes a step to recover its
            stages in the adjoint (served by the kept graphs' outputs, see ``graphs``).
        store: a :class:`pnode._impl.checkpoint.CheckpointStore` offered the states, or None.
        graphs: keep every stage evaluation's graph here for the adjoint (explicit methods).
        graphs_from_step: keep the graphs of this step and later ones only (0: every step).
        adjoint: an adjoint will run (stage times are recorded for it).
        dense: a :class:`pnode._impl.dense.DenseRecorder` told every accepted step, or None.
    """

    trajectory: bool = False
    solution_only: bool = False
    store: Optional[StateStore] = None
    graphs: Optional[GraphStore] = None
    graphs_from_step: int = 0
    adjoint: bool = False
    dense: Optional[StepObserver] = None


@dataclass(frozen=True)
class Replay:
    """Re-take recorded steps ``times[0] -> times[1] -> ...`` (PETSc time) from a state.

    Attributes:
        times: the recorded step ends, from the start state's time (``len(sizes) + 1`` of them).
        sizes: the recorded size of each step (:attr:`ForwardRecord.step_sizes`).
        first_derivative: for an FSAL method, the derivative the original first step reused.
        graphs: keep the re-taken stages' graphs here for the adjoint (None: no graph).
        graph_stages: keep graphs of each step's first ``graph_stages`` evaluations only.
        trajectory: record the steps for :meth:`Solver.adjoint_steps`.
        accept_all: the adaptor accepts every step whatever its error estimate (steps of sizes
            chosen elsewhere, not recorded ones). A recorded explicit step is accepted again anyway
            (a rejection there means a right-hand side that is not deterministic); a recorded
            implicit step is always accepted (see :func:`pnode._impl.ts_setup.accepting_every_step`).
    """

    times: np.ndarray
    sizes: Sequence[float]
    first_derivative: Optional[torch.Tensor] = None
    graphs: Optional[GraphStore] = None
    graph_stages: Optional[int] = None
    trajectory: bool = False
    accept_all: bool = False


class Solver:
    """One PETSc TS configured for a problem size, reused across forward and adjoint solves.

    Args:
        config: the method and step settings.
        local_size: number of state entries on this rank.
        param_size: number of parameter entries (adjoint_params) on this rank.
        comm: the PETSc communicator the state is distributed over.
        record: whether the solver has adjoint vectors (forward solves can be differentiated).
        device: where every PETSc vector of its solves lives (:func:`pnode._impl.bridge.vec_device`): the
            host, or the state's GPU (PETSc's TS work vectors, trajectory and Krylov vectors are
            duplicates of these, so they live there too).

    Tensors it takes and gives in PETSc's layout (flat states, cotangents, outputs) are of PETSc's
    dtype on ``device``.
    """

    # every attribute a solver has, written by its own methods only (see tests/test_house.py)
    __slots__ = ("config", "comm", "record", "local_size", "param_size", "device", "trap", "solution", "jacobian",
                 "adjoint_state", "param_gradient", "param_jacobian", "_jacobian_ops", "_param_ops", "_param_sum",
                 "_param_product", "_pnode_sums_mu",
                 "tolerance_vectors", "ts", "resolved_options", "form", "explicit", "rhs", "_call", "_last_evaluator",
                 "_has_trajectory", "__weakref__")

    def __init__(self, config: SolverConfig, local_size: int, param_size: int, comm, record: bool,
                 device: torch.device = CPU):
        self.config = config
        self.comm = comm
        self.record = record
        self.local_size = local_size
        self.param_size = param_size
        self.device = device
        self.trap = CallbackErrorTrap()
        self.solution = create_vec(local_size, comm, device)
        if device != CPU:
            check_vec_device(self.solution, device)
        # the shells' Python contexts, kept: PETSc's Jacobian callbacks point them once per stage
        self._jacobian_ops = RHSJacobianShell(self.trap)
        self.jacobian = create_shell(self._jacobian_ops, local_size, local_size, comm)
        place_operator(self.jacobian, device)
        self.adjoint_state = self.solution.duplicate() if record else None
        self.param_gradient = self.param_jacobian = self._param_ops = self._param_sum = self._param_product = None
        self._pnode_sums_mu: Optional[bool] = None  # whether the last adjoint pass summed mu itself (rk_adjoint)
        if record and param_size:
            self.param_gradient = create_vec(param_size, comm, device)
            self._param_product = self.param_gradient.duplicate()  # an RK stage's J_p^T w (rk_adjoint)
            self._param_ops = ParamJacobianShell(self.trap)
            self.param_jacobian = create_shell(self._param_ops, local_size, param_size, comm)
            place_operator(self.param_jacobian, device)
        self.tolerance_vectors = None
        if config.vector_tolerances:  # (rtol, atol), filled per call: TSSetTolerances cannot drop them again
            self.tolerance_vectors = (self.solution.duplicate(), self.solution.duplicate())
        # form: how f reaches the TS (pnode._impl.formulation)
        self.ts, self.resolved_options, self.form = configure_ts(self, config, record)
        self.explicit = steps_explicitly(self.ts.getType())
        self.rhs: Optional[RHS] = None
        self._call: Optional[Call] = None
        self._last_evaluator: Optional[Evaluator] = None
        self._has_trajectory = record

    @property
    def ts_type(self) -> str:
        return self.ts.getType()

    @property
    def held_bytes(self) -> int:
        """Bytes of PETSc vectors this solver holds between calls (an estimate: its work vectors)."""
        item = np.dtype(PETSc.ScalarType).itemsize  # global sizes: every rank evicts alike
        return item * (self.solution.getSize() * work_vectors(self.config, self.record) + 2 * self.param_size)

    def destroy(self) -> None:
        """Free this solver's PETSc objects (it is unusable afterwards; a second call does nothing)."""
        if self.ts.handle == 0:
            return
        self.detach()
        for obj in (self.ts, self.jacobian, self.param_jacobian, self.solution, self.adjoint_state,
                    self.param_gradient, self._param_product, *(self.tolerance_vectors or ())):
            if obj is not None:
                obj.destroy()
        self.form.destroy()

    def detach(self) -> None:
        """Forget the last call: its right-hand side (whose graphs hold the user's tensors) and its
        trajectory (every stored step), so that a pooled solver holds only its work vectors."""
        self.rhs = self._call = self._last_evaluator = None
        if self._has_trajectory:
            self.ts.removeTrajectory()  # the next recording solve makes a new one anyway
            self._has_trajectory = False
        for shell in (self.jacobian, self.param_jacobian):
            if shell is not None:
                shell.getPythonContext().linearization = None
        self._end_param_sum()
        self.form.detach()

    @property
    def active_call(self) -> Optional[Call]:
        """The call PETSc's callbacks serve now (None between solves), for the callbacks of
        :mod:`pnode._impl.formulation`."""
        return self._call

    # ------------------------------------------------------------------ PETSc callbacks
    def rhs_function(self, ts, tau, u, f):
        self.trap.call(self._call.evaluator.evaluate, ts, tau, u, f)

    def rhs_jacobian(self, ts, tau, u, jac, pre):
        self.trap.call(self._point_shell, self._jacobian_ops, tau, u)
        if self._param_sum is not None:  # an explicit RK adjoint's stage: J_p^T comes with J^T's VJP
            self.trap.call(self._param_sum.point, ts, u)

    def param_jacobian_rhs(self, ts, tau, u, jac_p):
        self.trap.call(self._point_shell, self._param_ops, tau, u)

    def param_jacobian_implicit(self, ts, tau, u, udot, shift, jac_p):
        self.param_jacobian_rhs(ts, tau, u, jac_p)
        self._param_ops.scale(jac_p, -1.0)

    def _point_shell(self, context, tau, u) -> None:
        """Point a shell's Python context at the linearization at ``(tau, u)``."""
        context.reset(self._call.linearizer.at(self._jacobian_ops.linearization, tau, u))

    def pre_step(self, ts):
        if self._call.evaluator is not None:
            self._call.evaluator.step_started()
        self.trap.call(self._call.schedule.before_step, ts)

    def post_step(self, ts):
        self.trap.call(self._call.schedule.after_step, ts)

    @contextmanager
    def _active(self, call: Call):
        self._call = call
        try:
            yield
        finally:
            self._call = None  # its evaluator and linearizer hold the call's graphs

    # ------------------------------------------------------------------ forward
    def _use(self, rhs: RHS) -> None:
        self.rhs = rhs
        rhs.difference_jvp = self.config.jvp == "difference"
        if self.param_jacobian is not None:
            self._param_ops.use(rhs.params)

    def forward(self, rhs: RHS, span: Span, y0: torch.Tensor, plan: ForwardPlan = ForwardPlan()) -> ForwardRecord:
        """Integrate from ``span.taus[0]`` through every output time, or until ``span.event``.

        Args:
            rhs: the right-hand side for this call.
            span: the output times, first step, tolerances and event of this call (:class:`Span`).
            y0: initial state, flat, PETSc dtype, on :attr:`device`, ``(local_size,)``.
            plan: trajectory, checkpoint store and kept graphs of this pass.

        With an event, the solve stops at the first step that crosses it: that step is rolled back
        before anything records it, and one step of the length ``event.locate`` finds is taken from
        its start to the event, whose time becomes the record's last output time.

        Returns:
            the :class:`ForwardRecord` (outputs ``(n_times, local_size)``).
        """
        self._use(rhs)
        taus = span.taus
        record = ForwardRecord(taus=np.array(taus, dtype=np.float64), step_of_output=[0],
                               step_times=[float(taus[0])], stage_times=StageTimes() if plan.adjoint else None)
        record.outputs = torch.empty((len(taus), y0.numel()), dtype=petsc_dtype(), device=self.device)
        record.outputs[0].copy_(y0)
        if len(taus) == 1:
            return record
        tolerances = None if span.tolerances is None else tuple(tol.to(self.device) for tol in span.tolerances)
        self._set_tolerances(tolerances)
        evaluator = Evaluator(rhs, graphs=plan.graphs if self.explicit else None,
                              graphs_from_step=plan.graphs_from_step)
        schedule = OutputSchedule(self.config, record, plan.store, self.explicit, plan.dense)
        evaluator.observer = schedule.observe
        if plan.dense is not None:
            plan.dense.start(evaluator, float(taus[0]), y0, self.solution)
        first_step = span.first_step or starting_step(self.config, rhs, record.taus, y0, self.comm, tolerances)
        call = Call(watch_steps(schedule, rhs, self.config, self.explicit), evaluator,
                    Linearizer(rhs, self.explicit, evaluated=evaluator.value_at), "forward", span.event)
        if span.event is None:
            self._solve(call, y0, float(taus[0]), float(taus[-1]), first_step, plan.trajectory, plan.solution_only)
        else:
            self._solve_until_event(call, schedule, record, plan, y0, first_step)
        check_forward(self, record, schedule.nonfinite_at)
        record.next_step = self.ts.getTimeStep()
        return record

    def _set_tolerances(self, tolerances: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a call's per-entry tolerances into the TS's tolerance vectors (vector-tolerance solvers)."""
        if self.tolerance_vectors is None:
            return
        if tolerances is None:
            raise ValueError("this solver has vector tolerances: every call must give them")
        for tensor, vec in zip(tolerances, self.tolerance_vectors):
            tensor_into_vec(tensor, vec)

    def _solve_until_event(self, call: Call, schedule: OutputSchedule, record: ForwardRecord, plan: ForwardPlan,
                           y0: torch.Tensor, first_step: float) -> None:
        """The forward solve of :meth:`forward` with an event: search, locate, then step to the event."""
        event = call.event
        event.start(call.evaluator.rhs, float(record.taus[0]), y0)
        crossed = []
        hook = post_evaluate_type()(lambda handle: self._post_evaluate(call, schedule, crossed))
        set_post_evaluate(self.ts, hook)
        try:
            self._solve(call, y0, float(record.taus[0]), float(record.taus[-1]), first_step, plan.trajectory,
                        plan.solution_only)
        finally:
            set_post_evaluate(self.ts, None)
        if not crossed:
            if self.ts.getConvergedReason() >= 0 and schedule.nonfinite_at is None:
                raise event.not_found(self.ts, call.evaluator.rhs)
            return  # check_forward reports the failure
        self._step_to_event(call, record, plan)

    def _post_evaluate(self, call: Call, schedule: OutputSchedule, crossed: list) -> int:
        """PETSc's post-evaluate hook of an event search: a step that crossed an event is rolled back
        (before the trajectory or the post-step hook sees it) and the solve stops at its start."""
        ts = self.ts
        if crossed or ts.getConvergedReason() < 0:
            return 0  # PETSc calls the hook again after a roll-back; a failed step is reported as such
        try:
            if call.event.crossed(call.evaluator.rhs, ts.getTime(), vec_view(self.solution)):
                crossed.append(True)
                ts.rollBack()
                ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_USER)
                call.evaluator.discard_step()
                schedule.discard_step()
            return 0
        except BaseException as exc:  # handed to the trap, re-raised once PETSc unwinds
            if self.trap.error is None:
                self.trap.error = exc
            return PETSC_ERR_PYTHON

    def _step_to_event(self, call: Call, record: ForwardRecord, plan: ForwardPlan) -> None:
        """From the start of the rolled-back crossing step, one step to the event, which becomes the
        last output time. The adaptor accepts it whatever its error estimate: its length is chosen."""
        ts = self.ts
        base_tau = ts.getTime()
        base = vec_view(self.solution).clone()
        length = call.event.locate(call.evaluator.rhs, base_tau, base)
        record.taus[-1] = base_tau + length
        call.event = None  # the step to the event ends on it: nothing more to watch
        with accepting_every_step(ts):
            if ts.getStepNumber() == 0:  # a resumed solve would record the initial state twice
                self._solve(call, base, base_tau, float(record.taus[-1]), length, plan.trajectory, plan.solution_only)
            else:
                set_max_time(ts, float(record.taus[-1]))
                with self._active(call):
                    self.pre_step(ts)  # PETSc skips the pre-step hook of the step after a roll-back
                    self.run_petsc(lambda: ts.solve(self.solution), call.phase)

    def replay(self, rhs: RHS, y_start: torch.Tensor, replay: Replay, copy: bool = True) -> torch.Tensor:
        """Re-take the steps of ``replay`` from ``y_start`` (flat, PETSc dtype, on :attr:`device`); see :class:`Replay`.

        The same step sizes from the same state repeat the original arithmetic, so an adaptive
        controller accepts every step again. With ``replay.trajectory`` the steps are left in the
        trajectory for :meth:`adjoint_steps`.

        Returns:
            the state at ``replay.times[-1]`` (PETSc dtype, on :attr:`device`): a copy, or with ``copy=False`` a
            view of this solver's solution Vec, valid until its next solve.
        """
        self._use(rhs)
        times = replay.times
        evaluator = Evaluator(rhs, graphs=replay.graphs if self.explicit else None,
                              graph_stages=replay.graph_stages, first_derivative=replay.first_derivative)
        schedule = ReplaySchedule(replay.sizes, lambda taken: self.replay_mismatch(len(replay.sizes), taken))
        call = Call(schedule, evaluator, Linearizer(rhs, self.explicit), "recomputation")
        with accepting_every_step(self.ts, replay.accept_all or not self.explicit):
            self._solve(call, y_start, float(times[0]), float(times[-1]), float(replay.sizes[0]), replay.trajectory)
        if self.ts.getStepNumber() != len(replay.sizes):
            raise self.replay_mismatch(len(replay.sizes), self.ts.getStepNumber())
        if not np.isfinite(self.solution.norm()):
            raise nonfinite_error(self, self.ts.getTime())
        self._last_evaluator = evaluator
        return vec_view(self.solution).clone() if copy else vec_view(self.solution)

    def last_derivative(self) -> torch.Tensor:
        """A view of the latest evaluation of f (the last stage of the last replayed step)."""
        return vec_view(self._last_evaluator.last_output)

    def replay_mismatch(self, recorded: int, taken: int) -> SolverError:
        return SolverError(f"recomputing {recorded} recorded steps took {taken} "
                           f"({converged_reason_name(self.ts.getConvergedReason())}): the right-hand side is "
                           "not deterministic, so checkpointing cannot reproduce the forward pass",
                           t_reached=self.rhs.direction * self.ts.getTime(), reason="REPLAY_MISMATCH")

    def _solve(self, call: Call, y_start: torch.Tensor, t_start: float, t_end: float, first_step: float,
               trajectory: bool, solution_only: bool = False) -> None:
        """Integrate from ``y_start`` at ``t_start`` to ``t_end`` (PETSc time) under ``call``,
        recording a new trajectory or none."""
        if trajectory and not self.record:
            raise ValueError("this solver was built without adjoint vectors (record=False): it cannot record")
        if trajectory:
            renew_trajectory(self.ts, self.config, solution_only)
            self._has_trajectory = True
        elif self._has_trajectory:
            self.ts.removeTrajectory()  # a solve that checkpointing reverses keeps no trajectory
            self._has_trajectory = False
        if not _views(y_start, self.solution):  # a replay may start from the solution it left
            tensor_into_vec(y_start, self.solution)
        ts = self.ts
        ts.setTime(t_start)
        ts.setStepNumber(0)
        set_max_time(ts, t_end)
        ts.setTimeStep(first_step)
        with self._active(call):
            self.run_petsc(lambda: ts.solve(self.solution), call.phase)

    # ------------------------------------------------------------------ adjoint
    def begin_adjoint(self, cotangent: torch.Tensor) -> None:
        """Start an adjoint pass: ``lambda = cotangent`` (flat, PETSc dtype), parameter gradient zero.

        An explicit RK adjoint sums the parameter gradient itself from the VJPs that serve ``J^T``
        (:mod:`pnode._impl.rk_adjoint`), and PETSc's runs without a parameter vector; other types
        (or a PETSc that exports no RK tableau) accumulate it in PETSc's ``mu`` through ``J_p^T``.
        """
        tensor_into_vec(cotangent, self.adjoint_state)
        self._end_param_sum()
        if self.param_gradient is not None and self.ts.getType() == "rk":
            self._param_sum = ParamGradientSum.for_ts(self.ts, self._param_ops.pack, self.param_gradient,
                                                      self._param_product)
            self._jacobian_ops.param_sum = self._param_sum
        pnode_sums_mu = self._param_sum is not None
        if self._pnode_sums_mu is not None and pnode_sums_mu != self._pnode_sums_mu:
            self.ts.adjointReset()  # PETSc sized its adjoint work vectors with or without mu's, once
        self._pnode_sums_mu = pnode_sums_mu
        if self.param_gradient is not None and not pnode_sums_mu:
            self.param_gradient.zeroEntries()
            self.ts.setCostGradients(self.adjoint_state, self.param_gradient)
        else:
            self.ts.setCostGradients(self.adjoint_state)

    def _end_param_sum(self) -> None:
        self._param_sum = self._jacobian_ops.param_sum = None

    def adjoint_steps(self, steps: int, linearizer: Linearizer, cached: Optional[GraphStore] = None) -> None:
        """Run TSAdjoint back over the last ``steps`` recorded steps (accumulating into lambda and mu).

        ``linearizer`` gives the Jacobian products their linearizations; ``cached``: kept graphs
        whose outputs serve PETSc's re-evaluations of f (a solution-only trajectory re-takes each
        step to recover its stages).
        """
        if steps <= 0:
            return
        self.ts.adjointSetSteps(steps)
        evaluator = Evaluator(linearizer.rhs, cached=cached)
        with self._active(Call(NoSteps(), evaluator, linearizer, "adjoint")), self._adjoint_ksp():
            self.run_petsc(self.ts.adjointSolve, "adjoint")

    @contextmanager
    def _adjoint_ksp(self):
        """An implicit adjoint step solves a transposed linear system to ``config.adjoint_ksp_rtol``,
        without Eisenstat-Walker (whose pre-solve hook would set the forward pass's loose tolerance),
        and a solve that does not converge is an error (it would leave a silently wrong gradient);
        the Krylov method is ``config.adjoint_ksp_type`` (GMRES, also where the forward pass's
        Newton applied the block-Jacobian preconditioner alone); the forward settings come back after."""
        if self.explicit:
            yield
            return
        snes = self.ts.getSNES()
        ksp = snes.getKSP()
        saved, ew, kind = ksp.getTolerances(), snes.getUseEW(), ksp.getType()
        snes.setUseEW(False)
        ksp.setType(self.config.adjoint_ksp_type)
        ksp.setTolerances(rtol=self.config.adjoint_ksp_rtol)
        ksp.setErrorIfNotConverged(True)
        try:
            yield
        finally:
            ksp.setErrorIfNotConverged(False)
            ksp.setType(kind)
            ksp.setTolerances(*saved)
            snes.setUseEW(ew)

    def add_to_adjoint_state(self, cotangent: torch.Tensor) -> None:
        writable_view(self.adjoint_state, keep=True).add_(cotangent)

    def adjoint_state_tensor(self) -> torch.Tensor:
        return vec_view(self.adjoint_state).clone()

    def param_gradient_tensor(self) -> Optional[torch.Tensor]:
        """The adjoint pass's parameter gradient, ``(param_size,)``, PETSc dtype (a new tensor), or None."""
        return None if self.param_gradient is None else vec_view(self.param_gradient).clone()

    def run_petsc(self, call, phase: str) -> None:
        """Run a PETSc call; a Python error in a callback is re-raised as itself (with a note on where
        it came from), a PETSc one explained.

        The callbacks run without torch's grad mode (only a kept graph's evaluation enables it) and
        take each Vec's array once (:func:`pnode._impl.bridge.cached_views`).
        """
        try:
            with cached_views(), torch.no_grad():
                call()
        except PETSc.Error as exc:
            original = self.trap.pop()
            if original is not None:
                raise self._located(original, phase).with_traceback(original.__traceback__) from None
            raise petsc_failure(self, exc, phase) from None
        except BaseException as exc:  # petsc4py 3.18 lets some callbacks' exceptions through as they are
            if self.trap.pop() is exc:
                self._located(exc, phase)
            raise
        error = self.trap.pop()
        if error is not None:
            raise self._located(error, phase)

    def _located(self, error: BaseException, phase: str) -> BaseException:
        """``error`` with a note (Python 3.11+) saying that it came from a PETSc callback of this solve, and when."""
        if hasattr(error, "add_note"):
            t_user = self.ts.getTime() * (self.rhs.direction if self.rhs is not None else 1.0)
            error.add_note(f"(raised in a PETSc callback of pnode's {phase} solve, at t={t_user:.6g})")
        return error

def work_vectors(config: SolverConfig, record: bool) -> int:
    """State-sized vectors a TS of ``config`` allocates (an estimate, for the pool's byte count).

    Explicit RK: the solution, the stages and their derivatives, and with an adjoint the stage
    adjoints and two work vectors; implicit methods: about a dozen (Newton, GMRES's Krylov basis).
    """
    stages = config.method.stages or 8
    if config.method.implicit:
        return 40 if record else 35  # GMRES(30) basis and Newton's work vectors
    return 1 + 2 * stages + (stages + 4 if record else 0)


def _views(tensor: torch.Tensor, vec) -> bool:
    """Whether ``tensor`` is the whole local part of ``vec`` in place (same memory, dtype and size)."""
    view = vec_view(vec)
    return (tensor.device == view.device and tensor.dtype == view.dtype and tensor.numel() == view.numel()
            and tensor.data_ptr() == view.data_ptr())
