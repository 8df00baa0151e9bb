"""A memory budget: one setting that spans the curve from kept graphs to constant memory.

``options={'memory_budget': '2GB'}`` (or bytes as an int, or ``-pnode_memory_budget 2GB``) bounds
what pnode holds for the adjoint between the forward and the backward pass: its solver's PETSc
vectors, kept stage graphs and stored states. Checkpointing reserves room for reversing one step
(its stages and, where they are kept, its stage graphs). Not counted: the network's activations
and gradient buffers while one stage is evaluated or differentiated. :class:`MemoryBudget`
chooses per call, from costs measured on earlier calls of the same solver (one step's graphs, as
kept graphs or a checkpointed re-take measured them; the stages per step) and the step count
(known for fixed steps; for adaptive ones, the previous call's):

1. every graph fits beside the states: :class:`KeptGraphs` (no evaluation in the backward pass);
2. every state and stage fits: :class:`KeptGraphs` with the graphs that still fit (the latest
   steps', which the adjoint reverses first; with fixed steps the earlier steps build none), the
   other stages re-evaluated for their VJPs;
3. otherwise binomial checkpoints with as many states as fit beside one reversed step (at least one).

The first call of a solver has no measurement yet and takes 2 (or 3 if the states alone exceed
the budget). What was chosen is in the call's :class:`pnode._impl.strategies.AdjointStats`.
"""

import dataclasses
import re
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError
from .schedule import expected_steps
from .solver import Solver
from .strategies import BinomialCheckpoints, Forward, Gradients, KeptGraphs, Strategy, state_bytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, source: str = "options['memory_budget']") -> int:
    """``'2GB'``, ``'512 MiB'``, ``'1.5e9'`` or an int of bytes -> bytes (> 0)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise InputError(f"{source} must be a positive size in bytes: an int, or text such as '2GB', '512MiB', "
                     f"'1.5e9'; got {value!r}")


@dataclass
class MeasuredCosts:
    """Costs a solver measured on its last budgeted call (per step, on this rank)."""

    graph_bytes_per_step: float
    stages: int
    steps: int


class MemoryBudget:
    """Choose graphs, states or checkpoints per call so that what is held stays within ``budget`` bytes.

    Args:
        budget: bytes pnode may hold for the adjoint on this rank (graphs and stored states).
        checkpoint_graphs: stage graphs a checkpointed re-taken step keeps (as ``checkpoint_graphs``).
    """

    name = "budget"

    def __init__(self, budget: int, checkpoint_graphs: Optional[int] = None):
        self.budget = budget
        self.checkpoint_graphs = checkpoint_graphs

    def choose(self, solver: Solver, problem, costs: Optional[MeasuredCosts] = None) -> Strategy:
        """The strategy for this call (see the module docstring), from ``costs`` measured on an earlier
        call of ``solver`` (None: none yet)."""
        steps = expected_steps(problem.config, problem.taus)
        if steps is None:
            steps = costs.steps if costs is not None else None
        one = state_bytes(solver)
        stages = costs.stages if costs is not None else problem.config.method.stages or 1
        available = self.available(solver)
        if steps is None:  # adaptive, first call: keep graphs within the budget, store every state
            return KeptGraphs(graph_bytes=available // 2)
        if costs is not None and steps * (one + costs.graph_bytes_per_step) <= available:
            return KeptGraphs()
        every_stage = steps * (1 + stages) * one
        if every_stage < available:
            graph_bytes = available - every_stage
            graph_steps = None if costs is None else int(graph_bytes // max(costs.graph_bytes_per_step, 1.0))
            return KeptGraphs(graph_bytes=graph_bytes, graph_steps=graph_steps)
        per_checkpoint = 2 * one if problem.config.method.adaptive else one  # FSAL: a derivative each
        room = available - self.reversal_bytes(one, stages, costs)
        return BinomialCheckpoints(max(1, room // per_checkpoint), self.checkpoint_graphs)

    def reversal_bytes(self, one: int, stages: int, costs: Optional[MeasuredCosts]) -> int:
        """What reversing one checkpointed step holds: the re-taken step's trajectory (its state and
        stages) and the stage graphs it keeps (all, or ``checkpoint_graphs`` of them; unknown before a
        measurement)."""
        graphs = 0.0
        if costs is not None:
            kept = stages if self.checkpoint_graphs is None else min(self.checkpoint_graphs, stages)
            graphs = costs.graph_bytes_per_step * kept / max(stages, 1)
        return int((1 + stages) * one + graphs)

    def available(self, solver: Solver) -> int:
        """Bytes left for graphs and states: the budget less the solver's own vectors (its TS's work
        and adjoint vectors, :attr:`pnode._impl.solver.Solver.held_bytes`), which every strategy needs."""
        return max(0, self.budget - solver.held_bytes)

    def for_solver(self, solver: Solver) -> Strategy:
        return self

    def forward(self, solver: Solver, problem, rhs, y0: torch.Tensor) -> Forward:
        strategy = self.choose(solver, problem, _measured.get(solver)).for_solver(solver)
        forward = dataclasses.replace(strategy.forward(solver, problem, rhs, y0), strategy=self, chosen=strategy)
        forward.stats.budget_bytes = self.budget
        forward.stats.solver_bytes = solver.held_bytes
        graphs = forward.graphs
        if graphs is not None and graphs.built:
            steps = forward.steps_with_graphs or max(forward.record.steps, 1)
            _note_costs(solver, forward, graphs.built_bytes / steps)
        return forward

    def backward(self, solver: Solver, forward: Forward, grad_outputs: torch.Tensor) -> Gradients:
        result = forward.chosen.backward(solver, forward, grad_outputs)
        if forward.step_graph_bytes:  # checkpointed: what one re-taken step's graphs cost
            _note_costs(solver, forward, forward.step_graph_bytes)
        return result


# What each solver measured on its latest budgeted call (kept here, by solver, for the next choice).
_measured: "weakref.WeakKeyDictionary[Solver, MeasuredCosts]" = weakref.WeakKeyDictionary()


def _note_costs(solver: Solver, forward: Forward, graph_bytes_per_step: float) -> None:
    """Remember a call's measured costs for its solver, for the next call's choice."""
    if forward.record.steps:
        _measured[solver] = MeasuredCosts(graph_bytes_per_step, forward.record.stages or 1, forward.record.steps)
