"""Gradient references: autograd through the very steps a row's solver took.

* Explicit Runge-Kutta (pnode's ``rk4``, the classic one, and ``dopri5``): the textbook tableaus of
  ``tests/references.py`` stepped over the row's step times (the fixed grid, or the steps pnode's
  adaptive forward solve accepted), differentiated by autograd.
* Implicit theta methods (``cn``: theta = 1/2, the trapezoidal rule; ``beuler``: theta = 1): each
  step ``z = y + h ((1 - theta) f(t0, y) + theta f(t1, z))`` solved tightly by fixed-point
  iteration, and differentiated exactly (implicit function theorem) inside autograd: the gradient
  of the exactly solved step, which pnode's discrete adjoint approaches as its Newton and Krylov
  tolerances shrink.

A reference runs in pnode's arithmetic: on a float64 PETSc pnode sums the steps of a float32 state
in float64 and evaluates the network in float32, so the reference does too (:func:`in_dtype`).
The block's ReLUs make the gradient jump where a pre-activation crosses zero, so a reference that
rounded differently would differ by 1e-5 to 1e-3 without either being wrong.
"""

import importlib.util
import os
from typing import Callable, List, Sequence

import numpy as np
import torch


def _load_test_references():
    """tests/references.py, the one copy of the textbook tableaus (it imports nothing but torch)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "references.py")
    spec = importlib.util.spec_from_file_location("pnode_test_references", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TEST_REFERENCES = _load_test_references()
TABLEAUS, rk_step = _TEST_REFERENCES.TABLEAUS, _TEST_REFERENCES.rk_step

Func = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
THETA = {"cn": 0.5, "beuler": 1.0}
"""The implicit methods a reference exists for, and their theta."""


def petsc_real_dtype() -> torch.dtype:
    """The torch dtype of PETSc's real scalars (float64 for a default build)."""
    from petsc4py import PETSc

    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(PETSc.RealType)]


def in_dtype(func: Func, dtype: torch.dtype) -> Func:
    """``func`` on states of any dtype, evaluated in ``dtype``: each input cast to ``dtype`` on its way
    in, the result cast back to the state's dtype on its way out (what pnode does at its Vecs)."""
    def cast(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return func(torch.as_tensor(t, dtype=dtype), y.to(dtype)).to(y.dtype)
    return cast


def rk_reference(func: Func, y0: torch.Tensor, times: Sequence[float], method: str) -> torch.Tensor:
    """``y(times[-1])`` by explicit RK steps from each time to the next, differentiable."""
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        y = rk_step(func, t0, y, t1 - t0, TABLEAUS[method])
    return y


def fixed_point(update: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, tol: float,
                max_iter: int = 500) -> torch.Tensor:
    """Iterate ``x = update(x)`` until the relative change is below ``tol`` or stalls at round-off.

    Raises:
        RuntimeError: no convergence in ``max_iter`` iterations (the step is too large for a
            fixed-point iteration: ``h theta L >= 1`` for a Lipschitz constant ``L`` of f).
    """
    x, previous = start, float("inf")
    for _ in range(max_iter):
        new = update(x)
        change = float((new - x).norm() / new.norm().clamp_min(1e-300))
        x = new
        if change <= tol or (change >= previous and change < tol**0.5):
            return x
        previous = change
    raise RuntimeError(f"fixed-point iteration of an implicit step did not converge in {max_iter} iterations "
                       f"(relative change {change:.1e}); the step is too large for it")


def theta_step(func: Func, y: torch.Tensor, t0: float, t1: float, theta: float, tol: float) -> torch.Tensor:
    """One theta step from ``y`` at ``t0`` to ``t1``, solved to ``tol``, with its exact derivative.

    The value comes from fixed-point iteration without a graph. Autograd then sees one more
    application ``z = y + h ((1 - theta) f(t0, y) + theta f(t1, z*))``, whose incoming cotangent
    ``g`` a hook replaces by ``u = (I - h theta J(z*))^-T g`` (fixed-point iteration of
    ``u = g + h theta J^T u`` with VJPs): the implicit function theorem's derivative of ``z*``.
    """
    h = t1 - t0
    t_start, t_end = torch.tensor(t0, dtype=y.dtype), torch.tensor(t1, dtype=y.dtype)
    explicit = y + (1 - theta) * h * func(t_start, y) if theta < 1 else y
    with torch.no_grad():
        fixed = explicit.detach()
        solution = fixed_point(lambda z: fixed + theta * h * func(t_end, z), y.detach(), tol)
    solution.requires_grad_(True)
    with torch.enable_grad():
        f_end = func(t_end, solution)
    step = explicit + theta * h * f_end

    def through_solution(g: torch.Tensor) -> torch.Tensor:
        def transpose_update(u: torch.Tensor) -> torch.Tensor:
            return g + theta * h * torch.autograd.grad(f_end, solution, u, retain_graph=True)[0]
        return fixed_point(transpose_update, g, tol)

    if step.requires_grad:
        step.register_hook(through_solution)
    return step


def theta_reference(func: Func, y0: torch.Tensor, times: Sequence[float], method: str) -> torch.Tensor:
    """``y(times[-1])`` by implicit theta steps (``method``: 'cn' or 'beuler'), differentiable.

    Each step is solved to a few ulps of the state's dtype (the fixed-point iteration stops when
    its change stalls at round-off).
    """
    tol = 8 * torch.finfo(y0.dtype).eps
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        y = theta_step(func, y, t0, t1, THETA[method], tol)
    return y


def reference(func: Func, y0: torch.Tensor, times: Sequence[float], method: str) -> torch.Tensor:
    """Autograd through ``method``'s steps between consecutive ``times``."""
    if method in THETA:
        return theta_reference(func, y0, times, method)
    if method in TABLEAUS:
        return rk_reference(func, y0, times, method)
    raise ValueError(f"no reference for method {method!r}; explicit: {sorted(TABLEAUS)}, implicit: {sorted(THETA)}")


def fixed_grid(t_end: float, steps: int) -> List[float]:
    """``steps + 1`` equally spaced times from 0 to ``t_end``."""
    return [t_end * i / steps for i in range(steps + 1)]


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """``||got - want|| / ||want||`` over all the tensors together (float64 sums)."""
    num = sum(float((g.double() - w.double()).norm() ** 2) for g, w in zip(got, want)) ** 0.5
    den = sum(float(w.double().norm() ** 2) for w in want) ** 0.5
    return num / den
