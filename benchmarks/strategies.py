"""Adjoint strategies and memory budgets against torchdiffeq: time and peak memory of a training step.

Rows, each in its own process (:mod:`benchmarks.measure`), ratios from this one run:

* workloads and solvers: the ODE-Net block with rk4 at 16 and at 64 steps and dopri5 at
  rtol = atol = 1e-3; the small state (MLP) with dopri5 at rtol = atol = 1e-5 and rk4 at 50 steps;
  ``f(t, y) = a y`` on the small state with rk4 at 50 steps (each solver's own cost per stage);
* for each of them torchdiffeq ``odeint`` (backprop through the solver), torchdiffeq
  ``odeint_adjoint`` (continuous adjoint), and pnode with each of :data:`STRATEGIES` (the default,
  kept graphs, stored states, K = 4 binomial checkpoints with and without the stage graphs);
* ODE-Net rk4 at 64 steps with five memory budgets, from the lowest peak of the checkpointed rows
  to the peak of the kept-graphs row (both measured first, in this run), evenly spaced, or the
  budgets of ``--budgets``. A budget bounds the memory pnode holds, so these rows run with
  ``pnode.allocator.return_freed_memory()``: glibc unmaps freed blocks, and the resident peak
  follows live memory instead of the holes a forward pass leaves in the heap.

A row whose options pnode refuses is recorded with its error and shown as such. Writes
``strategies.json``, ``strategies.md`` (printed too) and one figure per workload,
``strategies-<workload>.png`` (peak memory against time per training step), to ``--out``::

    python -m benchmarks.strategies                       # everything (tens of minutes)
    python -m benchmarks.strategies --quick --out /tmp/b  # toy sizes, seconds per row
    python -m benchmarks.strategies --rows 'odenet/rk4-16/*'
"""

from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from benchmarks import cli
from benchmarks.measure import Row, Settings, run_rows

SOLVERS = (("odenet", "rk4", 16, None), ("odenet", "rk4", 64, None), ("odenet", "dopri5", None, 1e-3),
           ("small", "dopri5", None, 1e-5), ("small", "rk4", 50, None), ("scale", "rk4", 50, None))
"""(workload, method, fixed steps or None, tolerance or None) of each solver configuration."""
STRATEGIES = ({}, {"adjoint": "graphs"}, {"adjoint": "states"}, {"checkpoints": 4},
              {"checkpoints": 4, "checkpoint_graphs": 0})
"""pnode's options of the strategy rows: the default, kept graphs, stored states, binomial checkpoints."""
TORCHDIFFEQ = ("torchdiffeq-odeint", "torchdiffeq-adjoint")
KEPT_GRAPHS = {"adjoint": "graphs"}
BUDGET_SOLVERS = (("odenet", "rk4", 64, None),)
BUDGET_COUNT = 5
BUDGET_PLACEHOLDER = {"memory_budget": "auto"}
"""The options of the row that stands for a budget series before its budgets are known."""


def base_rows() -> List[Row]:
    rows = []
    for workload, method, steps, tol in SOLVERS:
        rows += [Row(workload, library, method, steps, tol) for library in TORCHDIFFEQ]
        rows += [Row(workload, "pnode", method, steps, tol, dict(options)) for options in STRATEGIES]
    return rows


def budget_series() -> List[Row]:
    """One placeholder row per budget series (``--rows`` selects a series by its id)."""
    return [Row(workload, "pnode", method, steps, tol, dict(BUDGET_PLACEHOLDER))
            for workload, method, steps, tol in BUDGET_SOLVERS]


def _peaks(entries: Sequence[Dict[str, object]], series: Row) -> Dict[str, List[float]]:
    """The measured peaks (MB) of the series' solver: of checkpointed rows, and of the kept-graphs row."""
    peaks: Dict[str, List[float]] = {"checkpoints": [], "graphs": []}
    for entry in entries:
        result = entry["result"]
        same = (entry["workload"], entry["solver"], entry["library"]) == (series.workload, series.solver, "pnode")
        if not same or "error" in result:
            continue
        if "checkpoints" in entry["options"]:
            peaks["checkpoints"].append(result["peak_mb"])
        if entry["options"] == KEPT_GRAPHS:
            peaks["graphs"].append(result["peak_mb"])
    return peaks


def budgets_for(entries: Sequence[Dict[str, object]], series: Row) -> List[int]:
    """:data:`BUDGET_COUNT` budgets (MB) from the checkpointed minimum to the kept-graphs peak, evenly spaced.

    Raises:
        ValueError: this run has no such rows, or the kept-graphs peak is not above the minimum.
    """
    peaks = _peaks(entries, series)
    if not peaks["checkpoints"] or not peaks["graphs"]:
        raise ValueError(f"budgets of {series.workload}/{series.solver} from this run's peaks of its checkpointed and "
                         f"kept-graphs {KEPT_GRAPHS} rows: not both measured; or pass --budgets MB,MB,...")
    low, high = min(peaks["checkpoints"]), max(peaks["graphs"])
    if high <= low:
        raise ValueError(f"the kept-graphs peak ({high:.0f} MB) is not above the checkpointed minimum ({low:.0f} MB)")
    return [round(low + (high - low) * i / (BUDGET_COUNT - 1)) for i in range(BUDGET_COUNT)]


def budget_rows(series: Row, budgets: Sequence[int]) -> List[Row]:
    return [Row(series.workload, "pnode", series.method, series.steps, series.tol, {"memory_budget": f"{mb}MiB"})
            for mb in budgets]


def run_budgets(series: Sequence[Row], entries: List[Dict[str, object]], budgets: Optional[List[int]],
                settings: Settings, total: int) -> List[Dict[str, object]]:
    """Measure each budget series (budgets from ``entries`` unless given), with freed memory returned to the OS;
    an unknown series budget is an error row."""
    done = []
    settings = replace(settings, keep_freed_memory=False, return_freed_memory=True)
    for placeholder in series:
        try:
            rows = budget_rows(placeholder, budgets or budgets_for(entries, placeholder))
        except ValueError as exc:
            done.append({**placeholder.to_json(), "result": {"error": str(exc)}})
            continue
        done += run_rows(rows, settings, len(entries) + len(done), total)
    return done


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = cli.arguments(argv)
    parser = cli.new_parser(__doc__)
    parser.add_argument("--budgets", type=cli.int_list, metavar="MB,MB,...",
                        help="memory budgets (MB = 2**20 bytes) of the budget rows, instead of five spaced from "
                             "the checkpointed minimum to the kept-graphs peak of this run")
    args = parser.parse_args(argv)
    rows, series = cli.select(base_rows(), args.rows), cli.select(budget_series(), args.rows)
    if cli.listed(args, rows + series):
        return
    settings = cli.settings_from(args)
    total = len(rows) + len(series) * (len(args.budgets) if args.budgets else BUDGET_COUNT)
    entries = run_rows(rows, settings, total=total)
    entries += run_budgets(series, entries, args.budgets, settings, total)
    cli.finish("strategies", settings, entries, argv, args.out)


if __name__ == "__main__":
    main()
