"""Checkpointing built on top of PETSc TS: Revolve's binomial schedule, on any PETSc build.

PETSc's own limited-memory checkpointing (``-ts_trajectory_max_cps_ram``) needs Revolve, which
common builds lack. With ``options={'checkpoints': K}`` pnode instead holds at most K states of
the trajectory at any time (besides the output states, which the caller gets anyway):

* the forward pass runs a TS without a trajectory; a :class:`CheckpointStore` keeps some of its
  states. With fixed steps the count is known, and it keeps the up to K states of the binomial
  schedule's first sweep (:func:`planned_checkpoints`). With adaptive steps it keeps up to K - 1,
  spread evenly over the steps taken (when it is full, every other one is dropped and the
  spacing doubles, so it needs no step count in advance);
* the backward pass walks the intervals between stored states from the last to the first; each
  interval is reversed with the binomial schedule of Griewank & Walther (Revolve) on the slots
  still free: advance from a stored state to the split point that minimises the recomputed steps,
  store it, reverse the right part with one slot fewer, free it, reverse the left part;
* reversing one step re-takes it with the trajectory switched on and runs TSAdjoint over that
  single step, accumulating into the same adjoint and parameter vectors. One TS (the forward
  pass's) does all of it, so checkpointing holds one set of PETSc vectors. For explicit methods the
  re-taken step keeps the graphs of its stage evaluations, which the adjoint's vector-Jacobian
  products then reuse, so the re-step costs no evaluation beyond those of plain store-all (an FSAL
  method's last stage, which the adjoint never linearises, is evaluated without a graph).

A re-taken step repeats the stored one bit for bit: it gets the size PETSc gave it
(:attr:`ForwardRecord.step_sizes`; the difference of two recorded times can be an ulp off), and
with an FSAL method (dopri5, bosh3) it starts from the derivative the original step reused from
the step before (kept with each state, :attr:`CheckpointStore.derivatives`), not from f at the
state. The adjoint linearises f at the forward pass's stage times in both runs. So checkpointed
gradients equal the store-everything ones bit for bit for explicit methods, on either PETSc
precision, except after a step that PETSc rejected and retried (it rolls the state back by
subtracting the rejected update, which leaves the retry's start a few ulps off the stored state;
the re-taken step starts from the stored one) and for implicit methods, whose Newton solves agree
to their tolerance.
"""

from functools import lru_cache
from math import comb
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .evaluation import GraphStore, Linearizer
from .rhs import RHS
from .schedule import ForwardRecord
from .solver import Replay, Solver


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


def planned_checkpoints(steps: int, slots: int) -> List[int]:
    """Step numbers at which the binomial schedule stores states during its first forward sweep.

    The chain that :meth:`CheckpointedAdjoint._reverse` would build on ``steps`` steps with
    ``slots`` free slots: the first split, then the split of the part to its right with one slot
    fewer, and so on. When the step count is known in advance (fixed steps), the forward pass
    stores exactly these states, and the backward pass recomputes the fewest steps possible.
    """
    chain, start = [], 0
    while slots > 0 and steps - start > 1:
        start += best_split(steps - start, slots)
        chain.append(start)
        slots -= 1
    return chain


class CheckpointStore:
    """States a forward pass keeps for its adjoint: at most ``capacity``, evenly spread over the steps.

    With ``planned`` step numbers (fixed steps: :func:`planned_checkpoints`), exactly those states
    are kept. Otherwise (adaptive steps, count unknown) states are kept at the step numbers that are
    multiples of ``stride``; when a new one would exceed the capacity, the stride doubles and the
    states off the new grid are dropped.

    The store also hands out buffers for the states the backward pass holds (:meth:`take`,
    :meth:`give`): a dropped state's buffer is reused rather than freed, so checkpointing does not
    churn (and fragment) the heap with state-sized allocations.

    Attributes:
        capacity: the most states held at once by the forward pass.
        stride: the current spacing of kept steps.
        states: step number -> state (flat, PETSc dtype, on the solver's device; copies).
        derivatives: for an FSAL method (dopri5, bosh3), step number -> the derivative the next
            step started from (its first stage, reused from this step's last), for kept states and
            output steps: a step re-taken from the state starts from it, as the forward pass did.
    """

    def __init__(self, capacity: int, planned: Optional[Sequence[int]] = None):
        self.planned = None if planned is None else frozenset(planned)
        self.capacity = capacity if planned is None else len(self.planned)
        self.stride = 1
        self.states: Dict[int, torch.Tensor] = {}
        self.derivatives: Dict[int, torch.Tensor] = {}
        self._free: List[torch.Tensor] = []

    def offer(self, step: int, state: torch.Tensor) -> None:
        """Keep a copy of ``state`` (the solution after step ``step``) if it is planned or on the grid."""
        if self.planned is not None:
            if step in self.planned:
                self.states[step] = self.take(state)
            return
        if self.capacity <= 0 or step % self.stride:
            return
        while len(self.states) >= self.capacity:
            self.stride *= 2
            for k in [k for k in self.states if k % self.stride]:
                self.release(k)
            if step % self.stride:
                return
        self.states[step] = self.take(state)

    def keep_derivative(self, step: int, derivative: torch.Tensor) -> None:
        """Keep a copy of the FSAL derivative that the step after ``step`` started from."""
        self.derivatives[step] = self.take(derivative)

    def take(self, state: torch.Tensor) -> torch.Tensor:
        """A copy of ``state`` in a recycled buffer when one is free (give it back with :meth:`give`)."""
        if self._free and self._free[-1].shape == state.shape:
            return self._free.pop().copy_(state)
        return state.clone()

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from :meth:`take` (or a stored state) for reuse."""
        self._free.append(buffer)

    def release(self, step: int) -> bool:
        """Drop the stored state of ``step`` and its derivative (buffers recycled); whether there was a state."""
        derivative = self.derivatives.pop(step, None)
        if derivative is not None:
            self.give(derivative)
        state = self.states.pop(step, None)
        if state is not None:
            self.give(state)
        return state is not None


class CheckpointedAdjoint:
    """Runs the adjoint of a forward solve that kept only its outputs and a :class:`CheckpointStore`.

    Args:
        solver: the forward pass's solver (built with ``record=True``); it advances between
            checkpoints without a trajectory, and re-takes and reverses one step with one.
        rhs: the forward pass's right-hand side.
        checkpoints: K, the most trajectory states held at once (output states not counted), K >= 1.
        keep_graphs: how many stage graphs of a re-taken step are kept for the adjoint's VJPs
            (explicit methods): ``None`` all, ``n`` the last ``n`` stages'; the adjoint evaluates
            the other stages again (less memory: fewer graphs held at once).

    Attributes:
        advanced_steps: steps recomputed to reach checkpoints (excluding the one re-take per step).
        recorded_steps: steps re-taken with a trajectory (one per forward step).
        peak_stored: the most trajectory states held at once during the adjoint.
        step_graph_bytes: bytes of the stage graphs one re-taken step built (None before one, or
            when no graphs are kept).
    """

    def __init__(self, solver: Solver, rhs: RHS, checkpoints: int, keep_graphs: Optional[int] = None):
        self.solver = solver
        self.keep_graphs = keep_graphs
        self.rhs = rhs
        self.checkpoints = checkpoints
        self.advanced_steps = 0
        self.recorded_steps = 0
        self.peak_stored = 0
        self.step_graph_bytes: Optional[int] = None
        self._held = 0
        self._handoff_buffer: Optional[torch.Tensor] = None

    def run(self, record: ForwardRecord, store: CheckpointStore, grad_outputs: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Same contract as :meth:`Solver.adjoint`, for a forward record of ``solver``."""
        self._times = np.asarray(record.step_times, dtype=np.float64)
        self._sizes = record.step_sizes
        self._stage_times = record.stage_times
        self._fsal = bool(record.fsal)
        # an FSAL step's last stage only hands its derivative on: PETSc's adjoint never linearises it
        self._graph_stages = record.stages - 1 if self._fsal and record.stages else None
        output_at = {step: i for i, step in enumerate(record.step_of_output)}
        anchors = {step: record.outputs[i] for step, i in output_at.items()}
        anchors.update(store.states)
        self._store = store
        self._held = len(store.states)
        self.peak_stored = self._held
        order = sorted(anchors)
        self.solver.begin_adjoint(grad_outputs[-1] if len(record.taus) > 1 else torch.zeros_like(grad_outputs[0]))
        for lo, hi in zip(reversed(order[:-1]), reversed(order[1:])):
            self._reverse(lo, hi, anchors.pop(lo), self.checkpoints - self._held, store.derivatives.get(lo))
            if store.release(lo):  # its buffer is free now: one more slot
                self._held -= 1
            if output_at.get(lo, 0) > 0:
                self.solver.add_to_adjoint_state(grad_outputs[output_at[lo]])
        before_first = self.solver.adjoint_state_tensor()
        return before_first + grad_outputs[0], before_first, self.solver.param_gradient_tensor()

    def _reverse(self, first: int, last: int, start_state: torch.Tensor, slots: int,
                 start_derivative: Optional[torch.Tensor] = None) -> None:
        """Reverse the steps ``first + 1 .. last`` given the state after step ``first`` (and, for an
        FSAL method, the derivative step ``first + 1`` started from; None: it evaluated it)."""
        m = last - first
        if m == 1:
            self._reverse_one_step(first, start_state, start_derivative)
        elif slots <= 0:
            for k in range(last - 1, first - 1, -1):
                # the re-take copies the state in first thing: a view of the solution Vec is enough
                state, derivative = start_state, start_derivative
                if k > first:
                    state = self._advance(first, k, start_state, start_derivative)
                    derivative = self._handoff(self.solver.last_derivative())
                self._reverse_one_step(k, state, derivative)
        else:
            split = first + best_split(m, slots)
            mid_state = self._store.take(self._advance(first, split, start_state, start_derivative))
            mid_derivative = self._store.take(self.solver.last_derivative()) if self._fsal else None
            self._held += 1
            self.peak_stored = max(self.peak_stored, self._held)
            self._reverse(split, last, mid_state, slots - 1, mid_derivative)
            for buffer in (mid_state, mid_derivative):
                if buffer is not None:
                    self._store.give(buffer)
            self._held -= 1
            self._reverse(first, split, start_state, slots, start_derivative)

    def _handoff(self, derivative: torch.Tensor) -> Optional[torch.Tensor]:
        """For an FSAL method, ``derivative`` copied into one buffer reused from step to step (else None)."""
        if not self._fsal:
            return None
        if self._handoff_buffer is None:
            self._handoff_buffer = self._store.take(derivative)
        return self._handoff_buffer.copy_(derivative)

    def _replay(self, first: int, last: int, state: torch.Tensor, derivative: Optional[torch.Tensor],
                copy: bool = False, graphs: Optional[GraphStore] = None, trajectory: bool = False) -> torch.Tensor:
        """Re-take steps ``first + 1 .. last`` from ``state`` (after step ``first``) with their
        recorded sizes, the first one starting from ``derivative`` when the method is FSAL."""
        replay = Replay(self._times[first:last + 1], self._sizes[first:last],
                        first_derivative=derivative if self._fsal else None, graphs=graphs,
                        graph_stages=self._graph_stages if graphs is not None else None, trajectory=trajectory)
        return self.solver.replay(self.rhs, state, replay, copy=copy)

    def _advance(self, first: int, last: int, state: torch.Tensor,
                 derivative: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The state after step ``last`` from ``state`` after step ``first``: a view, valid until the
        next replay (so is :meth:`Solver.last_derivative`, the FSAL derivative of the step after)."""
        self.advanced_steps += last - first
        return self._replay(first, last, state, derivative)

    def _reverse_one_step(self, first: int, state: torch.Tensor, derivative: Optional[torch.Tensor]) -> None:
        """Re-take step ``first + 1`` from ``state`` with a trajectory, and run TSAdjoint back over it."""
        self.recorded_steps += 1
        graphs = None if self.keep_graphs == 0 else GraphStore(limit=self.keep_graphs)
        self._replay(first, first + 1, state, derivative, graphs=graphs, trajectory=True)
        if graphs is not None and self.step_graph_bytes is None:
            self.step_graph_bytes = graphs.built_bytes
        self.solver.adjoint_steps(1, Linearizer(self.rhs, self.solver.explicit, graphs, self._stage_times))
