"""Solving a canonical :class:`pnode._impl.problem.Problem`: the core that every entry point shares.

:func:`solve` returns the solution at every output time, differentiable (through
:class:`pnode._impl.adjoint.AdjointSolve`, by the problem's adjoint strategy) or not; integrations with
prescribed jumps or step times are split into chained solves (:mod:`pnode._impl.timeplan`).
"""

import dataclasses

import numpy as np
import torch

from ..distributed import local_sizes
from .adjoint import AdjointSolve, solve_forward
from .bridge import stream_order, to_petsc
from .pool import acquire_solver, release_solver
from .problem import Problem
from .rhs import RHS
from .solver import ForwardPlan
from .timeplan import segments


def solve(problem: Problem, params, differentiable: bool) -> torch.Tensor:
    """The solution at every output time, ``(len(t), numel)`` in the state's dtype and device.

    An empty state has nothing to integrate (an adaptive controller has no norm to measure it
    with); an integration with prescribed jumps or step times is split into solves
    (:func:`pnode._impl.timeplan.segments`), each starting from the state the previous one ended with
    and with the step size its controller had reached.
    """
    if sum(local_sizes(problem.comm, problem.layout.numel)) == 0:
        return problem.y0_flat.unsqueeze(0).expand(len(problem.t), -1).clone()
    if problem.plan is None:
        return solve_once(problem, params, differentiable)
    outputs = [None] * len(problem.t)
    y0_flat, first_step = problem.y0_flat, None
    pieces = segments(problem.plan, problem.t)
    for k, segment in enumerate(pieces):
        taus = np.ascontiguousarray(problem.direction * segment.t.detach().to("cpu", torch.float64).numpy())
        sides = _jump_sides(taus, problem.direction, k, len(pieces))
        piece = solve_once(dataclasses.replace(problem, y0_flat=y0_flat, t=segment.t, taus=taus, plan=None,
                                               first_step=first_step, jump_sides=sides), params, differentiable)
        # past a jump, the controller goes on with the step it had reached (f is evaluated afresh
        # there); starting over from an estimated first step costs evaluations the jump should save
        first_step = problem.stats.next_step if problem.config.adaptive else None
        for row, value in zip(segment.rows, piece):
            if row >= 0 and outputs[row] is None:
                outputs[row] = value
        y0_flat = piece[-1]
    return torch.stack(outputs)


def _jump_sides(taus: np.ndarray, direction: float, k: int, count: int):
    """The jumps that bound segment ``k`` of ``count`` (PETSc times ``taus``), each with the user time
    towards which its evaluations there move: into the segment."""
    sides = []
    if k > 0:
        sides.append((float(taus[0]), direction * float(taus[-1])))
    if k < count - 1:
        sides.append((float(taus[-1]), direction * float(taus[0])))
    return tuple(sides)


def solve_once(problem: Problem, params, differentiable: bool) -> torch.Tensor:
    """One solve over the problem's output times (or until its event), ``(n_times, numel)``."""
    layout = problem.layout
    if differentiable:
        return AdjointSolve.apply(problem, problem.t, problem.y0_flat, *params)
    key, solver, result = solve_forward(problem, (), record=False)
    problem.stats.record_forward(solver)
    release_solver(key, solver)
    return result.outputs.to(device=layout.device, dtype=layout.dtype)


def solve_forward_with(problem: Problem, rhs: RHS, dense) -> None:
    """A forward solve (nothing recorded for an adjoint) that tells ``dense`` every accepted step
    (:class:`pnode._impl.dense.DenseRecorder`)."""
    key, solver = acquire_solver(problem, 0, False)
    try:
        with stream_order(solver.device):
            solver.forward(rhs, problem.span, to_petsc(problem.y0_flat, solver.device), ForwardPlan(dense=dense))
    finally:
        dense.close()
    problem.stats.record_forward(solver)
    release_solver(key, solver)
