"""The floor of pnode's two adjoint designs: the same discrete adjoint written in torch alone, timed
in one process beside torchdiffeq's backprop and pnode's own step.

    python -m benchmarks.floor --workload small --pairs 60
    python -m benchmarks.floor --workload scale --steps 50 --pairs 60

The workloads are ``benchmarks.fixed_cost``'s ``scale`` (``f(t, y) = a y``) and ``small`` (the MLP
2-64-64-2 with tanh), 256 states of 2 (float32) over [0, 5], classic RK4 with ``--steps`` steps, the
MSE training step of ``benchmarks.workloads``. Six training steps are timed in each rotation, their
order rotating from one rotation to the next:

* ``backprop``: the RK4 solve written in torch, one backward pass through all of it;
* ``torchdiffeq``: torchdiffeq's ``odeint`` (rk4, backprop through its solver), the reference;
* ``torch alone, kept graphs``: every stage's graph kept, the backward pass written as the discrete
  RK adjoint (the recursion PETSc's TSAdjoint computes): one ``torch.autograd.grad`` per stage for
  the state and parameter parts together;
* ``torch alone, stored states``: the solve without graphs keeping each stage's state; the adjoint
  evaluates f again with its graph at each stage before its ``autograd.grad``;
* ``pnode, kept graphs`` and ``pnode, stored states``: ``pnode.odeint_adjoint`` with
  ``options={'adjoint': 'graphs' | 'states'}``.

The table gives, per design, the median (and quartiles) of the per-rotation ratios to torchdiffeq
and of pnode's to torch alone (then the cost of one evaluation of f without its graph, beside
torchdiffeq's time per stage): the torch-alone ratios are what any implementation of that design
costs on this machine (an engine call per stage; for stored states one more evaluation of f per
stage), pnode's ratio to them what its boundary adds (PETSc's callbacks, its vector work, the
casts between the network's dtype and PETSc's). All five backward passes give the same gradient
(printed first).
"""

import argparse
import statistics
import time
from typing import Callable, Dict, NamedTuple, Sequence, Tuple

import torch

from benchmarks.interleaved import rotations, summary, training_step

A = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))  # classic RK4
B = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
DESIGNS = ("graphs", "states")


class Problem(NamedTuple):
    """``f(y)`` (autonomous), its parameters, the input ``y0``, the loss's target, step ``h``, steps."""

    f: Callable[[torch.Tensor], torch.Tensor]
    params: Tuple[torch.Tensor, ...]
    y0: torch.Tensor
    target: torch.Tensor
    h: float
    steps: int


def from_workload(workload: str, steps: int, quick: bool = False) -> Problem:
    """The fixed-cost workload ``workload`` ('scale' or 'small', both autonomous) as a :class:`Problem`."""
    from benchmarks.workloads import build

    problem = build(workload, quick)
    t0, t_end = problem.t[0], float(problem.t[-1])
    return Problem(lambda y: problem.func(t0, y), tuple(problem.func.parameters()), problem.x, problem.target,
                   t_end / steps, steps)


def _stage_input(y, k, i, h):
    return y + h * sum(A[i][j] * k[j] for j in range(i)) if i else y


def _loss(p: Problem, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(y, p.target)


def backprop(p: Problem) -> Tuple[torch.Tensor, ...]:
    """``(dL/dy0, dL/dparams...)`` by one backward pass through every operation of the solve."""
    y0 = p.y0.detach().requires_grad_(True)
    y = y0
    for _ in range(p.steps):
        k = []
        for i in range(4):
            k.append(p.f(_stage_input(y, k, i, p.h)))
        y = y + p.h * sum(B[i] * k[i] for i in range(4))
    return torch.autograd.grad(_loss(p, y), (y0,) + p.params)


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
    """``(dL/dy0, dL/dparams...)`` by the discrete RK adjoint, one engine call per stage (on its kept
    graph, or on a graph evaluated again at the stored stage state)."""
    with torch.set_grad_enabled(keep_graphs):
        steps, y = _forward(p, keep_graphs)
    y_end = y.detach().requires_grad_(True)
    (lam,) = torch.autograd.grad(_loss(p, y_end), y_end)
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
    return (lam,) + tuple(grads)


def steps_of(workload: str, steps: int, quick: bool = False) -> Dict[str, Callable[[], object]]:
    """The six zero-argument training steps, by name: 'backprop', 'torchdiffeq', 'torch:graphs',
    'torch:states', 'pnode:graphs', 'pnode:states' (each on its own copy of the workload)."""
    import torchdiffeq

    import pnode
    from benchmarks.workloads import build
    from benchmarks.workloads import training_step as workload_step

    solver = f"rk4-{steps}"
    p, q = from_workload(workload, steps, quick), build(workload, quick)

    def reference(y0):  # torchdiffeq's rk4 is the 3/8 rule: as many stages as the classic one
        return torchdiffeq.odeint(q.func, y0, q.t, method="rk4", options={"step_size": float(q.t[-1]) / steps})[-1]
    out = {"backprop": lambda: backprop(p), "torchdiffeq": lambda: workload_step(q, reference)}
    for design in DESIGNS:
        out[f"torch:{design}"] = (lambda keep: lambda: discrete_adjoint(p, keep))(design == "graphs")
        out[f"pnode:{design}"] = training_step(pnode, f"{workload}/{solver}/{design}", quick)
    return out


def table(times: Sequence[Dict[str, float]]) -> str:
    """The markdown table of per-rotation ratios (see the module's docstring)."""
    def ratio(a, b):
        return summary([t[a] / t[b] for t in times], digits=2)
    lines = ["| design | torch alone × torchdiffeq | pnode × torchdiffeq | pnode × torch alone |",
             "|---|---|---|---|",
             f"| backprop (one backward pass) | {ratio('backprop', 'torchdiffeq')} | – | – |"]
    for design, label in zip(DESIGNS, ("kept graphs", "stored states")):
        lines.append(f"| {label} | {ratio(f'torch:{design}', 'torchdiffeq')} | "
                     f"{ratio(f'pnode:{design}', 'torchdiffeq')} | {ratio(f'pnode:{design}', f'torch:{design}')} |")
    median = statistics.median(t["torchdiffeq"] for t in times)
    lines.append(f"\ntorchdiffeq odeint: {1e3 * median:.1f} ms a training step (median), {len(times)} rotations")
    return "\n".join(lines)


def evaluation_seconds(p: Problem, calls: int = 200, rounds: int = 5) -> float:
    """Seconds one evaluation of f takes without its graph (what stored states add per stage):
    the median over ``rounds`` of ``calls`` evaluations at ``y0``."""
    times = []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                p.f(p.y0)
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def check_gradients(workload: str, steps: int, quick: bool = False) -> str:
    """One line: dL/dp[0] of backprop, both torch-alone adjoints and both pnode strategies (all equal
    to round-off)."""
    import pnode
    from benchmarks.workloads import build

    p = from_workload(workload, steps, quick)
    values = [backprop(p)[1], discrete_adjoint(p, True)[1], discrete_adjoint(p, False)[1]]
    for design in DESIGNS:
        q = build(workload, quick)
        y_end = pnode.odeint_adjoint(q.func, q.x, q.t, method="rk4",
                                     options={"adjoint": design, "step_size": float(q.t[-1]) / steps})[-1]
        values.append(torch.autograd.grad(_loss(p, y_end), next(q.func.parameters()))[0])
    names = ("backprop", "torch:graphs", "torch:states", "pnode:graphs", "pnode:states")
    return "dL/dp[0]: " + ", ".join(f"{name} {float(v.flatten()[0]):.10g}" for name, v in zip(names, values))


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("scale", "small"), default="small")
    parser.add_argument("--steps", type=int, default=50, help="RK4 steps over [0, 5]")
    parser.add_argument("--pairs", type=int, default=60, help="timed rotations (each times every step once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rotations first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="toy sizes (batch 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(check_gradients(args.workload, args.steps, args.quick))
    steps = steps_of(args.workload, args.steps, args.quick)
    rotations(steps, args.warmup)
    print(f"{args.workload}, rk4 with {args.steps} steps, torch threads {args.threads}; per-rotation time "
          "ratios: median (quartiles)\n")
    times = rotations(steps, args.pairs)
    print(table(times))
    stage = statistics.median(t["torchdiffeq"] for t in times) / (4 * args.steps)
    f_eval = evaluation_seconds(from_workload(args.workload, args.steps, args.quick))
    print(f"one evaluation of f without its graph: {1e6 * f_eval:.0f} µs; torchdiffeq's training step: "
          f"{1e6 * stage:.0f} µs per stage")


if __name__ == "__main__":
    main()
