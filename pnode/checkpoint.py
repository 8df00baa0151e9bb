"""Checkpointing built on top of PETSc TS: Revolve's binomial schedule, on any PETSc build.

PETSc's own limited-memory checkpointing (``-ts_trajectory_max_cps_ram``) needs Revolve, which
common builds lack. pnode therefore keeps only the output states of the forward solve plus the
times of its steps, and in the backward pass rebuilds what the adjoint needs from at most K
stored states at once:

* between two output times (whose states are kept anyway), the steps are reversed with the
  binomial schedule of Griewank & Walther (Revolve): it advances from a stored state to the split
  point that minimises the total number of recomputed steps, stores it, recurses on the right part
  with one slot fewer, frees it, and recurses on the left part;
* reversing one step re-takes it on a TS that records its trajectory (stages included) and runs
  TSAdjoint over that single step, accumulating into the same adjoint and parameter vectors.

Steps are re-taken with exactly the recorded step sizes, so adaptive and implicit methods
reproduce the forward pass and the gradients equal the store-everything run to round-off.
"""

from functools import lru_cache
from math import comb
from typing import Optional, Tuple

import torch

from .rhs import RHS
from .solver import ForwardRecord, Solver


def recomputed_steps(m: int, slots: int) -> int:
    """Fewest forward steps needed to reverse ``m`` steps holding the start state plus ``slots`` more.

    Closed form of Griewank & Walther (Algorithm 799, 2000): with ``s = slots + 1`` stored states
    and ``r`` the least integer with ``C(s + r, s) >= m``, the minimum is ``r*m - C(s + r, s + 1)``.
    Reversing each step once more (to record it for the adjoint) is not counted here.
    """
    if m <= 1:
        return 0
    stored = slots + 1
    repetitions = 0
    while comb(stored + repetitions, stored) < m:
        repetitions += 1
    return repetitions * m - comb(stored + repetitions, stored + 1)


@lru_cache(maxsize=4096)
def best_split(m: int, slots: int) -> int:
    """Steps to advance before storing the next checkpoint, for ``m`` steps and ``slots`` free slots."""
    return min(range(1, m), key=lambda j: (j + recomputed_steps(m - j, slots - 1) + recomputed_steps(j, slots), -j))


class CheckpointedAdjoint:
    """Runs the adjoint of a forward solve that kept only its outputs, with at most K stored states.

    Args:
        plain: a solver without a trajectory, used to advance between checkpoints.
        recorder: a solver that records its trajectory, used to re-take and reverse one step.
        rhs: the right-hand side of the forward solve.
        checkpoints: K, the number of states held at once (the segment start included), K >= 1.

    Attributes:
        advanced_steps: steps recomputed to reach checkpoints (excluding the one recording per step).
        recorded_steps: steps re-taken with a trajectory (one per forward step).
        peak_stored: the largest number of states held at once.
    """

    def __init__(self, plain: Solver, recorder: Solver, rhs: RHS, checkpoints: int):
        self.plain = plain
        self.recorder = recorder
        self.rhs = rhs
        self.checkpoints = checkpoints
        self.advanced_steps = 0
        self.recorded_steps = 0
        self.peak_stored = 0
        self._stored = 0

    def run(self, record: ForwardRecord, grad_outputs: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Same contract as :meth:`Solver.adjoint`, for a forward record of ``plain``."""
        times = torch.tensor(record.step_times, dtype=torch.float64).numpy()
        self.recorder.begin_adjoint(grad_outputs[-1])
        for i in range(len(record.taus) - 1, 0, -1):
            lo, hi = record.step_of_output[i - 1], record.step_of_output[i]
            self._stored = 1
            self._reverse(times[lo:hi + 1], record.outputs[i - 1], self.checkpoints - 1)
            if i > 1:
                self.recorder.add_to_adjoint_state(grad_outputs[i - 1])
        before_first = self.recorder.adjoint_state_tensor()
        return before_first + grad_outputs[0], before_first, self.recorder.param_gradient_tensor()

    def _reverse(self, times, start_state: torch.Tensor, slots: int) -> None:
        """Reverse the steps ``times[0] -> ... -> times[-1]`` given the state at ``times[0]``."""
        m = len(times) - 1
        self.peak_stored = max(self.peak_stored, self._stored)
        if m == 1:
            self._reverse_one_step(times, start_state)
        elif slots == 0:
            for k in range(m - 1, -1, -1):
                state = start_state if k == 0 else self._advance(times[:k + 1], start_state)
                self._reverse_one_step(times[k:k + 2], state)
        else:
            j = best_split(m, slots)
            mid_state = self._advance(times[:j + 1], start_state)
            self._stored += 1
            self._reverse(times[j:], mid_state, slots - 1)
            del mid_state
            self._stored -= 1
            self._reverse(times[:j + 1], start_state, slots)

    def _advance(self, times, state: torch.Tensor) -> torch.Tensor:
        self.advanced_steps += len(times) - 1
        return self.plain.replay(self.rhs, times, state)

    def _reverse_one_step(self, times, state: torch.Tensor) -> None:
        self.recorded_steps += 1
        self.recorder.replay(self.rhs, times, state)
        self.recorder.adjoint_steps(1)
