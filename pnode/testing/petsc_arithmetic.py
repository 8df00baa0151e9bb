"""A reference in PETSc's own arithmetic: explicit RK steps rounded exactly as ``TSStep_RK`` rounds them.

On a single-precision PETSc, pnode's forward pass sums stages in float32 in PETSc's order; a
torch reference that summed differently would round differently and, through the ODE-Net block's
ReLUs, give gradients that differ by 1e-4 without either being wrong. :func:`petsc_rk_reference`
repeats PETSc's sums (:func:`petsc_maxpy`) with PETSc's own tableau (:func:`petsc_tableau`) over
the steps a forward solve recorded (:func:`forward_record_of`), so autograd through it is "backprop
through the same steps in the same arithmetic".
"""

from typing import Callable, Sequence

import torch

from pnode._impl.tableaus import petsc_tableau

__all__ = ["petsc_tableau", "petsc_maxpy", "petsc_rk_reference", "forward_record_of"]


def petsc_maxpy(y: torch.Tensor, weights: Sequence[torch.Tensor], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    """PETSc's ``VecMAXPY(y, n, w, k)`` as it rounds: the first ``n % 4`` terms summed left to right and
    added to ``y``, then each group of four the same way (its unrolled AXPY kernels)."""
    n = len(weights)
    first = n % 4
    groups = ([range(first)] if first else []) + [range(j, j + 4) for j in range(first, n, 4)]
    for group in groups:
        terms = [weights[j] * ks[j] for j in group]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        y = y + total
    return y


def petsc_rk_reference(func: Callable, y0: torch.Tensor, times: Sequence[float], sizes: Sequence[float],
                       tableau: tuple) -> torch.Tensor:
    """The explicit RK steps of PETSc's ``TSStep_RK`` in its own arithmetic, differentiable.

    Step ``n`` starts at ``times[n]`` with PETSc's own size ``sizes[n]``; stage ``i`` is
    ``y + sum_j (h a_ij) k_j`` summed as :func:`petsc_maxpy`, at time ``t + h c_i``, every product
    and sum rounded to PETSc's real type (the tableau's dtype; ``y0`` must be of it too) as PETSc
    rounds it; an FSAL method's first stage after the first step is the previous step's last. Its
    forward pass equals pnode's bit for bit on either precision (``tests/test_precision.py``).
    """
    a, b, c, fsal = tableau
    real = a.dtype.type
    y, last = y0, None
    for t, h in zip(times, sizes):
        t, h = real(t), real(h)
        ks = []
        for i in range(len(b)):
            weights = [torch.tensor(real(h * a[i, j])) for j in range(i)]
            stage = petsc_maxpy(y, weights, ks)
            if i == 0 and fsal and last is not None:
                ks.append(last)
            else:
                ks.append(func(torch.tensor(real(t + real(h * c[i]))), stage))
        y = petsc_maxpy(y, [torch.tensor(real(h * bj)) for bj in b], ks)
        last = ks[-1]
    return y


def forward_record_of(func, y0: torch.Tensor, method: str, options, rtol: float, atol: float, read_ts=None):
    """pnode's forward solve of ``func`` from ``y0`` over t = [0, 1]: its ``ForwardRecord`` (step times
    and sizes), and what ``read_ts(ts)`` reads from its TS after the solve (None without one)."""
    from pnode._impl.adjoint import release_solver, solve_forward
    from pnode._impl.problem import check_inputs

    problem = check_inputs(func, y0, torch.tensor([0.0, 1.0], dtype=y0.dtype), rtol, atol, method, options, None)
    key, solver, record = solve_forward(problem, (), record=False)
    try:
        return record, (read_ts(solver.ts) if read_ts is not None else None)
    finally:
        release_solver(key, solver)
