#!/usr/bin/env python
"""What a per-stage discrete adjoint costs in torch alone, next to backprop through the same steps.

The workload is the fixed-cost benchmark's ``scale`` row (``benchmarks.fixed_cost``): ``f(t, y) = a y``
on 256 states of 2 (float32), classic RK4 with 50 steps over [0, 1], an MSE loss. Two training
steps, timed side by side in one process:

* ``backprop``: the solve's operations recorded by autograd, one backward pass (what torchdiffeq's
  ``odeint`` does);
* ``per-stage adjoint``: every stage's graph kept, and the backward pass written as the discrete RK
  adjoint (what PETSc's TSAdjoint computes): one ``torch.autograd.grad`` per stage for ``J^T w`` and
  ``J_p^T w`` together, the tableau's recursion in torch.

Their ratio is the floor of pnode's kept-graphs design on this workload: the cost of one autograd
engine call per stage, without PETSc's callbacks around it. Both give the same gradient (printed).
Usage: ``python scripts/stage_adjoint_floor.py [--rounds 3] [--repeats 40]``.
"""

import argparse
import time

import torch

A = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))  # classic RK4
B = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


def make_problem(steps: int):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.tensor(-0.5))
    y0, target = torch.randn(256, 2), torch.randn(256, 2)
    return a, y0, target, 1.0 / steps, steps


def backprop(a, y0, target, h, steps) -> torch.Tensor:
    """dL/da by one backward pass through every operation of the solve."""
    y = y0
    for _ in range(steps):
        k = []
        for i in range(4):
            yi = y + h * sum(A[i][j] * k[j] for j in range(i)) if i else y
            k.append(a * yi)
        y = y + h * sum(B[i] * k[i] for i in range(4))
    (grad,) = torch.autograd.grad(torch.nn.functional.mse_loss(y, target), a)
    return grad


def per_stage_adjoint(a, y0, target, h, steps) -> torch.Tensor:
    """dL/da by the discrete RK adjoint, one engine call per stage on the stage's kept graph."""
    graphs, y = [], y0
    for _ in range(steps):
        k, kept = [], []
        for i in range(4):
            yi = (y + h * sum(A[i][j] * k[j] for j in range(i))) if i else y
            leaf = yi.detach().requires_grad_(True)
            out = a * leaf
            kept.append((leaf, out))
            k.append(out.detach())
        y = y + h * sum(B[i] * k[i] for i in range(4))
        graphs.append(kept)
    y_end = y.requires_grad_(True)
    (lam,) = torch.autograd.grad(torch.nn.functional.mse_loss(y_end, target), y_end)
    grad_a = torch.zeros(())
    for kept in reversed(graphs):
        state_parts = [None] * 4
        for i in reversed(range(4)):
            w = h * B[i] * lam + sum(h * A[j][i] * state_parts[j] for j in range(i + 1, 4))
            leaf, out = kept[i]
            state_parts[i], param_part = torch.autograd.grad(out, (leaf, a), w)
            grad_a = grad_a + param_part
        lam = lam + sum(state_parts)
    return grad_a


def seconds_per_call(fn, args, repeats: int) -> float:
    for _ in range(5):
        fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = make_problem(args.steps)
    g_backprop, g_adjoint = backprop(*problem), per_stage_adjoint(*problem)
    print(f"dL/da: backprop {float(g_backprop):.10g}, per-stage adjoint {float(g_adjoint):.10g}")
    print("| round | backprop (ms) | per-stage adjoint (ms) | ratio |\n|---|---|---|---|")
    for r in range(args.rounds):
        t_backprop = seconds_per_call(backprop, problem, args.repeats)
        t_adjoint = seconds_per_call(per_stage_adjoint, problem, args.repeats)
        print(f"| {r} | {1e3 * t_backprop:.2f} | {1e3 * t_adjoint:.2f} | {t_adjoint / t_backprop:.2f} |")


if __name__ == "__main__":
    main()
