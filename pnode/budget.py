"""A memory budget: one setting that spans the curve from backprop's speed to constant memory.

``options={'memory_budget': '2GB'}`` (or bytes as an int, or ``-pnode_memory_budget 2GB``) bounds
what pnode holds for the adjoint between the forward and the backward pass: its solver's PETSc
vectors, kept stage graphs and stored states. Not counted: the transient of one step (the
network's activations while one stage is evaluated or differentiated, and the graphs of one
re-taken step). :class:`MemoryBudget` chooses per call, from costs measured on earlier calls of the
same solver (a kept graph's bytes per step, the stages per step) and the step count (known for
fixed steps; for adaptive ones, the previous call's):

1. every graph fits beside the states: :class:`KeptGraphs` (no evaluation in the backward pass);
2. every state and stage fits: :class:`KeptGraphs` with the graphs that still fit (the latest
   steps', which the adjoint reverses first), the other stages re-evaluated for their VJPs;
3. otherwise binomial checkpoints with as many states as fit (at least one).

The first call of a solver has no measurement yet and takes 2 (or 3 if the states alone exceed
the budget). What was chosen is in the call's :class:`pnode.strategies.AdjointStats`.
"""

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError
from .schedule import expected_steps
from .solver import RK_STAGES, Solver
from .strategies import BinomialCheckpoints, Forward, Gradients, KeptGraphs, state_bytes

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

    def choose(self, solver: Solver, problem):
        """The strategy for this call (see the module docstring)."""
        costs: Optional[MeasuredCosts] = getattr(solver, "measured_costs", None)
        steps = expected_steps(problem.config, problem.taus)
        if steps is None:
            steps = costs.steps if costs is not None else None
        one = state_bytes(solver)
        stages = costs.stages if costs is not None else RK_STAGES.get(problem.config.method.rk_type, 1)
        available = self.available(solver)
        if steps is None:  # adaptive, first call: keep graphs within the budget, store every state
            return KeptGraphs(graph_bytes=available // 2)
        if costs is not None and steps * (one + costs.graph_bytes_per_step) <= available:
            return KeptGraphs()
        every_stage = steps * (1 + stages) * one
        if every_stage < available:
            return KeptGraphs(graph_bytes=available - every_stage)
        per_checkpoint = 2 * one if problem.config.method.adaptive else one  # FSAL: a derivative each
        return BinomialCheckpoints(max(1, available // per_checkpoint), self.checkpoint_graphs)

    def available(self, solver: Solver) -> int:
        """Bytes left for graphs and states: the budget less the solver's own vectors (its TS's work
        and adjoint vectors, :attr:`pnode.solver.Solver.held_bytes`), which every strategy needs."""
        return max(0, self.budget - solver.held_bytes)

    def forward(self, solver: Solver, problem, rhs, y0: torch.Tensor) -> Forward:
        strategy = self.choose(solver, problem)
        forward = strategy.forward(solver, problem, rhs, y0)
        forward.extra["strategy"] = strategy
        forward.stats.budget_bytes = self.budget
        forward.stats.solver_bytes = solver.held_bytes
        graphs = forward.graphs
        if graphs is not None and graphs.built and forward.record.steps:
            solver.measured_costs = MeasuredCosts(graphs.built_bytes / forward.record.steps,
                                                  forward.record.stages or 1, forward.record.steps)
        return forward

    def backward(self, solver: Solver, forward: Forward, grad_outputs: torch.Tensor) -> Gradients:
        return forward.extra["strategy"].backward(solver, forward, grad_outputs)
