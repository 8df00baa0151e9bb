#!/usr/bin/env python
"""Core benchmark: pnode's discrete adjoint against autograd through the same steps, and the floor.

For each method (rk4 and dopri5 explicit, cn implicit) on the classic ODE-Net conv block
(batch 32, 64x8x8 state) it measures, in one process and one run:

* gradient error of pnode (w.r.t. y0 and the parameters) against torch autograd through the very
  same steps (for dopri5: the accepted step times pnode took; for cn: each implicit step solved to
  1e-12 by fixed-point iteration inside autograd);
* forward+backward time (median of --repeats) as a ratio to (a) that autograd reference and (b)
  the floor: the bare cost of the same number of RHS evaluations, JVPs, graph builds and VJPs
  that pnode's counters report, timed on their own.

Prints a markdown table; ``--markdown FILE`` also appends it to FILE (BENCHMARKS.md).
"""

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import pnode
from pnode.rhs import EvaluationCounter

DOPRI5_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
DOPRI5_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
            [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
            [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
            [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
DOPRI5_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
RK4 = ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6])


class ConcatConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin + 1, cout, 3, padding=1)

    def forward(self, t, x):
        return self.conv(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))


class ODEFunc(nn.Module):
    """The ODE-Net block: GroupNorm, ReLU, concat-conv, GroupNorm, ReLU, concat-conv, GroupNorm."""

    def __init__(self, dim=64):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(min(32, dim), dim) for _ in range(3))
        self.conv1, self.conv2 = ConcatConv(dim, dim), ConcatConv(dim, dim)

    def forward(self, t, x):
        out = self.conv1(t, torch.relu(self.norm1(x)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


def rk_reference(func, y0, times, tableau):
    c, a, b = tableau
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        h = t1 - t0
        k = []
        for i in range(len(c)):
            yi = y
            for j, aij in enumerate(a[i]):
                if aij:
                    yi = yi + h * aij * k[j]
            k.append(func(torch.tensor(t0 + c[i] * h, dtype=y0.dtype), yi))
        y = y + h * sum(bi * ki for bi, ki in zip(b, k) if bi)
    return y


def cn_reference(func, y0, times, tol=1e-12, max_iter=200):
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        h = t1 - t0
        explicit = y + 0.5 * h * func(torch.tensor(t0, dtype=y0.dtype), y)
        z = y
        for _ in range(max_iter):
            z_new = explicit + 0.5 * h * func(torch.tensor(t1, dtype=y0.dtype), z)
            done = float((z_new - z).norm() / z_new.norm()) < tol
            z = z_new
            if done:
                break
        y = z
    return y


def grid(n_steps):
    return [i / n_steps for i in range(n_steps + 1)]


def run_pnode(func, y0, weights, method, options, rtol, atol):
    counter = EvaluationCounter()
    y0 = y0.detach().requires_grad_(True)
    ys = pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=y0.dtype), method=method,
                              options=options, rtol=rtol, atol=atol, _counter=counter)
    grads = torch.autograd.grad((ys[-1] * weights).sum(), (y0, *func.parameters()))
    return grads, counter


def step_times_of(func, y0, method, options, rtol, atol):
    """The accepted step times of pnode's forward solve (for the same-steps reference)."""
    return forward_record_of(func, y0, method, options, rtol, atol)[0].step_times


def forward_record_of(func, y0, method, options, rtol, atol, read_ts=None):
    """pnode's forward solve over t = [0, 1]: its ForwardRecord (step times and sizes), and what
    ``read_ts(ts)`` reads from its TS after the solve (None without one)."""
    from pnode.adjoint import release_solver, solve_forward
    from pnode.problem import check_inputs

    problem = check_inputs(func, y0, torch.tensor([0.0, 1.0], dtype=y0.dtype), rtol, atol, method,
                           options, None)
    key, solver, record = solve_forward(problem, (), record=False)
    try:
        return record, (read_ts(solver.ts) if read_ts is not None else None)
    finally:
        release_solver(key, solver)


def run_reference(func, y0, weights, method, times):
    y0 = y0.detach().requires_grad_(True)
    if method == "cn":
        y1 = cn_reference(func, y0, times)
    else:
        y1 = rk_reference(func, y0, times, RK4 if method == "rk4" else (DOPRI5_C, DOPRI5_A, DOPRI5_B))
    return torch.autograd.grad((y1 * weights).sum(), (y0, *func.parameters()))


def median_time(fn, repeats):
    fn()  # warm-up (builds and caches PETSc objects)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def floor_time(func, y0, weights, counter: EvaluationCounter, repeats):
    """Bare cost of the evaluations pnode made: f, JVPs, graph builds and VJPs, timed alone."""
    t = torch.tensor(0.5, dtype=y0.dtype)
    params = tuple(func.parameters())

    def work():
        with torch.no_grad():
            for _ in range(counter.forward):
                func(t, y0)
        for _ in range(counter.jvp):
            torch.func.jvp(lambda y: func(t, y), (y0,), (weights,))
        graphs = max(counter.backward, 1)
        vjps_per_graph = counter.vjp / graphs
        for _ in range(counter.backward):
            y = y0.detach().requires_grad_(True)
            out = func(t, y)
            for _ in range(round(vjps_per_graph)):
                torch.autograd.grad(out, (y, *params), weights, retain_graph=True)

    return median_time(work, repeats)


def rel_err(got, want):
    num = sum(float((g - w).norm() ** 2) for g, w in zip(got, want)) ** 0.5
    den = sum(float(w.norm() ** 2) for w in want) ** 0.5
    return num / den


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="fixed steps over [0, 1] for rk4 and cn")
    parser.add_argument("--tol", type=float, default=1e-4, help="rtol = atol of adaptive dopri5")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--methods", default="rk4,dopri5,cn")
    parser.add_argument("--markdown", help="append the table to this file")
    args, _petsc_args = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    func = ODEFunc(args.channels).to(dtype)
    y0 = torch.randn(args.batch, args.channels, args.size, args.size, dtype=dtype)
    weights = torch.randn_like(y0)
    h = 1.0 / args.steps
    rows = []
    for method in args.methods.split(","):
        adaptive = method == "dopri5"
        options = {} if adaptive else {"step_size": h}
        if method == "cn":
            options.update({"ksp_rtol": 1e-10, "snes_rtol": 1e-10, "snes_atol": 1e-14})
        rtol = atol = args.tol
        times = step_times_of(func, y0, method, options, rtol, atol) if adaptive else grid(args.steps)
        grads, counter = run_pnode(func, y0, weights, method, options, rtol, atol)
        ref = run_reference(func, y0, weights, method, times)
        err = rel_err(grads, ref)
        t_pnode = median_time(lambda: run_pnode(func, y0, weights, method, options, rtol, atol), args.repeats)
        t_ref = median_time(lambda: run_reference(func, y0, weights, method, times), args.repeats)
        t_floor = floor_time(func, y0, weights, counter, args.repeats)
        rows.append((method, len(times) - 1, counter, err, t_pnode, t_ref, t_floor))
        print(f"{method}: steps={len(times) - 1} err={err:.2e} pnode={t_pnode:.3f}s autograd={t_ref:.3f}s "
              f"floor={t_floor:.3f}s", file=sys.stderr)
    header = (f"Conv ODE block, batch {args.batch}, state {args.channels}x{args.size}x{args.size}, {args.dtype}, "
              f"torch threads {torch.get_num_threads()}, median of {args.repeats}\n\n"
              "| method | steps | f evals / JVPs (fwd) | graphs / VJPs (bwd) | grad rel. error vs autograd, same steps "
              "| pnode fwd+bwd (s) | autograd same steps (s) | floor (s) | pnode / autograd | pnode / floor |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for method, steps, c, err, tp, tr, tf in rows:
        lines.append(f"| {method} | {steps} | {c.forward} / {c.jvp} | {c.backward} / {c.vjp} | {err:.1e} | "
                     f"{tp:.3f} | {tr:.3f} | {tf:.3f} | {tp / tr:.2f} | {tp / tf:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(f"\n`python scripts/bench_core.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
