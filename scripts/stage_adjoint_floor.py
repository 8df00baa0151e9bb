#!/usr/bin/env python
"""What a per-stage discrete adjoint costs in torch alone, next to backprop through the same steps.

The workloads are the fixed-cost benchmark's (``benchmarks.fixed_cost``) on 256 states of 2 (float32):
``scale`` is ``f(t, y) = a y``, ``small`` the MLP 2-64-64-2 with tanh; classic RK4 with 50 steps over
[0, 5] (the benchmark's span and step), an MSE loss. Three training steps, timed side by side in one
process:

* ``backprop``: the solve's operations recorded by autograd, one backward pass (what torchdiffeq's
  ``odeint`` does);
* ``kept graphs``: every stage's graph kept, and the backward pass written as the discrete RK
  adjoint (what PETSc's TSAdjoint computes): one ``torch.autograd.grad`` per stage for ``J^T w`` and
  ``J_p^T w`` together, the tableau's recursion in torch (pnode's ``graphs`` strategy);
* ``stored states``: the forward pass evaluates f without graphs and keeps each stage's state; the
  adjoint evaluates f again with its graph at each stage before its ``autograd.grad`` (pnode's
  ``states`` strategy, the default of ``odeint_adjoint``).

Their ratios to backprop are the floors of pnode's two designs on the workload: an engine call per
stage, and for stored states one more evaluation of f per stage, without PETSc's callbacks around
them. All three give the same gradient (printed).
Usage: ``python scripts/stage_adjoint_floor.py [--workload scale|small] [--rounds 3] [--repeats 20]``.
"""

import argparse
import time
from typing import Callable, NamedTuple, Tuple

import torch

A = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))  # classic RK4
B = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


class Problem(NamedTuple):
    f: Callable[[torch.Tensor], torch.Tensor]
    params: Tuple[torch.Tensor, ...]
    y0: torch.Tensor
    target: torch.Tensor
    h: float
    steps: int


def make_problem(workload: str, steps: int, t_end: float = 5.0) -> Problem:
    torch.manual_seed(0)
    if workload == "scale":
        a = torch.nn.Parameter(torch.tensor(-0.5))
        f, params = (lambda y: a * y), (a,)
    else:
        net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                  torch.nn.Linear(64, 2))
        f, params = net, tuple(net.parameters())
    return Problem(f, params, torch.randn(256, 2), torch.randn(256, 2), t_end / steps, steps)


def _stage_input(y, k, i, h):
    return y + h * sum(A[i][j] * k[j] for j in range(i)) if i else y


def backprop(p: Problem) -> Tuple[torch.Tensor, ...]:
    """dL/dparams by one backward pass through every operation of the solve."""
    y = p.y0
    for _ in range(p.steps):
        k = []
        for i in range(4):
            k.append(p.f(_stage_input(y, k, i, p.h)))
        y = y + p.h * sum(B[i] * k[i] for i in range(4))
    return torch.autograd.grad(torch.nn.functional.mse_loss(y, p.target), p.params)


def _forward(p: Problem, keep_graphs: bool):
    """The solve; per step, per stage: (leaf, output) with graphs, or the stage's state without (run
    it without grad mode then)."""
    steps, y = [], p.y0
    for _ in range(p.steps):
        k, kept = [], []
        for i in range(4):
            yi = _stage_input(y, k, i, p.h)
            if keep_graphs:
                leaf = yi.detach().requires_grad_(True)
                out = p.f(leaf)
                kept.append((leaf, out))
                k.append(out.detach())
            else:
                k.append(p.f(yi))
                kept.append(yi)
        y = y + p.h * sum(B[i] * k[i] for i in range(4))
        steps.append(kept)
    return steps, y


def discrete_adjoint(p: Problem, keep_graphs: bool = True) -> Tuple[torch.Tensor, ...]:
    """dL/dparams by the discrete RK adjoint, one engine call per stage (on its kept graph, or on a
    graph evaluated again at the stored stage state)."""
    with torch.set_grad_enabled(keep_graphs):
        steps, y = _forward(p, keep_graphs)
    y_end = y.detach().requires_grad_(True)
    (lam,) = torch.autograd.grad(torch.nn.functional.mse_loss(y_end, p.target), y_end)
    grads = [torch.zeros_like(q) for q in p.params]
    for kept in reversed(steps):
        state_parts = [None] * 4
        for i in reversed(range(4)):
            w = p.h * B[i] * lam + sum(p.h * A[j][i] * state_parts[j] for j in range(i + 1, 4))
            if keep_graphs:
                leaf, out = kept[i]
            else:
                leaf = kept[i].detach().requires_grad_(True)
                with torch.enable_grad():
                    out = p.f(leaf)
            state_parts[i], *param_parts = torch.autograd.grad(out, (leaf,) + p.params, w)
            for g, part in zip(grads, param_parts):
                g.add_(part)
        lam = lam + sum(state_parts)
    return tuple(grads)


def seconds_per_call(fn, args, repeats: int) -> float:
    for _ in range(3):
        fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("scale", "small"), default="scale")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    p = make_problem(args.workload, args.steps)
    first = [float(g.flatten()[0]) for g in (backprop(p)[0], discrete_adjoint(p, True)[0],
                                            discrete_adjoint(p, False)[0])]
    print("dL/dp[0]: backprop {:.10g}, kept graphs {:.10g}, stored states {:.10g}".format(*first))
    print(f"{args.workload}, rk4 with {args.steps} steps")
    print("| round | backprop (ms) | kept graphs (ms) | stored states (ms) | kept graphs × backprop "
          "| stored states × backprop |\n|---|---|---|---|---|---|")
    for r in range(args.rounds):
        t_backprop = seconds_per_call(backprop, (p,), args.repeats)
        t_graphs = seconds_per_call(discrete_adjoint, (p, True), args.repeats)
        t_states = seconds_per_call(discrete_adjoint, (p, False), args.repeats)
        print(f"| {r} | {1e3 * t_backprop:.2f} | {1e3 * t_graphs:.2f} | {1e3 * t_states:.2f} "
              f"| {t_graphs / t_backprop:.2f} | {t_states / t_backprop:.2f} |")


if __name__ == "__main__":
    main()
