"""Stand-ins for PETSc objects, to test pnode's step schedules and adjoint reversal without PETSc.

:class:`StubTS` has the handful of TS methods the schedules call (time, step size and number,
rejections, nonlinear failures, the solution) and :func:`run` drives a schedule the way
``TSSolve`` does: the pre-step hook, one attempt after another (a rejected attempt is retried
smaller, with no hook in between, evaluating its stages again), the post-step hook. Time sums are
taken in the stub's real type (float32 as a single-precision PETSc, or float64).
:class:`StubSolver` records which steps a checkpointed adjoint re-takes and reverses.
"""

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch


class StubVec:
    """A Vec with an address, a state and a local array (what ``pnode._impl.bridge`` reads).

    Only methods that petsc4py 3.18 has too (no ``getId``): pnode supports both.
    """

    _ids = iter(range(1, 10**9))

    def __init__(self, values):
        self.array = np.asarray(values, dtype=np.float64)
        self.handle = next(self._ids)
        self.state = 0

    def getType(self) -> str:
        return "seq"  # a host Vec

    def stateGet(self) -> int:
        return self.state

    def stateIncrease(self) -> None:
        self.state += 1

    def getArray(self, readonly: bool = False) -> np.ndarray:
        return self.array

    def norm(self) -> float:
        return float(np.linalg.norm(self.array))


class StubTS:
    """The TS methods the schedules use. ``real``: the type PETSc adds times in."""

    def __init__(self, t0: float, dt: float, real=np.float64, state=(1.0,)):
        self.real = real
        self.time, self.prev_time, self.dt = real(t0), real(t0), real(dt)
        self.steps = self.rejections = self.snes_failures = 0
        self.solution = StubVec(state)
        self.reason = 0

    def getTime(self) -> float:
        return float(self.time)

    def getPrevTime(self) -> float:
        return float(self.prev_time)

    def getTimeStep(self) -> float:
        return float(self.dt)

    def setTimeStep(self, dt: float) -> None:
        self.dt = self.real(dt)

    def getStepNumber(self) -> int:
        return self.steps

    def getStepRejections(self) -> int:
        return self.rejections

    def getSNESFailures(self) -> int:
        return self.snes_failures

    def getSolution(self) -> StubVec:
        return self.solution

    def setConvergedReason(self, reason) -> None:
        self.reason = reason


def run(schedule, ts: StubTS, t_end: float, stages: int = 4, reject: Callable[[int, float], bool] = lambda k, dt: False,
        fail_newton: Callable[[int, float], bool] = lambda k, dt: False, propose: Optional[Callable] = None,
        observe: Optional[Callable] = None, fsal: bool = False, max_steps: int = 10000) -> List[float]:
    """Drive ``schedule`` as ``TSSolve`` drives a pnode schedule; returns the accepted step sizes.

    ``reject(k, dt)``: the controller rejects attempt ``dt`` of step ``k`` (retried at half the
    size); ``fail_newton``: a nonlinear failure does; ``propose(dt)``: the next step's size from an
    accepted one (default: unchanged); ``observe(ts, tau, u, last)``: told of each stage evaluation;
    ``fsal``: after the first step, a step's first stage is the previous one's last (not evaluated).
    """
    taken, last = [], None
    while ts.time < ts.real(t_end) and ts.steps < max_steps:
        schedule.before_step(ts)
        k = ts.steps + 1
        while True:
            dt = ts.dt
            first = 1 if fsal and ts.steps > 0 else 0
            for i in range(first, stages):
                if observe is not None:
                    tau = ts.time + ts.real(dt * (i / max(stages - 1, 1)))
                    observe(ts, float(tau), ts.solution, last)
                    last = StubVec([float(tau)])
            if fail_newton(k, float(dt)):
                ts.snes_failures += 1
            elif reject(k, float(dt)):
                ts.rejections += 1
            else:
                break
            ts.dt = ts.real(dt / 2)
        ts.prev_time, ts.time = ts.time, ts.time + ts.dt
        ts.steps += 1
        taken.append(float(ts.dt))
        ts.solution = StubVec(ts.solution.array + 1.0)
        if propose is not None:
            ts.dt = ts.real(propose(float(ts.dt)))
        schedule.after_step(ts)
    return taken


class StubSolver:
    """What :class:`pnode._impl.checkpoint.CheckpointedAdjoint` asks of a solver, recording the work done.

    A step's "state" is its step number (a 1-element tensor), so a re-take's result shows where it
    started and how far it went; ``reversed`` lists the steps whose adjoint ran, in order;
    ``advanced`` counts steps re-taken to reach a checkpoint.
    """

    explicit = True

    def __init__(self, times: Sequence[float]):
        self.times = list(times)
        self.reversed: List[int] = []
        self.advanced = 0
        self._last = torch.zeros(1)
        self._pending: Optional[int] = None

    def replay(self, rhs, state: torch.Tensor, replay, copy: bool = True) -> torch.Tensor:
        start = self.times.index(float(replay.times[0]))
        end = start + len(replay.sizes)
        assert float(state[0]) == start, f"re-take from step {start} given the state of step {float(state[0])}"
        if replay.trajectory:
            assert len(replay.sizes) == 1, "a recorded re-take is one step"
            self._pending = end
        else:
            self.advanced += len(replay.sizes)
        self._last = torch.tensor([float(end)])
        return self._last.clone()

    def last_derivative(self) -> torch.Tensor:
        return self._last

    def begin_adjoint(self, cotangent) -> None:
        pass

    def adjoint_steps(self, steps: int, linearizer, cached=None) -> None:
        assert steps == 1 and self._pending is not None
        self.reversed.append(self._pending)
        self._pending = None

    def add_to_adjoint_state(self, cotangent) -> None:
        pass

    def adjoint_state_tensor(self) -> torch.Tensor:
        return torch.zeros(1)

    def param_gradient_tensor(self) -> None:
        return None
