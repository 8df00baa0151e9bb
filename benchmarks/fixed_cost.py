"""What each solver spends per stage and per call beyond the network: pnode against torchdiffeq, side by side.

Rows (a training step each: solve, loss, backward), each in a fresh process, measured in rounds:

* ``scale``: ``f(t, y) = a y`` on a batch of 256 states of 2 (float32): f costs next to nothing, so
  the time per stage is the solver's own, at rk4 with 50 steps and dopri5 at rtol = atol = 1e-5;
* ``small``: the MLP 2-64-64-2 on the same states, rk4 with 50 steps and dopri5 at 1e-5;
* ``events``: a physics loop on a 3-number state (height, velocity, radius; learnable gravity): 20
  bounces chained through ``odeint_event`` (dopri5, rtol = atol = 1e-8) and a state update, then
  the loss's backward pass; a call is one event solve;
* ``odenet``: the ODE-Net block (batch 128, 64 x 8 x 8, float32) at rk4 with 16 and 64 steps.

For each: torchdiffeq ``odeint`` (backprop through its solver), pnode with kept graphs (``graphs``:
what ``pnode.odeint`` runs) and with stored states (``states``: ``pnode.odeint_adjoint``'s default),
both called as ``odeint_adjoint(..., options={'adjoint': ...})`` so that an older checkout runs the
same rows; the event rows use each library's ``odeint_event`` (torchdiffeq's with its ``odeint``
interface, backprop), pnode's with the same two strategies. The table gives
the median time of a training step over every round, the stages it evaluated forward (f's calls in
the forward solve), microseconds per stage (step time over stages) and per call, and the ratio to
torchdiffeq's row of the same workload and solver.

``--compare LABEL=PATH`` adds the pnode rows of another checkout (its ``pnode`` package first on
the path), measured in the same rounds, a row after another: the before and after of a change in
one run::

    python -m benchmarks.fixed_cost --rounds 3 --out benchmarks/results
    python -m benchmarks.fixed_cost --compare before=/tmp/pnode-before --rounds 3
    python -m benchmarks.fixed_cost --quick            # toy sizes, a minute

``--paired``: each pnode row's process also runs torchdiffeq's training step of the same workload
and solver, alternating with its own step for step, and the table adds the median (and the
quartiles) of the per-pair ratios. The machine's speed drifts by tens of percent within minutes;
a pair is timed within a fraction of a second, so its ratio moves far less than the ratio of two
rows' medians timed minutes apart.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "FIXED_COST_RESULT "


@dataclass(frozen=True)
class Row:
    """One row: ``workload`` ('scale', 'small', 'events', 'odenet'), ``solver`` ('rk4-50', 'dopri5-1e-05',
    'dopri5-1e-08'), ``library`` ('torchdiffeq' or 'pnode'), ``mode`` (torchdiffeq: 'odeint'; pnode:
    'graphs' or 'states', its adjoint strategy), ``build`` (the pnode checkout's label, '' for this one)."""

    workload: str
    solver: str
    library: str
    mode: str
    build: str = ""

    @property
    def id(self) -> str:
        build = f"[{self.build}]" if self.build else ""
        return f"{self.workload}/{self.solver}/{self.library}{build}:{self.mode}"


SOLVERS = {"scale": ("rk4-50", "dopri5-1e-05"), "small": ("rk4-50", "dopri5-1e-05"), "events": ("dopri5-1e-08",),
           "odenet": ("rk4-16", "rk4-64")}


def rows(builds: Sequence[str]) -> List[Row]:
    out = []
    for workload, solvers in SOLVERS.items():
        for solver in solvers:
            out.append(Row(workload, solver, "torchdiffeq", "odeint"))
            for build in builds:
                out += [Row(workload, solver, "pnode", mode, build) for mode in ("graphs", "states")]
    return out


# ---------------------------------------------------------------------------------------------- worker
def _solver(solver: str):
    method, value = solver.split("-", 1)
    if method == "rk4":
        return method, int(value), None
    return method, None, float(value)


def _training_step(row: Row, quick: bool):
    """A zero-argument training step for ``row`` and the forward evaluations of f it counts per step."""
    import torch

    if row.workload == "events":
        return _event_step(row, quick)
    from benchmarks.workloads import build

    problem = build(row.workload, quick)
    method, steps, tol = _solver(row.solver)
    counted = {"f": 0}
    func_module = _Counted(problem.func, counted)
    if row.library == "torchdiffeq":
        import torchdiffeq

        odeint = torchdiffeq.odeint
        options = {} if steps is None else {"step_size": float(problem.t[-1]) / steps}
        # torchdiffeq's rk4 is the 3/8 rule: as many stages as pnode's classic one
    else:
        import pnode

        odeint = pnode.odeint_adjoint
        options = {"adjoint": row.mode} if steps is None else {"step_size": float(problem.t[-1]) / steps,
                                                               "adjoint": row.mode}
    tolerances = {} if tol is None else {"rtol": tol, "atol": tol}

    def step():
        problem.func.zero_grad(set_to_none=True)
        y0 = problem.x.detach().requires_grad_(True)
        counted["f"] = 0
        ys = odeint(func_module, y0, problem.t, method=method, options=options, **tolerances)
        forward = counted["f"]
        torch.nn.functional.mse_loss(ys[-1], problem.target).backward()
        return forward, 1
    return step


def _counted_module():
    import torch

    class Counted(torch.nn.Module):
        """The workload's module, counting its calls."""

        def __init__(self, module, counted):
            super().__init__()
            self.module, self.counted = module, counted

        def forward(self, t, y):
            self.counted["f"] += 1
            return self.module(t, y)
    return Counted


def _Counted(module, counted):
    return _counted_module()(module, counted)


def _event_step(row: Row, quick: bool):
    import torch

    if row.library == "torchdiffeq":
        import torchdiffeq as library
        interface = {"odeint_interface": library.odeint}
    else:
        import pnode as library
        interface = {"options": {"adjoint": row.mode}}
    counted = {"f": 0}
    gravity = torch.nn.Parameter(torch.tensor(9.81, dtype=torch.float64))

    class Dynamics(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gravity = gravity

        def forward(self, t, state):
            counted["f"] += 1
            pos, vel, radius = state
            return vel, -self.gravity * torch.ones_like(vel), torch.zeros_like(radius)

    dynamics = Dynamics()
    bounces = 4 if quick else 20

    def event_fn(t, state):
        return state[0] - state[2]

    def step():
        gravity.grad = None
        counted["f"] = 0
        state = (torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                 torch.tensor([0.1], dtype=torch.float64))
        t0, loss, forward = torch.tensor([0.0], dtype=torch.float64), 0.0, 0
        for _ in range(bounces):
            event_t, solution = library.odeint_event(dynamics, state, t0, event_fn=event_fn, rtol=1e-8, atol=1e-8,
                                                     method="dopri5", **interface)
            pos, vel, radius = (s[-1] for s in solution)
            loss = loss + event_t.sum() + pos.pow(2).sum()
            state = (pos + 1e-7, -0.9 * vel, radius)
            t0 = event_t.reshape(-1)
        forward = counted["f"]
        loss.backward()
        return forward, bounces
    return step


def worker() -> None:
    import torch

    spec = json.loads(sys.stdin.read())
    # the row's checkout first: `python -m` put this one's root (the working folder) ahead of PYTHONPATH
    sys.path.insert(0, spec["pnode_path"])
    torch.set_num_threads(spec["threads"])
    row = Row(**spec["row"])
    step = _training_step(row, spec["quick"])
    # paired: torchdiffeq's step of the same workload and solver, in this process, alternating with this row's
    reference = (_training_step(Row(row.workload, row.solver, "torchdiffeq", "odeint"), spec["quick"])
                 if spec.get("paired") and row.library == "pnode" else None)
    for _ in range(spec["warmup"]):
        step()
        if reference is not None:
            reference()
    times, reference_times, stages, calls = [], [], 0, 1
    for i in range(spec["repeats"]):
        if reference is not None and i % 2:  # either one first, every other pair
            reference_times.append(_timed(reference)[0])
        seconds, (stages, calls) = _timed(step)
        times.append(seconds)
        if reference is not None and not i % 2:
            reference_times.append(_timed(reference)[0])
    result = {"times": times, "stages": stages, "calls": calls}
    if row.library == "pnode":
        import pnode

        result["pnode"] = os.path.dirname(os.path.abspath(pnode.__file__))
    if reference is not None:
        result["reference_times"] = reference_times
    print(RESULT_TAG + json.dumps(result), flush=True)


def _timed(step):
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------- driver
def run_row(row: Row, paths: Dict[str, str], args) -> Dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    path = os.path.abspath(paths.get(row.build, REPO_ROOT))
    spec = {"row": asdict(row), "quick": args.quick, "warmup": args.warmup, "repeats": args.repeats,
            "threads": args.threads, "paired": args.paired, "pnode_path": path}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fixed_cost", "--worker"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            ran = result.pop("pnode", None)
            if row.library == "pnode" and ran != os.path.join(path, "pnode"):
                return {"error": f"{row.id} ran the pnode in {ran}, not {path}'s"}
            return result
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def paired_ratio(res: Dict[str, object]) -> str:
    """The median and quartiles of a paired row's per-pair ratios (its step over torchdiffeq's step
    timed next to it), or '–' for a row without pairs. The quartiles interpolate between observed
    ratios (``statistics.quantiles``' inclusive method), never beyond them."""
    pairs = [t / r for t, r in zip(res.get("times", []), res.get("reference_times", []))]
    if len(pairs) < 2:
        return "–"
    q1, median, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
    return f"{median:.2f} ({q1:.2f}–{q3:.2f})"


def table(results: Dict[Row, Dict[str, object]]) -> str:
    paired = any("reference_times" in res for res in results.values())
    lines = ["| workload | solver | library | strategy | time / step (ms) | stages / step | µs / stage | µs / call "
             "| × torchdiffeq |" + (" × torchdiffeq, paired |" if paired else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if paired else "")]
    reference = {(r.workload, r.solver): res for r, res in results.items() if r.library == "torchdiffeq"}
    for row, res in results.items():
        name = row.library + (f" ({row.build})" if row.build else "")
        if "error" in res:
            lines.append(f"| {row.workload} | {row.solver} | {name} | {row.mode} | error: "
                         f"{res['error'].strip().splitlines()[-1][:80]} | | | | |")
            continue
        median = statistics.median(res["times"])
        ref = reference.get((row.workload, row.solver))
        ratio = f"{median / statistics.median(ref['times']):.2f}" if ref and "error" not in ref else "–"
        lines.append(f"| {row.workload} | {row.solver} | {name} | {row.mode} | {median * 1e3:.1f} | {res['stages']} | "
                     f"{median / max(res['stages'], 1) * 1e6:.0f} | {median / res['calls'] * 1e6:.0f} | {ratio} |"
                     + (f" {paired_ratio(res)} |" if paired else ""))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="times every row is measured, a row after another")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per row and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--quick", action="store_true", help="toy sizes")
    parser.add_argument("--rows", default="*", help="a glob of row ids (workload/solver/library:call)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=PATH",
                        help="also the pnode rows of the checkout at PATH, labelled LABEL")
    parser.add_argument("--paired", action="store_true",
                        help="every pnode row also times torchdiffeq's step of its workload in its own process, "
                             "alternating step for step; the table adds the median (and quartiles) of the "
                             "per-pair ratios, which the machine's drift moves less than a ratio of medians")
    parser.add_argument("--out", default=None, help="write fixed_cost.json and fixed_cost.md here")
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return
    import fnmatch

    paths = dict(item.split("=", 1) for item in args.compare)
    selected = [r for r in rows(["", *paths]) if fnmatch.fnmatch(r.id, args.rows)]
    results: Dict[Row, Dict[str, object]] = {r: {"times": []} for r in selected}
    for round_ in range(args.rounds):
        for i, row in enumerate(selected):
            print(f"[round {round_ + 1}/{args.rounds}] {i + 1}/{len(selected)} {row.id}", file=sys.stderr, flush=True)
            res = run_row(row, paths, args)
            if "error" in res:
                results[row] = res
            elif "error" not in results[row]:
                merged = {**res, "times": results[row]["times"] + res["times"]}
                if "reference_times" in res:
                    merged["reference_times"] = results[row].get("reference_times", []) + res["reference_times"]
                results[row] = merged
    text = table(results)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fixed_cost.json"), "w") as fh:
            json.dump({"command": " ".join(["python -m benchmarks.fixed_cost", *(argv or sys.argv[1:])]),
                       "rows": [{**asdict(r), **res} for r, res in results.items()]}, fh, indent=1)
        with open(os.path.join(args.out, "fixed_cost.md"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
