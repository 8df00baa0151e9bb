"""The autograd function: forward through PETSc TS, backward through PETSc TSAdjoint.

The forward pass checks a solver out of the pool (:mod:`pnode._impl.pool`) and runs the problem's adjoint
strategy (:mod:`pnode._impl.strategies`) on it; the backward pass runs the strategy's adjoint and puts
the solver back.
"""

import functools
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .._compat import serialized
from .bridge import petsc_eps, stream_order, to_petsc
from .callbacks import adjoint_step_callbacks, forward_step_callbacks
from .options import without_command_line
from .pool import acquire_solver, release_solver
from .problem import Problem, check_inputs


def solve_forward(problem: Problem, params, record: bool):
    """A forward solve without an adjoint; returns ``(key, solver, ForwardRecord)``, the solver checked out."""
    key, solver = acquire_solver(problem, 0, record)
    rhs = problem.rhs(params)
    # on error the solver is dropped, not pooled
    with forward_step_callbacks(problem.callbacks, solver), stream_order(solver.device):
        return key, solver, solver.forward(rhs, problem.span, to_petsc(problem.y0_flat, solver.device))


class AdjointSolve(torch.autograd.Function):
    """``outputs = AdjointSolve.apply(problem, t, y0_flat, *params)``: ``(n_times, numel)`` in the user's dtype.

    The solve's record (trajectory, kept graphs or checkpoints) follows torch's rules for saved
    tensors: ``t``, ``y0`` and the parameters are saved for backward, so torch itself refuses a
    backward pass through a freed graph or through inputs modified in place. A backward pass that
    frees the graph frees the record when it ends; one that keeps it (``retain_graph=True``,
    gradcheck, ``autograd.functional.jacobian``) leaves what the next one needs: PETSc's adjoint
    consumes the trajectory (and checkpointing its checkpoints), so the next backward pass solves
    again from the saved inputs, which repeats the forward steps bit for bit, and runs the adjoint
    over that.
    """

    @staticmethod
    def forward(ctx, problem: Problem, t: torch.Tensor, y0_flat: torch.Tensor, *params):
        ctx.save_for_backward(t, y0_flat, *params)
        ctx.problem = problem
        ctx.params = params
        _record_solve(ctx, step_callbacks=True)
        return ctx.outputs.to(device=problem.layout.device, dtype=problem.layout.dtype)

    @staticmethod
    @once_differentiable
    @serialized
    def backward(ctx, grad_outputs: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 - torch raises its own error if an earlier backward pass freed them
        problem: Problem = ctx.problem
        if ctx.pooled is None:  # an earlier backward pass through the retained graph used the record up
            _record_solve(ctx, step_callbacks=False)
        key, solver = ctx.pooled
        ctx.pooled = None
        grad64 = to_petsc(grad_outputs, solver.device)
        with adjoint_step_callbacks(problem.callbacks, solver), stream_order(solver.device):
            grad_y0, before_first, grad_params = ctx.forward.strategy.backward(solver, ctx.forward, grad64)
        problem.stats.adjoint = ctx.forward.stats
        ctx.forward = None
        release_solver(key, solver)
        layout = problem.layout
        grad_t = _time_gradient(ctx, grad64, before_first) if ctx.needs_input_grad[1] else None
        grads = (None, grad_t, grad_y0.to(device=layout.device, dtype=layout.dtype),
                 *_split_params(grad_params, ctx.params))
        if not _graph_retained():
            ctx.problem = ctx.params = ctx.outputs = None
        return grads


def _record_solve(ctx, step_callbacks: bool) -> None:
    """The forward pass that an adjoint runs over, by the problem's strategy, on a checked-out solver."""
    problem: Problem = ctx.problem
    key, solver = acquire_solver(problem, sum(p.numel() for p in ctx.params), True)
    rhs = problem.rhs(ctx.params)
    with forward_step_callbacks(problem.callbacks if step_callbacks else None, solver), stream_order(solver.device):
        strategy = problem.strategy.for_solver(solver)
        forward = strategy.forward(solver, problem, rhs, to_petsc(problem.y0_flat, solver.device))
    problem.stats.record_forward(solver, forward.stats)
    ctx.pooled = (key, solver)
    ctx.forward = forward
    ctx.outputs = forward.record.outputs


def _graph_retained() -> bool:
    """Whether the running backward pass keeps the graph for another one (``retain_graph``/``create_graph``).

    torch exposes this to its own autograd functions only (``torch._C._autograd``); without it the
    record is kept, and freed with the graph.
    """
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


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
            velocity = layout.flatten(problem.func(t[i], y)).to(cotangent.device, torch.float64)
            value = float(torch.dot(cotangent.to(torch.float64), velocity))  # a float32 PETSc's cotangent too
            grad_t[i] = -value if i == 0 else value
    return grad_t.to(device=t.device, dtype=t.dtype)


@functools.lru_cache(maxsize=None)
def zero_weight_param_gradients_ok() -> bool:
    """Whether this PETSc's RK adjoint gets parameter gradients of zero-weight stages right.

    PETSc 3.18's ``TSAdjointStep_RK`` gets ``J_p^T`` wrong for a stage with ``b_i = 0`` (explicit
    midpoint, Dormand-Prince, ...); pnode's own sum (:mod:`pnode._impl.rk_adjoint`) does not, and
    only a PETSc without ``TSRKGetTableau``/``TSGetStages`` leaves the sum to PETSc. Checked once
    per process on ``dy/dt = p y`` with one explicit midpoint step, whose exact discrete derivative
    is ``dy1/dp = h + h^2 p``.
    """
    p = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    h = 0.5
    with without_command_line():  # the probe is a midpoint step, whatever -ts_type the user gave
        problem = check_inputs(lambda t, y: p * y, torch.ones(1, dtype=torch.float64),
                               torch.tensor([0.0, h], dtype=torch.float64), 1e-7, 1e-9, "midpoint", None, None,
                               params=(p,))
        outputs = AdjointSolve.apply(problem, problem.t, problem.y0_flat, p)
        (grad,) = torch.autograd.grad(outputs[-1].sum(), p)
    return abs(float(grad) - (h + h * h * 0.7)) < max(1e-12, 100 * petsc_eps())
