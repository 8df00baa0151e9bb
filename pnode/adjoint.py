"""The autograd function: forward through PETSc TS, backward through PETSc TSAdjoint.

Solvers are pooled by (configuration, sizes, communicator): a forward pass that will be
differentiated takes a solver out of the pool and the matching backward pass puts it back, so two
ODE blocks of the same shape in one network never share a trajectory.
"""

import functools
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .bridge import PETSC_DTYPE, PETSC_EPS, tensor_to_petsc_cpu
from .checkpoint import CheckpointedAdjoint, CheckpointStore, planned_checkpoints
from .distributed import check_consistent, comm_key, local_sizes
from .options import database_fingerprint
from .problem import Problem
from .rhs import RHS
from .solver import Solver, expected_steps

_free_solvers: Dict[tuple, List[Solver]] = defaultdict(list)


def _pool_key(problem: Problem, param_size: int, record: bool) -> tuple:
    return (problem.config, local_sizes(problem.comm, problem.layout.numel), param_size, comm_key(problem.comm),
            record, database_fingerprint())


def acquire_solver(problem: Problem, param_size: int, record: bool) -> Tuple[tuple, Solver]:
    """A solver for ``problem`` from the pool (built on first use); return it with :func:`release_solver`."""
    key = _pool_key(problem, param_size, record)
    check_consistent(problem.comm, "the solve", (problem.config, problem.taus.tobytes(), param_size,
                                                 str(problem.layout.dtype), record))
    pool = _free_solvers[key]
    if pool:
        return key, pool.pop()
    return key, Solver(problem.config, problem.layout.numel, param_size, problem.comm, record)


def release_solver(key: tuple, solver: Solver) -> None:
    solver.detach()
    _free_solvers[key].append(solver)


def solve_forward(problem: Problem, params, record: bool, store: Optional[CheckpointStore] = None):
    """Run the forward solve; returns ``(key, solver, ForwardRecord)`` with the solver still checked out.

    ``record``: the solver can run adjoints; it records the trajectory unless a checkpoint ``store``
    is given (checkpointing later recomputes steps on this same solver, recording one at a time).
    """
    param_size = sum(p.numel() for p in params) if record else 0
    key, solver = acquire_solver(problem, param_size, record)
    rhs = RHS(problem.func, problem.layout, params, problem.direction, problem.counter)
    y0 = tensor_to_petsc_cpu(problem.y0_flat)
    # on error the solver is dropped, not pooled
    result = solver.forward(rhs, problem.taus, y0, store, trajectory=record and store is None)
    return key, solver, result


class AdjointSolve(torch.autograd.Function):
    """``outputs = AdjointSolve.apply(problem, t, y0_flat, *params)``: ``(n_times, numel)`` in the user's dtype."""

    @staticmethod
    def forward(ctx, problem: Problem, t: torch.Tensor, y0_flat: torch.Tensor, *params):
        # With a checkpoint budget the forward TS records no trajectory; the store keeps some states.
        store = _checkpoint_store(problem)
        key, solver, result = solve_forward(problem, params, record=True, store=store)
        ctx.pooled = (key, solver)
        ctx.problem = problem
        ctx.params = params
        ctx.record = result
        ctx.store = store
        ctx.outputs = result.outputs
        return result.outputs.to(device=problem.layout.device, dtype=problem.layout.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_outputs: torch.Tensor):
        problem: Problem = ctx.problem
        if ctx.pooled is None:
            raise RuntimeError("pnode: backward through the same ODE solve twice is not supported; "
                               "run the forward pass again")
        key, solver = ctx.pooled
        ctx.pooled = None
        grad64 = grad_outputs.detach().to(device="cpu", dtype=PETSC_DTYPE)
        if ctx.store is None:
            grad_y0, before_first, grad_params = solver.adjoint(grad64)
        else:
            grad_y0, before_first, grad_params = _checkpointed_adjoint(ctx, solver, grad64)
        release_solver(key, solver)
        layout = problem.layout
        grad_t = _time_gradient(ctx, grad64, before_first) if ctx.needs_input_grad[1] else None
        return (None, grad_t, grad_y0.to(device=layout.device, dtype=layout.dtype),
                *_split_params(grad_params, ctx.params))


def _checkpoint_store(problem: Problem) -> Optional[CheckpointStore]:
    """The store of a checkpointed forward pass: the binomial schedule's states when the step count
    is known (fixed steps), else up to K - 1 states spread evenly; None without a budget."""
    if not problem.checkpoints:
        return None
    steps = expected_steps(problem.config, problem.taus)
    if steps is None:
        return CheckpointStore(problem.checkpoints - 1)
    return CheckpointStore(problem.checkpoints, planned=planned_checkpoints(steps, problem.checkpoints))


def _checkpointed_adjoint(ctx, solver: Solver, grad64: torch.Tensor):
    """The adjoint of a forward solve that kept only a :class:`CheckpointStore` (see pnode.checkpoint).

    The forward pass's solver also recomputes and reverses the steps: one TS, one set of vectors.
    """
    adjoint = CheckpointedAdjoint(solver, ctx.problem.checkpoints, ctx.problem.checkpoint_graphs)
    result = adjoint.run(ctx.record, ctx.store, grad64)  # on error the solver is dropped, not pooled
    ctx.store = ctx.record = None
    return result


def _split_params(flat: Optional[torch.Tensor], params) -> Tuple[Optional[torch.Tensor], ...]:
    if flat is None:
        return tuple(None for _ in params)
    grads, offset = [], 0
    for p in params:
        n = p.numel()
        grads.append(flat[offset:offset + n].view(p.shape).to(device=p.device, dtype=p.dtype))
        offset += n
    return tuple(grads)


def _time_gradient(ctx, grad64: torch.Tensor, before_first: torch.Tensor) -> torch.Tensor:
    """``dL/dt_i = <g_i, f(t_i, y_i)>`` for i >= 1 and ``dL/dt_0 = -<lambda(t_0), f(t_0, y_0)>``.

    These are the derivatives of the exact flow with respect to the output times (as in
    torchdiffeq's adjoint): the solution at ``t_i`` moves with velocity ``f`` when ``t_i`` moves.
    """
    problem: Problem = ctx.problem
    layout = problem.layout
    t = problem.t.detach()
    grad_t = torch.zeros(len(t), dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(t)):
            cotangent = before_first if i == 0 else grad64[i]
            if i > 0 and not bool(cotangent.any()):
                continue
            y = layout.unflatten(ctx.outputs[i].to(device=layout.device, dtype=layout.dtype))
            problem.counter.backward += 1
            velocity = layout.flatten(problem.func(t[i], y)).to("cpu", torch.float64)
            value = torch.dot(cotangent.to(torch.float64), velocity)  # a float32 PETSc's cotangent too
            grad_t[i] = -value if i == 0 else value
    return grad_t.to(device=t.device, dtype=t.dtype)


@functools.lru_cache(maxsize=None)
def zero_weight_param_gradients_ok() -> bool:
    """Whether this PETSc's RK adjoint gets parameter gradients of zero-weight stages right.

    PETSc 3.18's ``TSAdjointStep_RK`` skips ``J_p^T`` for a stage with ``b_i = 0`` (explicit
    midpoint, Dormand-Prince, ...). Checked once per process on ``dy/dt = p y`` with one explicit
    midpoint step, whose exact discrete derivative is ``dy1/dp = h + h^2 p``.
    """
    from .problem import check_inputs

    p = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    h = 0.5
    problem = check_inputs(lambda t, y: p * y, torch.ones(1, dtype=torch.float64),
                           torch.tensor([0.0, h], dtype=torch.float64), 1e-7, 1e-9, "midpoint", None, None,
                           params=(p,))
    outputs = AdjointSolve.apply(problem, problem.t, problem.y0_flat, p)
    (grad,) = torch.autograd.grad(outputs[-1].sum(), p)
    return abs(float(grad) - (h + h * h * 0.7)) < max(1e-12, 100 * PETSC_EPS)
