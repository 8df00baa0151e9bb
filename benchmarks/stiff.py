"""Stiff problems: pnode's implicit methods on the classic stiff test set against SciPy, and Newton's cost.

Tables (``--tables``, default all of them):

* ``robertson``: the call a user writes (Robertson, outputs t = 40 and 1e5, rtol 1e-6, atol 1e-10,
  a method and nothing else): the largest relative error of any species at each output time, the
  steps, and the gradient with respect to the rate constants against central finite differences;
* ``set``: Robertson on [0, 1e5] (log-spaced outputs), van der Pol (mu = 1000, [0, 3000]), HIRES and
  OREGO (:mod:`pnode.testing.stiff_problems`) with pnode's implicit methods and SciPy's BDF and
  Radau (exact Jacobians) at each of ``--rtols``: steps, rejected steps, Newton and Krylov
  iterations, evaluations of f, Jacobians built, time, and the error against SciPy's Radau at rtol
  1e-12 (each component relative to its largest value over the output times);
* ``gradients``: the gradient of a loss over every output with respect to each problem's
  parameters (rate constants, mu) at rtol 1e-6, against central finite differences of that
  reference (relative step 1e-4);
* ``newton``: Newton and Krylov iterations per step on Robertson with the block-Jacobian
  preconditioner and without it (matrix-free GMRES);
* ``blocks``: when the block-Jacobian preconditioner pays: a cn training step (fixed steps, forward
  and backward) of an MLP field with stiff linear decay, for sample sizes n and batches B, with
  ``jacobian='blocks'`` and ``'matrix_free'``, against rk4 at the same steps.

Errors are SciPy's and pnode's alike; SciPy's step counts do not include output times (it
interpolates), pnode's do (every output time is a step end). pnode rows that reach
``--max-steps`` stop there and say so. Writes ``stiff.json`` and ``stiff.md`` to ``--out``::

    python -m benchmarks.stiff                                   # all tables, ~30 min on 2 cores
    python -m benchmarks.stiff --tables set --problems hires --rtols 1e-6
    python -m benchmarks.stiff --quick                           # rtol 1e-4, kencarp4 and BDF: a smoke run
"""

import argparse
import json
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import pnode
from benchmarks.cli import machine
from pnode._impl.odeint import odeint_reported
from pnode.testing.stiff_problems import (
    PROBLEMS,
    ROBERTSON,
    StiffProblem,
    reference_solution,
    relative_error,
    scaled_error,
)

F64 = torch.float64
PNODE_METHODS = ("kencarp4", "kencarp5", "kencarp3", "cn", "beuler")
SCIPY_METHODS = ("BDF", "Radau")
TABLES = ("robertson", "set", "gradients", "newton", "blocks")


# ---------------------------------------------------------------------------------------------- solves
def pnode_solve(problem: StiffProblem, method: str, rtol: float, params=None, times=None, atol=None,
                options=None, max_steps: int = 100000):
    """pnode's solution at the output times ``(len(times), n)`` (None if it stopped) and its statistics."""
    k = torch.tensor(problem.params if params is None else params, dtype=F64)
    times = problem.times if times is None else times
    stats = pnode._impl.stats.SolveStats()
    start = time.perf_counter()
    try:
        y = odeint_reported(lambda t, y: problem.f(t, y, k), torch.tensor(problem.y0, dtype=F64),
                         torch.tensor(times, dtype=F64), rtol=rtol, atol=problem.atol(rtol) if atol is None else atol,
                         method=method, options={"max_num_steps": max_steps, **(options or {})}, stats=stats)
        y, message = y.numpy(), ""
    except pnode.SolverError as exc:
        y, message = None, f"stopped at t={exc.t_reached:.4g} ({exc.reason})"
    return y, stats, time.perf_counter() - start, message


def pnode_row(problem: StiffProblem, method: str, rtol: float, reference: np.ndarray, max_steps: int) -> Dict:
    y, stats, seconds, message = pnode_solve(problem, method, rtol, max_steps=max_steps)
    counter = stats.counter
    return {"problem": problem.name, "solver": f"pnode {method}", "rtol": rtol, "steps": stats.steps,
            "rejected": stats.rejected_steps, "newton": stats.newton_iterations, "krylov": stats.krylov_iterations,
            "fevals": counter.forward + counter.jvp, "jacobians": counter.backward, "time_s": seconds,
            "error": None if y is None else scaled_error(y, reference), "note": message}


def scipy_row(problem: StiffProblem, method: str, rtol: float, reference: np.ndarray) -> Dict:
    from scipy.integrate import solve_ivp

    start = time.perf_counter()
    sol = solve_ivp(problem.f_np, (problem.times[0], problem.times[-1]), np.asarray(problem.y0, dtype=np.float64),
                    method=method, rtol=rtol, atol=problem.atol(rtol), args=(np.asarray(problem.params),),
                    jac=problem.jac_np, dense_output=True)
    seconds = time.perf_counter() - start
    y = sol.sol(np.asarray(problem.times)).T
    rejected = None  # SciPy does not count them
    return {"problem": problem.name, "solver": f"SciPy {method}", "rtol": rtol, "steps": len(sol.t) - 1,
            "rejected": rejected, "newton": None, "krylov": None, "fevals": sol.nfev, "jacobians": sol.njev,
            "time_s": seconds, "error": scaled_error(y, reference), "note": f"{sol.nlu} LU"}


# ---------------------------------------------------------------------------------------------- gradients
def weights_of(reference: np.ndarray) -> np.ndarray:
    """The loss ``sum_k sum_i y_i(t_k) / range_i``: every component counts at its own scale."""
    return 1.0 / np.maximum(np.abs(reference[1:]).max(axis=0), 1e-300)


def pnode_gradient(problem: StiffProblem, method: str, rtol: float, weights: np.ndarray, times=None, atol=None):
    k = torch.tensor(problem.params, dtype=F64, requires_grad=True)
    times = problem.times if times is None else times
    y = pnode.odeint_adjoint(lambda t, y: problem.f(t, y, k), torch.tensor(problem.y0, dtype=F64),
                             torch.tensor(times, dtype=F64), rtol=rtol,
                             atol=problem.atol(rtol) if atol is None else atol, method=method, adjoint_params=(k,))
    (grad,) = torch.autograd.grad((y[1:] * torch.as_tensor(weights)).sum(), k)
    return grad.numpy()


def finite_differences(problem: StiffProblem, weights: np.ndarray, times=None, step: float = 1e-4) -> np.ndarray:
    """Central differences of the loss of SciPy's Radau at rtol 1e-12, relative step ``step``."""
    times = problem.times if times is None else times
    case = StiffProblem(**{**problem.__dict__, "times": tuple(times)})

    def loss(params):
        return float((reference_solution(case, params)[1:] * weights).sum())

    grads = []
    for i, value in enumerate(problem.params):
        up, down = list(problem.params), list(problem.params)
        up[i], down[i] = value * (1 + step), value * (1 - step)
        grads.append((loss(up) - loss(down)) / (2 * step * value))
    return np.asarray(grads)


def gradient_error(grad: np.ndarray, fd: np.ndarray) -> float:
    """The largest ``|g_i - fd_i| / |fd_i|`` over the parameters."""
    return float((np.abs(grad - fd) / np.maximum(np.abs(fd), 1e-300)).max())


def sensitivity_error(grad: np.ndarray, fd: np.ndarray, params: Sequence[float]) -> float:
    """``max_i |p_i (g_i - fd_i)| / max_i |p_i fd_i|``: the errors of the sensitivities to relative changes
    of the parameters, against the largest of them (a parameter the loss hardly depends on has a
    finite difference made of the reference's round-off, which a per-parameter ratio would divide by)."""
    scale = np.abs(np.asarray(params))
    return float((np.abs(grad - fd) * scale).max() / max((np.abs(fd) * scale).max(), 1e-300))


# ---------------------------------------------------------------------------------------------- tables
def robertson_table(methods: Sequence[str]) -> List[Dict]:
    times = (0.0, 40.0, 1e5)
    case = StiffProblem(**{**ROBERTSON.__dict__, "times": times})
    reference = reference_solution(case)
    weights = weights_of(reference)
    fd = finite_differences(ROBERTSON, weights, times)
    rows = []
    for method in methods:
        y, stats, seconds, message = pnode_solve(ROBERTSON, method, 1e-6, times=times, atol=1e-10)
        errors = relative_error(y, reference).max(axis=1) if y is not None else [None, None]
        grad = pnode_gradient(ROBERTSON, method, 1e-6, weights, times, atol=1e-10)
        rows.append({"method": method, "steps": stats.steps, "rejected": stats.rejected_steps,
                     "error_40": errors[0], "error_1e5": errors[1], "grad_error": gradient_error(grad, fd),
                     "time_s": seconds, "note": message})
    return rows


def set_table(problems: Sequence[str], methods: Sequence[str], scipy_methods: Sequence[str], rtols: Sequence[float],
              max_steps: int) -> List[Dict]:
    rows = []
    for name in problems:
        problem = PROBLEMS[name]
        reference = reference_solution(problem)
        for rtol in rtols:
            for method in scipy_methods:
                rows.append(scipy_row(problem, method, rtol, reference))
                print(_progress(rows[-1]), file=sys.stderr, flush=True)
            for method in methods:
                rows.append(pnode_row(problem, method, rtol, reference, max_steps))
                print(_progress(rows[-1]), file=sys.stderr, flush=True)
    return rows


def gradient_table(problems: Sequence[str], methods: Sequence[str], rtol: float) -> List[Dict]:
    rows = []
    for name in problems:
        problem = PROBLEMS[name]
        weights = weights_of(reference_solution(problem))
        fd = finite_differences(problem, weights)
        for method in methods:
            start = time.perf_counter()
            grad = pnode_gradient(problem, method, rtol, weights)
            rows.append({"problem": name, "method": method, "rtol": rtol, "params": len(problem.params),
                         "grad_error": gradient_error(grad, fd),
                         "sensitivity_error": sensitivity_error(grad, fd, problem.params),
                         "time_s": time.perf_counter() - start})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def newton_table(methods: Sequence[str]) -> List[Dict]:
    rows = []
    for method in methods:
        for jacobian in ("blocks", "matrix_free"):
            _, stats, seconds, message = pnode_solve(ROBERTSON, method, 1e-6, options={"jacobian": jacobian})
            attempts = stats.steps + stats.rejected_steps
            rows.append({"method": method, "jacobian": jacobian, "steps": stats.steps, "attempts": attempts,
                         "newton_per_step": stats.newton_iterations / max(attempts, 1),
                         "krylov_per_newton": stats.krylov_iterations / max(stats.newton_iterations, 1),
                         "time_s": seconds, "note": message})
    return rows


class StiffMLP(nn.Module):
    """``dy/dt = W2 tanh(W1 y + b1) + b2 - D y``: a learned field with stiff linear decay, rates in
    ``D`` log-spaced from 1 to ``stiffness``; ``y`` of shape ``(B, n)``."""

    def __init__(self, n: int, hidden: int = 32, stiffness: float = 31.6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, n))
        self.register_buffer("rates", torch.logspace(0, float(np.log10(stiffness)), n))

    def forward(self, t, y):
        return self.net(y) - self.rates * y


def training_step_time(func: nn.Module, y0: torch.Tensor, method: str, steps: int, options: Dict,
                       rounds: int) -> float:
    """The least time over ``rounds`` of a training step (forward solve over [0, 1], loss, backward)."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms the pool up
        start = time.perf_counter()
        out = pnode.odeint_adjoint(func, y0, t, method=method, options={"step_size": 1.0 / steps, **options})
        out[-1].square().mean().backward()
        best = min(best, time.perf_counter() - start) if _ else best
    return best


def blocks_table(sizes: Sequence[int], batches: Sequence[int], steps: Sequence[int], rounds: int) -> List[Dict]:
    rows = []
    for n in sizes:
        for batch in batches:
            torch.manual_seed(0)
            func = StiffMLP(n).double()
            y0 = torch.randn(batch, n, dtype=F64)
            for count in steps:
                rk4 = training_step_time(func, y0, "rk4", count, {}, rounds)
                row = {"n": n, "batch": batch, "steps": count, "rk4_s": rk4}
                for jacobian in ("blocks", "matrix_free"):
                    row[f"cn_{jacobian}_s"] = training_step_time(func, y0, "cn", count, {"jacobian": jacobian}, rounds)
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def _g(value, fmt: str = ".2e") -> str:
    return "–" if value is None else format(value, fmt) if isinstance(value, float) else str(value)


def _progress(row: Dict) -> str:
    return f"{row['problem']} {row['solver']} rtol={row['rtol']:g}: {row['steps']} steps, error {_g(row['error'])}"


def render(doc: Dict) -> str:
    lines = ["## Stiff problems", "", f"`{doc['command']}`", "", f"Machine: {doc['machine']['cpus']} CPUs "
             f"({doc['machine']['cpu']}), torch {doc['machine']['torch']}, petsc4py {doc['machine']['petsc4py']}; "
             f"{doc['date']}.", ""]
    tables = doc["tables"]
    if "robertson" in tables:
        lines += ["### Robertson as a user poses it (outputs 40 and 1e5, rtol 1e-6, atol 1e-10)", "",
                  "| method | steps | rejected | max rel. error, t = 40 | max rel. error, t = 1e5 | "
                  "gradient vs FD (max rel.) | time (s) | note |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['steps']} | {r['rejected']} | {_g(r['error_40'])} | {_g(r['error_1e5'])} | "
                  f"{_g(r['grad_error'])} | {r['time_s']:.2f} | {r['note']} |" for r in tables["robertson"]]
        lines.append("")
    if "set" in tables:
        lines += ["### The stiff set: steps, work and error (error relative to each component's range, "
                  "against Radau at rtol 1e-12)", ""]
        for name in dict.fromkeys(r["problem"] for r in tables["set"]):
            lines += [f"**{name}** (atol = {PROBLEMS[name].atol_per_rtol:g} rtol)", "",
                      "| solver | rtol | steps | rejected | Newton its | Krylov its | f evals | Jacobians | "
                      "time (s) | error | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['solver']} | {r['rtol']:g} | {r['steps']} | {_g(r['rejected'])} | {_g(r['newton'])} | "
                      f"{_g(r['krylov'])} | {r['fevals']} | {r['jacobians']} | {r['time_s']:.2f} | {_g(r['error'])} | "
                      f"{r['note']} |" for r in tables["set"] if r["problem"] == name]
            lines.append("")
    if "gradients" in tables:
        lines += ["### Gradients with respect to the parameters against central finite differences", "",
                  "Finite differences of SciPy's Radau at rtol 1e-12, relative step 1e-4. Per parameter: the "
                  "largest |g - fd| / |fd|; sensitivities: the largest |p (g - fd)| over the largest |p fd|.", "",
                  "| problem | method | rtol | parameters | max rel. error per parameter | sensitivities | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['problem']} | {r['method']} | {r['rtol']:g} | {r['params']} | {_g(r['grad_error'])} | "
                  f"{_g(r['sensitivity_error'])} | {r['time_s']:.2f} |" for r in tables["gradients"]]
        lines.append("")
    if "newton" in tables:
        lines += ["### Newton on Robertson (rtol 1e-6): block-Jacobian preconditioner against matrix-free GMRES", "",
                  "| method | jacobian | steps | step attempts | Newton its / attempt | Krylov its / Newton it | "
                  "time (s) | note |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['jacobian']} | {r['steps']} | {r['attempts']} | {r['newton_per_step']:.2f} | "
                  f"{r['krylov_per_newton']:.2f} | {r['time_s']:.2f} | {r['note']} |" for r in tables["newton"]]
        lines.append("")
    if "blocks" in tables:
        lines += ["### When blocks pay: a cn training step of an MLP with stiff decay (n per sample, batch B)", "",
                  "| n | B | steps | rk4 (s) | cn, blocks (s) | cn, matrix-free (s) | blocks × rk4 | "
                  "matrix-free × rk4 |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['batch']} | {r['steps']} | {r['rk4_s']:.4f} | {r['cn_blocks_s']:.4f} | "
                  f"{r['cn_matrix_free_s']:.4f} | {r['cn_blocks_s'] / r['rk4_s']:.2f} | "
                  f"{r['cn_matrix_free_s'] / r['rk4_s']:.2f} |" for r in tables["blocks"]]
        lines.append("")
    return "\n".join(lines)


def floats(text: str) -> List[float]:
    return [float(value) for value in text.split(",") if value]


def words(text: str) -> List[str]:
    return [value for value in text.split(",") if value]


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=words, default=list(TABLES), help=f"comma-separated, of {', '.join(TABLES)}")
    parser.add_argument("--problems", type=words, default=list(PROBLEMS), help="comma-separated problem names")
    parser.add_argument("--methods", type=words, default=list(PNODE_METHODS), help="pnode methods")
    parser.add_argument("--rtols", type=floats, default=[1e-4, 1e-6, 1e-8])
    parser.add_argument("--max-steps", type=int, default=100000, help="a pnode row stops after this many steps")
    parser.add_argument("--rounds", type=int, default=5, help="timed training steps per row of the blocks table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="rtol 1e-4, kencarp4 and BDF, small tables")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods, scipy_methods, rtols = args.methods, list(SCIPY_METHODS), args.rtols
    sizes, batches, steps = (2, 8, 32, 64, 128), (16, 256), (16, 64)
    if args.quick:
        methods, scipy_methods, rtols, sizes, batches, steps = ["kencarp4"], ["BDF"], [1e-4], (8,), (16,), (4,)
        args.problems = [name for name in args.problems if name == "robertson"] or args.problems[:1]
    tables: Dict[str, List[Dict]] = {}
    if "robertson" in args.tables:
        tables["robertson"] = robertson_table([m for m in ("cn", "beuler", "kencarp4", "kencarp5") if
                                               not args.quick or m == "kencarp4"])
    if "set" in args.tables:
        tables["set"] = set_table(args.problems, methods, scipy_methods, rtols, args.max_steps)
    if "gradients" in args.tables:
        tables["gradients"] = gradient_table(args.problems, methods[:1] if args.quick else ["kencarp4", "kencarp5"],
                                             1e-6)
    if "newton" in args.tables:
        tables["newton"] = newton_table(["kencarp4"] if args.quick else ["cn", "beuler", "kencarp4"])
    if "blocks" in args.tables:
        tables["blocks"] = blocks_table(sizes, batches, steps, 1 if args.quick else args.rounds)
    doc = {"benchmark": "stiff", "command": f"python -m benchmarks.stiff {shlex.join(argv)}".rstrip(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "tables": tables}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stiff.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=float)
    text = render(doc)
    with open(os.path.join(args.out, "stiff.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
