"""Two pnode checkouts in one process, their training steps alternated: how much faster one is.

    python -m benchmarks.interleaved --other /path/to/older/checkout --rows 'scale/rk4-50/*' --pairs 100

The machine's speed drifts by tens of percent within minutes, and a process differs from the next
(``benchmarks.fixed_cost`` measures a row per process): neither a ratio of medians nor
``fixed_cost --paired`` resolves a change of a few percent between two checkouts. Here both run in
one interpreter: the other checkout's ``pnode`` package is loaded under another name (pnode's
modules import each other relatively, so it stays self-contained, with its own solver pool), and
each pair times one training step of each, their order alternating. The table gives the median of
the per-pair ratios (this checkout over the other) with its quartiles; below 1.00 this checkout
is faster. Rows are those of ``benchmarks.fixed_cost`` without the event loop: the ``scale`` and
``small`` workloads at rk4 with 50 steps and dopri5 at 1e-5, each with kept graphs (``graphs``)
and stored states (``states``); ``--quick`` runs toy sizes.
"""

import argparse
import fnmatch
import importlib.util
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

ROWS = [f"{workload}/{solver}/{mode}" for workload in ("scale", "small") for solver in ("rk4-50", "dopri5-1e-05")
        for mode in ("graphs", "states")]


def load_other(checkout: str, name: str = "pnode_other"):
    """The ``pnode`` package of ``checkout`` (its root folder), imported as ``name``."""
    init = os.path.join(checkout, "pnode", "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--other {checkout!r}: no pnode/__init__.py there; give the root of a pnode checkout")
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def training_step(library, row: str, quick: bool) -> Callable[[], None]:
    """A zero-argument training step of ``row`` ('workload/solver/mode') solved by ``library`` (a pnode)."""
    from benchmarks.fixed_cost import _solver
    from benchmarks.workloads import build
    from benchmarks.workloads import training_step as workload_step

    workload, solver, mode = row.split("/")
    problem = build(workload, quick)
    method, steps, tol = _solver(solver)
    options = {"adjoint": mode} if steps is None else {"adjoint": mode, "step_size": float(problem.t[-1]) / steps}
    tolerances = {} if tol is None else {"rtol": tol, "atol": tol}

    def solve(y0):
        return library.odeint_adjoint(problem.func, y0, problem.t, method=method, options=options, **tolerances)[-1]
    return lambda: workload_step(problem, solve)


def rotations(steps: Dict[str, Callable[[], object]], count: int,
              clock: Callable[[], float] = time.perf_counter) -> List[Dict[str, float]]:
    """``count`` rotations: each times every step once (seconds, by name), starting one name later
    than the rotation before (two steps: their order alternates)."""
    names, out = list(steps), []
    for r in range(count):
        times = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            steps[name]()
            times[name] = clock() - start
        out.append(times)
    return out


def paired_ratios(first: Callable[[], None], second: Callable[[], None], pairs: int,
                  clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """``time(first) / time(second)`` for each of ``pairs`` pairs, the order alternating pair by pair."""
    return [t["first"] / t["second"] for t in rotations({"first": first, "second": second}, pairs, clock)]


def summary(ratios: Sequence[float], digits: int = 3) -> str:
    """Median and quartiles (inclusive method: within the observed ratios) as ``'0.930 (0.900–0.970)'``."""
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{statistics.median(ratios):.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="root folder of the pnode checkout to compare against")
    parser.add_argument("--rows", default="*", help=f"a glob of row ids, from: {', '.join(ROWS)}")
    parser.add_argument("--pairs", type=int, default=60, help="timed pairs of training steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="toy sizes")
    args = parser.parse_args(argv)
    import torch

    import pnode

    torch.set_num_threads(args.threads)
    other = load_other(os.path.abspath(args.other))
    selected = [row for row in ROWS if fnmatch.fnmatch(row, args.rows)]
    if not selected:
        raise SystemExit(f"--rows {args.rows!r} matches none of: {', '.join(ROWS)}")
    print(f"this checkout: {os.path.dirname(pnode.__file__)}; other: {os.path.dirname(other.__file__)}; "
          f"{args.pairs} pairs per row, torch threads {args.threads}\n")
    print("| row | this / other, per-pair time ratio: median (quartiles) |\n|---|---|")
    results: Dict[str, str] = {}
    for row in selected:
        ours, theirs = training_step(pnode, row, args.quick), training_step(other, row, args.quick)
        for _ in range(args.warmup):
            ours(), theirs()
        results[row] = summary(paired_ratios(ours, theirs, args.pairs))
        print(f"| {row} | {results[row]} |", flush=True)


if __name__ == "__main__":
    main()
