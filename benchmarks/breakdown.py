"""Where a training step's time goes: the network, autograd's backward work, PETSc's vectors, the rest.

Each row (a row of :mod:`benchmarks.strategies`; by default torchdiffeq ``odeint`` and pnode's kept
graphs with rk4 on the ODE-Net block at 16 and 64 steps and on the small state at 50 steps) runs
in a process of its own. After the warm-up steps, the wall time of the timed steps is split into:

* **f forward**: inside the network's forward calls (a hook on the ODE function's module; pnode's
  kept graphs are built there);
* **backward**: inside ``pnode._impl.rhs.vector_jacobian`` for pnode (the VJPs its adjoint asks for, one per
  stage) or inside ``Tensor.backward`` for torchdiffeq ``odeint`` (one pass through the whole
  solve: the network's backward and that of the stage arithmetic);
* **PETSc vectors**: PETSc's own event log of its vector operations (``VecCopy``, ``VecMAXPY``, ...:
  the stage sums of the forward and adjoint steps, the trajectory's copies), pnode rows only;
* **rest**: all else. pnode: callbacks from PETSc into Python, casts between tensors and PETSc
  vectors, kept-graph lookups, the solver's Python. torchdiffeq: its forward stage arithmetic and
  its Python.

The times are per training step (s), the mean of ``--repeats`` timed steps over ``--rounds``
rounds (a process per row and round, one row after another). Writes ``breakdown.json`` and
``breakdown.md`` (printed too) to ``--out``::

    python -m benchmarks.breakdown --repeats 3 --rounds 3
    python -m benchmarks.breakdown --rows 'small/rk4-50/*'
"""

import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

from benchmarks import cli
from benchmarks.measure import Row, Settings, run_in_subprocess, serve_worker
from benchmarks.strategies import base_rows

DEFAULT_ROWS = ("odenet/rk4-16/torchdiffeq-odeint", "odenet/rk4-16/pnode:adjoint=graphs",
                "odenet/rk4-64/torchdiffeq-odeint", "odenet/rk4-64/pnode:adjoint=graphs",
                "small/rk4-50/torchdiffeq-odeint", "small/rk4-50/pnode:adjoint=graphs")
VECTOR_EVENTS = ("VecCopy", "VecMAXPY", "VecAXPY", "VecAYPX", "VecAXPBY", "VecAXPBYPCZ", "VecWAXPY", "VecScale",
                 "VecSet", "VecNorm", "VecDot", "VecMDot", "VecPointwiseMult")
PARTS = ("f_forward_s", "backward_s", "petsc_vectors_s", "rest_s")


class Stopwatch:
    """Sums the wall time spent inside wrapped calls (not inside nested calls of the same watch twice)."""

    def __init__(self):
        self.total = 0.0
        self._depth = 0
        self._start = 0.0

    def enter(self) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.total += time.perf_counter() - self._start

    def wrap(self, function):
        def timed(*args, **kwargs):
            self.enter()
            try:
                return function(*args, **kwargs)
            finally:
                self.leave()
        return timed


def petsc_vector_seconds() -> float:
    """Seconds PETSc's log holds for its vector operations so far (0 before PETSc is used)."""
    if "petsc4py.PETSc" not in sys.modules:
        return 0.0
    from petsc4py import PETSc

    return sum(PETSc.Log.Event(name).getPerfInfo()["time"] for name in VECTOR_EVENTS)


def measure(row: Row, settings: Settings) -> Dict[str, object]:
    """The mean time of a training step and its parts (s), in this process."""
    import torch

    from benchmarks import workloads
    from benchmarks.measure import CountedSolve, timed_steps

    torch.set_num_threads(settings.threads)
    problem = workloads.build(row.workload, settings.quick)
    solve = CountedSolve(row, problem)
    workloads.prime(problem)
    if row.library == "pnode":
        from pnode._compat import PETSc

        PETSc.Log.begin()
    forward, backward = Stopwatch(), Stopwatch()
    problem.func.register_forward_pre_hook(lambda *_: forward.enter())
    problem.func.register_forward_hook(lambda *_: forward.leave())
    if row.library == "pnode":
        from pnode._impl import rhs

        rhs.vector_jacobian = backward.wrap(rhs.vector_jacobian)
    else:
        torch.Tensor.backward = backward.wrap(torch.Tensor.backward)
    timed_steps(problem, solve, settings.warmup)
    forward.total = backward.total = 0.0
    vectors = petsc_vector_seconds()
    times = timed_steps(problem, solve, settings.repeats)
    n = len(times)
    parts = {"f_forward_s": forward.total / n, "backward_s": backward.total / n,
             "petsc_vectors_s": (petsc_vector_seconds() - vectors) / n}
    step = sum(times) / n
    return {"time_s": step, **parts, "rest_s": step - sum(parts.values()), "rounds": 1}


def averaged(results: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """The mean over rounds of a row's step time and parts (the first error, if any round failed)."""
    failed = [r for r in results if "error" in r]
    if failed:
        return dict(failed[0])
    keys = ("time_s",) + PARTS
    return {**{key: sum(r[key] for r in results) / len(results) for key in keys}, "rounds": len(results)}


def run(rows: Sequence[Row], settings: Settings) -> List[Dict[str, object]]:
    results: List[List[Dict[str, object]]] = [[] for _ in rows]
    for round_number in range(1, settings.rounds + 1):
        for i, row in enumerate(rows):
            result = run_in_subprocess(row, settings, module="benchmarks.breakdown")
            results[i].append(result)
            shown = result.get("error") or f"{result['time_s']:.3f} s/step"
            print(f"[round {round_number}, {i + 1}/{len(rows)}] {row.id}: {shown}", file=sys.stderr, flush=True)
    return [{**row.to_json(), "result": averaged(r)} for row, r in zip(rows, results)]


def markdown(doc: Mapping[str, object]) -> str:
    s, m = doc["settings"], doc["machine"]
    lines = [f"## Where a training step's time goes ({doc['date']})", f"`{doc['command']}`",
             f"Machine: {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, petsc4py {m['petsc4py']}; torch threads "
             f"{s['threads']}. Mean of {s['repeats']} timed steps after {s['warmup']} warm-up step(s), in each of "
             f"{s['rounds']} round(s), a process per row and round. Seconds per training step; parts as defined in "
             "`benchmarks/breakdown.py`.",
             "| row | time / step | f forward | backward | PETSc vectors | rest | time − odeint's |",
             "|---|---|---|---|---|---|---|"]
    odeint: Dict[str, float] = {}
    for entry in doc["rows"]:
        r = entry["result"]
        solver = f"{entry['workload']}/{entry['solver']}"
        if "error" in r:
            lines.append(f"| {entry['id']} | error: {r['error'][:120]} | – | – | – | – | – |")
            continue
        if entry["library"] == "torchdiffeq-odeint":
            odeint[solver] = r["time_s"]
        gap = f"{r['time_s'] - odeint[solver]:+.3f}" if solver in odeint else "–"
        cells = [f"{r['time_s']:.3f}"] + [f"{r[key]:.3f} ({100 * r[key] / r['time_s']:.0f} %)" for key in PARTS]
        lines.append(f"| {entry['id']} | " + " | ".join(cells) + f" | {gap} |")
    return "\n\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = cli.arguments(argv)
    parser = cli.new_parser(__doc__, default_out="bench-results")
    args = parser.parse_args(argv)
    rows = cli.select(base_rows(), args.rows or DEFAULT_ROWS)
    if cli.listed(args, rows):
        return
    settings = cli.settings_from(args)
    doc = cli.document("breakdown", settings, run(rows, settings), argv)
    cli.save(doc, markdown(doc), args.out, "breakdown")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        serve_worker(measure)
    else:
        main()
