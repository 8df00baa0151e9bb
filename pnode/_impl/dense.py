"""Dense output: ``odeint_dense``, the solution anywhere in a span from one solve.

torchdiffeq's ``odeint_dense(func, y0, t0, t1)`` solves once and returns a function of time. pnode
records, after every accepted step, the state and its derivative at the step's end (the method's
last stage for a first-same-as-last method, else one evaluation of ``f``), and for Dormand-Prince
also the state at the step's middle from PETSc's own fourth-order dense formula (``TSInterpolate``).
Between two step ends the solution is the Hermite interpolant of those values: quartic (fourth
order, as torchdiffeq's dopri5 dense output) where the middle is known, cubic (third order) else.

The interpolant is built outside autograd (from PETSc's vectors), so it is not differentiable; a
backward pass through it raises an error that says what to use instead (``odeint`` with the times
as outputs, each a step end).
"""

from typing import Callable, List, Optional

import torch

from .._compat import serialized
from .bridge import vec_view
from .problem import check_inputs
from .rhs import RHS
from .solve import solve_forward_with

Tensors = torch.Tensor


@serialized
def odeint_dense(func: Callable, y0: torch.Tensor, t0, t1, *, rtol=1e-7, atol=1e-9, method: Optional[str] = None,
                 options: Optional[dict] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Solve ``dy/dt = func(t, y)`` from ``y(t0) = y0`` to ``t1`` once; return ``y`` as a function of ``t``.

    torchdiffeq's ``odeint_dense``. The steps are the adaptive (or fixed) steps of ``method`` over
    ``[t0, t1]``; see the module docstring for the interpolant between them.

    Args:
        func, y0, rtol, atol, method, options: as in :func:`pnode.odeint` (``y0`` a tensor of any shape).
        t0, t1: the span, numbers or 0-dim tensors (``t1 < t0`` integrates backwards).

    Returns:
        ``dense(t)``: for a tensor ``t`` of times in the span (any shape), the solution there, shape
        ``(*t.shape, *y0.shape)``, dtype and device of ``y0``. Not differentiable (a backward pass
        through it raises).

    Raises:
        pnode.InputError: bad arguments (as :func:`pnode.odeint`).
        pnode.SolverError: the solve could not reach ``t1``.
    """
    t = torch.stack([torch.as_tensor(t0, dtype=torch.float64).reshape(()),
                     torch.as_tensor(t1, dtype=torch.float64).reshape(())])
    with torch.no_grad():
        problem = check_inputs(func, y0.detach(), t, rtol, atol, method, options, None)
        rhs = problem.rhs(())
        recorder = DenseRecorder(rhs, problem.config.method.fsal, problem.config.method.dense_midpoint)
        solve_forward_with(problem, rhs, recorder)
    watched = tuple(x for x in (y0, *_parameters(func)) if isinstance(x, torch.Tensor) and x.requires_grad)
    return DenseOutput(recorder, problem.direction, problem.layout.shapes[0], y0.dtype, y0.device, watched)


def _parameters(func) -> tuple:
    return tuple(func.parameters()) if isinstance(func, torch.nn.Module) else ()


class DenseRecorder:
    """Collects each accepted step's end (time, state, derivative) and, where PETSc has a dense
    formula of higher order, its middle state (see the module docstring)."""

    def __init__(self, rhs: RHS, fsal: bool, midpoint: bool):
        self.rhs = rhs
        self.fsal = fsal
        self.midpoint = midpoint
        self.taus: List[float] = []
        self.states: List[torch.Tensor] = []
        self.derivatives: List[torch.Tensor] = []
        self.middles: List[torch.Tensor] = []
        self._evaluator = None
        self._work = None

    def start(self, evaluator, tau0: float, y0: torch.Tensor, solution) -> None:
        """The initial point; ``evaluator`` evaluates the solve's stages, ``solution`` is its state Vec."""
        self._evaluator = evaluator
        self._work = solution.duplicate() if self.midpoint else None
        self._add(tau0, y0.clone(), self.rhs.evaluate(tau0, y0).to(y0))

    def after_step(self, ts) -> None:
        """After an accepted step (PETSc's post-step)."""
        tau, u = ts.getTime(), vec_view(ts.getSolution())
        last = self._evaluator.last_value_at(tau) if self.fsal else None
        derivative = last if last is not None else self.rhs.evaluate(tau, u)
        if self.midpoint:
            ts.interpolate(0.5 * (tau + self.taus[-1]), self._work)
            self.middles.append(vec_view(self._work).clone())
        self._add(tau, u.clone(), derivative.to(u).clone())

    def _add(self, tau: float, state: torch.Tensor, derivative: torch.Tensor) -> None:
        self.taus.append(tau)
        self.states.append(state)
        self.derivatives.append(derivative)

    def close(self) -> None:
        if self._work is not None:
            self._work.destroy()
            self._work = None


class DenseOutput:
    """The solution of one :func:`odeint_dense` call as a function of time (see the module docstring)."""

    def __init__(self, recorder: DenseRecorder, direction: float, shape: torch.Size, dtype: torch.dtype,
                 device: torch.device, watched: tuple):
        self.taus = torch.tensor(recorder.taus, dtype=torch.float64)
        self.states = torch.stack(recorder.states)
        self.derivatives = torch.stack(recorder.derivatives)
        self.middles = torch.stack(recorder.middles) if recorder.middles else None
        self.direction = direction
        self.shape, self.dtype, self.device = shape, dtype, device
        self.watched = watched

    def __call__(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        taus = self.direction * t.detach().to("cpu", torch.float64).reshape(-1)
        span = (float(self.taus[0]), float(self.taus[-1]))
        slack = 1e-12 * max(1.0, abs(span[0]), abs(span[1]))
        if bool((taus < span[0] - slack).any()) or bool((taus > span[1] + slack).any()):
            lo, hi = sorted((self.direction * span[0] + 0.0, self.direction * span[1] + 0.0))  # no -0
            raise ValueError(f"odeint_dense's solution covers [{lo:.6g}, {hi:.6g}]; got times outside it")
        step = torch.clamp(torch.searchsorted(self.taus, taus, right=True) - 1, 0, len(self.taus) - 2)
        start, end = self.taus[step], self.taus[step + 1]
        length = (end - start).unsqueeze(1).to(self.states.device)  # the states are where PETSc kept them
        theta = ((taus - start) / (end - start)).unsqueeze(1).to(self.states.device)
        values = self._hermite(step, theta, length)
        values = values.reshape(*t.shape, *self.shape).to(device=self.device, dtype=self.dtype)
        if self.watched and torch.is_grad_enabled():
            return _NotDifferentiable.apply(values, *self.watched)
        return values

    def _hermite(self, step: torch.Tensor, theta: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """The Hermite interpolant of each query's step at ``theta`` in [0, 1] (rows: queries)."""
        y0, y1 = self.states[step], self.states[step + 1]
        f0, f1 = self.derivatives[step] * length, self.derivatives[step + 1] * length
        t2, t3 = theta * theta, theta * theta * theta
        if self.middles is None:
            return (2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + theta) * f0 + (3 * t2 - 2 * t3) * y1 + (t3 - t2) * f1
        # the quartic through y0, y(1/2), y1 with slopes f0, f1: the cubic Hermite plus the multiple of
        # theta^2 (1 - theta)^2 that meets the middle value
        cubic = (2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + theta) * f0 + (3 * t2 - 2 * t3) * y1 + (t3 - t2) * f1
        cubic_middle = 0.5 * (y0 + y1) + 0.125 * (f0 - f1)
        bump = t2 * (1 - theta) * (1 - theta)
        return cubic + 16 * bump * (self.middles[step] - cubic_middle)


class _NotDifferentiable(torch.autograd.Function):
    """Passes values through; a backward pass through them raises (the interpolant has no graph)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, *watched):
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("odeint_dense's solution is not differentiable: its interpolant is built from PETSc's "
                           "vectors outside autograd. For gradients at given times, solve for them as outputs, "
                           "each a step end: pnode.odeint(func, y0, torch.stack([t0, *times])) (or odeint_adjoint)")

