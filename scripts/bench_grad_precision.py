"""How exact are float32 gradients? pnode and autograd through the same steps, both against float64.

``scripts/bench_memory.py`` compares pnode's float32 gradient with float32 autograd through the
same steps. Both are float32 computations of the same discrete gradient, and the ODE-Net block
(GroupNorm, ReLU) is sensitive to round-off, so that difference mixes the errors of both. This
script adds the float64 reference: autograd through the same steps with the network and input cast
to float64. It prints, per method, the relative errors (the larger of the y0 and parameter parts)
of pnode float32 against autograd in pnode's own arithmetic, against float32 autograd and against
float64 autograd, and of float32 autograd against float64 autograd.

pnode's own arithmetic: on a float64 PETSc, pnode sums the steps in float64 and evaluates the
network in float32 (each stage value cast down, each evaluation cast up); autograd through the
same steps done that way computes the very function pnode differentiates, so the two gradients
differ only by the round-off of the float32 vector-Jacobian products. On a float32 PETSc that
arithmetic is float32 throughout, and the column equals the float32 one.

Workload as in bench_memory.py: batch 128, state 64x8x8, t = [0, 1], fixed steps 1/steps or
dopri5 with rtol = atol = 1e-3, loss MSE against a fixed random target.

    python scripts/bench_grad_precision.py [--steps 16,64] [--methods rk4] [--train-steps 0,4,5,6] [--markdown FILE]

``--train-steps`` measures at the weights after that many training steps (bench_memory.py checks
its gradients after its timed and memory steps, so at other weights than the initial ones).
"""

import argparse
import copy
import os
import sys
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys_argv, sys.argv = sys.argv, sys.argv[:1]  # pnode reads PETSc options from sys.argv on import
import bench_core  # noqa: E402
import bench_memory as bm  # noqa: E402

sys.argv = sys_argv


METHODS = ("euler", "rk4", "dopri5")
"""The methods this script compares (their references: ``bench_memory.rk_tableau``)."""


def rows(method: str, steps: Optional[int], args: argparse.Namespace) -> List[List[str]]:
    """One row per entry of ``args.train_steps``: the errors at the weights after that many
    training steps (pnode, SGD with momentum, as bench_memory.py trains between its measurements)."""
    config = bm.Config("pnode", method, steps, batch=args.batch, channels=args.channels, size=args.size)
    torch.manual_seed(0)
    func = bm.CountedFunc(bench_core.ODEFunc(args.channels))
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    target = torch.randn_like(x)
    solve = bm.Solve(config, func)
    optimizer = torch.optim.SGD(func.parameters(), lr=1e-3, momentum=0.9)
    out, trained = [], 0
    for wanted in sorted(args.train_steps):
        while trained < wanted:
            bm.training_step(solve, x, target, optimizer)
            trained += 1
        out.append([method, *row(config, solve, func, x, target), str(trained)])
    return out


def row(config, solve, func, x, target) -> List[str]:
    """steps label and the four errors at ``func``'s current weights."""
    method, steps = config.method, config.steps
    params = tuple(func.parameters())
    pnode32 = bm.gradients(solve, x, target, params)
    autograd32 = bm.reference_gradients(config, solve, x, target, params)
    same = bm.own_arithmetic_reference(config, solve, x, target, params, autograd32)
    times = bm.pnode_step_times(config, solve, x)
    func64 = copy.deepcopy(func).double()
    autograd64 = bm.gradients(lambda y0: bench_core.rk_reference(func64, y0, times, bm.rk_tableau(method)),
                              x.double(), target.double(), tuple(func64.parameters()))
    label = str(steps) if steps else f"adaptive ({len(times) - 1})"
    pairs = ((pnode32, same), (pnode32, autograd32), (pnode32, autograd64), (autograd32, autograd64))
    return [label, *(f"{bm.worst_relative_error(got, want):.1e}" for got, want in pairs)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",") if v], default=[16, 64])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--methods", type=lambda s: [v for v in s.split(",") if v], default=list(METHODS),
                        help=f"comma-separated, from {','.join(METHODS)} (default: all three)")
    parser.add_argument("--train-steps", type=lambda s: [int(v) for v in s.split(",") if v], default=[0],
                        help="measure at the weights after each of these numbers of training steps "
                             "(default 0: the initial weights)")
    parser.add_argument("--markdown", metavar="FILE", help="append the table to FILE")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or any(n < 0 for n in args.train_steps):
        parser.error(f"unknown methods {unknown}" if unknown else "--train-steps must be at least 0")
    torch.set_num_threads(args.threads)
    table_rows = [r for m in args.methods for s in ([None] if m == "dopri5" else args.steps)
                  for r in rows(m, s, args)]
    header = ["method", "steps", "pnode f32 vs autograd in pnode's arithmetic", "pnode f32 vs autograd f32",
              "pnode f32 vs autograd f64", "autograd f32 vs autograd f64", "after training steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows]
    from pnode.bridge import PETSC_DTYPE

    table = (f"Gradient relative error (larger of y0 and parameter parts), ODE-Net block, batch {args.batch}, "
             f"state {args.channels}x{args.size}x{args.size}, same steps for all; PETSc scalar "
             f"{str(PETSC_DTYPE).replace('torch.', '')}\n\n" + "\n".join(lines))
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
