"""Adjoint strategies: how a forward pass keeps what its discrete adjoint needs, and how it is reversed.

Every strategy gives the same gradients (PETSc's TSAdjoint of the steps taken); they differ in what
they hold between the forward and the backward pass, and so in memory and time:

* :class:`KeptGraphs` (``adjoint='graphs'``): every stage evaluation keeps its autograd graph and
  the adjoint's vector-Jacobian products use it; f is never evaluated again. PETSc's trajectory keeps
  the states only (it re-takes a step to recover its stages, served from the kept graphs' outputs).
  Near backprop's time and memory.
* :class:`StoredStates` (``adjoint='states'``, the default): PETSc keeps every step's state and
  stages; the adjoint evaluates f once more at each stage for its VJP. A fraction of backprop's
  memory, at about torchdiffeq's adjoint's time.
* :class:`BinomialCheckpoints` (``checkpoints=K``): at most K states held, the rest recomputed
  with the binomial (Revolve) schedule (:mod:`pnode._impl.checkpoint`). Memory flat in the step count.
* :class:`MemoryBudget` (``memory_budget='2GB'``): picks among these per call from measured costs,
  keeping graphs while they fit, then states, then checkpoints.

The interface is :class:`Strategy` (each a sibling, no shared mode): ``forward(solver, problem, rhs,
y0) -> Forward`` runs the forward pass on a checked-out :class:`pnode._impl.solver.Solver` with the call's
right-hand side; ``backward(solver, forward, grad_outputs) -> (grad_y0, adjoint_before_first_output,
grad_params)`` runs its adjoint from what :class:`Forward` carries (the record, the right-hand side,
graphs or checkpoints). Implicit methods keep no graphs (each stage is a Newton solve):
``Strategy.for_solver`` turns kept graphs into :class:`StoredStates` on an implicit TS.
"""

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch

from .bridge import petsc_dtype
from .checkpoint import CheckpointedAdjoint, CheckpointStore, planned_checkpoints
from .evaluation import GraphStore, Linearizer
from .rhs import RHS
from .schedule import ForwardRecord, expected_steps
from .solver import ForwardPlan, Solver

Gradients = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


@dataclass
class AdjointStats:
    """What a strategy chose and held for one call (read after it, e.g. ``ODEBlock.stats.adjoint``).

    Attributes:
        strategy: ``'graphs'``, ``'states'`` or ``'checkpoints'``.
        steps: steps the forward pass took.
        graphs_kept: stage graphs kept for the adjoint (all of them: ``steps * stages``).
        graph_bytes: bytes those graphs held (saved activations, stage inputs and outputs).
        states_stored: steps whose state PETSc's trajectory (or the checkpoint store) kept.
        stage_states: stage vectors the trajectory kept beside those states (0: states only).
        stored_bytes: bytes of those states and stages.
        checkpoints: K of a checkpointed pass (None otherwise).
        recomputed_steps: steps re-taken to reach checkpoints in the backward pass.
        budget_bytes: the memory budget the choice was made under (None without one).
        solver_bytes: bytes of the solver's own PETSc vectors, which a budget counts too.
    """

    strategy: str
    steps: int = 0
    graphs_kept: int = 0
    graph_bytes: int = 0
    states_stored: int = 0
    stage_states: int = 0
    stored_bytes: int = 0
    checkpoints: Optional[int] = None
    recomputed_steps: int = 0
    budget_bytes: Optional[int] = None
    solver_bytes: int = 0

    @property
    def held_bytes(self) -> int:
        return self.graph_bytes + self.stored_bytes


@dataclass
class Forward:
    """What a forward pass leaves for its backward pass.

    Attributes:
        record: the forward record (outputs, steps, stage times).
        stats: what the strategy chose and held.
        rhs: the call's right-hand side (the adjoint linearises it).
        graphs: kept stage graphs, or None.
        store: the checkpointed states, or None.
        solution_only: PETSc's trajectory holds states only (it re-takes a step for its stages).
        steps_with_graphs: steps whose stages kept graphs (kept graphs; None otherwise).
        step_graph_bytes: bytes of the graphs one re-taken step built (checkpoints, after the
            backward pass; None otherwise).
        strategy: the strategy whose backward pass reverses this one (the one that ran it, or the
            memory budget that chose it).
        chosen: the strategy a memory budget chose and ran (its backward pass runs it), or None.
    """

    record: ForwardRecord
    stats: AdjointStats
    rhs: RHS
    strategy: "Strategy"
    graphs: Optional[GraphStore] = None
    store: Optional[CheckpointStore] = None
    solution_only: bool = False
    steps_with_graphs: Optional[int] = None
    step_graph_bytes: Optional[int] = None
    chosen: Optional["Strategy"] = None


class Strategy(Protocol):
    """How a forward pass keeps what its adjoint needs, and how that adjoint runs (see the module docstring)."""

    name: str

    def for_solver(self, solver: Solver) -> "Strategy":
        """The strategy that runs on ``solver``: this one, or the sibling it stands for there (kept
        graphs store states for an implicit method, whose stages are Newton solves)."""

    def forward(self, solver: Solver, problem, rhs: RHS, y0: torch.Tensor) -> Forward:
        """Run the forward pass of ``problem`` on ``solver`` (checked out) from ``y0`` (flat, PETSc dtype)."""

    def backward(self, solver: Solver, forward: Forward, grad_outputs: torch.Tensor) -> Gradients:
        """Run the adjoint of ``forward``: ``(grad_y0, adjoint_before_first_output, grad_params)``."""


def state_bytes(solver: Solver) -> int:
    """Bytes of one state-sized PETSc vector on this rank (without reading it: a CUDA Vec's ``getArray``
    would copy it to the host)."""
    return solver.solution.getLocalSize() * petsc_dtype().itemsize


def adjoint_over_outputs(solver: Solver, record: ForwardRecord, grad_outputs: torch.Tensor,
                         linearizer: Linearizer, cached: Optional[GraphStore] = None) -> Gradients:
    """TSAdjoint back through a recorded trajectory, output interval by output interval, adding each
    output's cotangent at its step. Returns ``(grad_y0, adjoint_before_first_output, grad_params)``."""
    # with a single output time there is no step: its cotangent is added once, below
    solver.begin_adjoint(grad_outputs[-1] if len(record.taus) > 1 else torch.zeros_like(grad_outputs[0]))
    for i in range(len(record.taus) - 1, 0, -1):
        solver.adjoint_steps(record.step_of_output[i] - record.step_of_output[i - 1], linearizer, cached)
        if i > 1:
            solver.add_to_adjoint_state(grad_outputs[i - 1])
    before_first = solver.adjoint_state_tensor()
    return before_first + grad_outputs[0], before_first, solver.param_gradient_tensor()


class StoredStates:
    """PETSc's trajectory keeps every state and stage; the adjoint re-evaluates f for each VJP."""

    name = "states"

    def for_solver(self, solver: Solver) -> Strategy:
        return self

    def forward(self, solver: Solver, problem, rhs, y0: torch.Tensor) -> Forward:
        record = solver.forward(rhs, problem.span, y0, ForwardPlan(trajectory=True, adjoint=True))
        stages = record.stages or 1
        stats = AdjointStats("states", steps=record.steps, states_stored=record.steps,
                             stage_states=record.steps * stages,
                             stored_bytes=record.steps * (1 + stages) * state_bytes(solver))
        return Forward(record, stats, rhs, self)

    def backward(self, solver: Solver, forward: Forward, grad_outputs: torch.Tensor) -> Gradients:
        linearizer = Linearizer(forward.rhs, solver.explicit, None, forward.record.stage_times)
        return adjoint_over_outputs(solver, forward.record, grad_outputs, linearizer)


# Largest state (bytes on this rank) whose stages the kept-graphs trajectory stores: below it a
# stage's copy costs less than PETSc's re-take of the stage (a Python callback and a graph lookup).
STORED_STAGES_BYTES = 256 * 1024


class KeptGraphs:
    """Every stage keeps its graph for the adjoint's VJPs; PETSc's trajectory keeps states only (for
    states up to :data:`STORED_STAGES_BYTES`, states and stages).

    Args:
        graph_bytes: keep at most this many bytes of graphs (the latest ones: the adjoint uses
            them first), storing every stage in the trajectory for the rest; None: all graphs,
            states only in the trajectory.
        graph_steps: with ``graph_bytes``, when the step count and a step's graphs are known in
            advance: build graphs in the last ``graph_steps`` steps only (the others would be
            dropped); None: build every graph and drop the oldest beyond ``graph_bytes``.
    """

    name = "graphs"

    def __init__(self, graph_bytes: Optional[int] = None, graph_steps: Optional[int] = None):
        self.graph_bytes = graph_bytes
        self.graph_steps = graph_steps

    def for_solver(self, solver: Solver) -> Strategy:
        """Stored states on an implicit TS (method, or ``-ts_type`` on the command line): a stage is a
        Newton solve, whose graph would hold every iteration; ``stats.adjoint.strategy`` says so."""
        return self if solver.explicit else StoredStates()

    def forward(self, solver: Solver, problem, rhs, y0: torch.Tensor) -> Forward:
        if not solver.explicit:
            raise ValueError(f"kept graphs need an explicit method, not TS {solver.ts_type}: use for_solver()")
        # With every graph kept, a trajectory of states alone suffices: PETSc re-takes each step to
        # recover its stages, its evaluations served by the kept graphs. For small states a
        # re-taken stage (a callback, a lookup of its graph by state) costs more than copying the
        # stages in and out of the trajectory.
        solution_only = self.graph_bytes is None and state_bytes(solver) > STORED_STAGES_BYTES
        # with every stage stored, the adjoint asks at exact copies of the forward's stages
        # a budget drops graphs: then only a graph at its own state is the right one (see GraphStore)
        graphs = GraphStore(max_bytes=self.graph_bytes, exact=self.graph_bytes is not None)
        first = 0 if self.graph_steps is None else max(0, (expected_steps(problem.config, problem.taus) or 0)
                                                        - self.graph_steps)
        plan = ForwardPlan(trajectory=True, solution_only=solution_only, graphs=graphs, graphs_from_step=first,
                           adjoint=True)
        record = solver.forward(rhs, problem.span, y0, plan)
        stages = 0 if solution_only else record.stages or 1
        stats = AdjointStats("graphs", steps=record.steps, graphs_kept=len(graphs), graph_bytes=graphs.held_bytes,
                             states_stored=record.steps, stage_states=record.steps * stages,
                             stored_bytes=record.steps * (1 + stages) * state_bytes(solver))
        return Forward(record, stats, rhs, self, graphs=graphs, solution_only=solution_only,
                       steps_with_graphs=max(1, record.steps - first))

    def backward(self, solver: Solver, forward: Forward, grad_outputs: torch.Tensor) -> Gradients:
        linearizer = Linearizer(forward.rhs, True, forward.graphs, forward.record.stage_times)
        cached = forward.graphs if forward.solution_only else None
        try:
            return adjoint_over_outputs(solver, forward.record, grad_outputs, linearizer, cached)
        finally:
            forward.graphs.clear()


class BinomialCheckpoints:
    """At most ``checkpoints`` states held; the backward pass recomputes the rest (binomial schedule).

    Args:
        checkpoints: K >= 1.
        graphs: stage graphs of a re-taken step kept for its adjoint (None: all; n: the last n).
    """

    name = "checkpoints"

    def for_solver(self, solver: Solver) -> Strategy:
        return self

    def __init__(self, checkpoints: int, graphs: Optional[int] = None):
        self.checkpoints = checkpoints
        self.graphs = graphs

    def store_for(self, problem) -> CheckpointStore:
        """The binomial schedule's states when the step count is known (fixed steps), else up to
        K - 1 states spread evenly."""
        steps = expected_steps(problem.config, problem.taus)
        if steps is None:
            return CheckpointStore(self.checkpoints - 1)
        return CheckpointStore(self.checkpoints, planned=planned_checkpoints(steps, self.checkpoints))

    def forward(self, solver: Solver, problem, rhs, y0: torch.Tensor) -> Forward:
        store = self.store_for(problem)
        record = solver.forward(rhs, problem.span, y0, ForwardPlan(store=store, adjoint=True))
        stats = AdjointStats("checkpoints", steps=record.steps, checkpoints=self.checkpoints,
                             states_stored=len(store.states),
                             stored_bytes=(len(store.states) + len(store.derivatives)) * state_bytes(solver))
        return Forward(record, stats, rhs, self, store=store)

    def backward(self, solver: Solver, forward: Forward, grad_outputs: torch.Tensor) -> Gradients:
        adjoint = CheckpointedAdjoint(solver, forward.rhs, self.checkpoints, self.graphs)
        result = adjoint.run(forward.record, forward.store, grad_outputs)
        forward.stats.recomputed_steps = adjoint.advanced_steps
        forward.step_graph_bytes = adjoint.step_graph_bytes
        return result
