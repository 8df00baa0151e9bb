"""Render a results document (the JSON an entry point writes) as markdown tables and figures.

Tables state measurements and ratios only (no targets, no verdicts). Ratios are taken between
rows of the same document, that is of one run: each row over torchdiffeq ``odeint`` and over
torchdiffeq ``odeint_adjoint`` of the same workload and solver (strategies), or over ``rk4`` at the
same number of steps (implicit). Figures ask one question each: peak memory against time per
training step (one per workload, one panel per solver), time per training step against the
number of steps (implicit).

Re-render without running anything::

    python -m benchmarks.report bench-results/strategies.json [--out DIR]
"""

import argparse
import json
import os
import textwrap
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from benchmarks.measure import options_text

Entry = Mapping[str, object]
SHORT_OPTION = {"adjoint": "{}", "checkpoints": "K={}", "checkpoint_graphs": "{} graphs", "memory_budget": "{}"}
"""How an option reads in a figure's labels (other options: key=value)."""
TORCHDIFFEQ = {"torchdiffeq-odeint": "odeint", "torchdiffeq-adjoint": "odeint_adjoint"}
STYLE = {"torchdiffeq-odeint": ("s", "tab:red"), "torchdiffeq-adjoint": ("D", "tab:orange"),
         "pnode": ("o", "tab:blue"), "budget": ("^", "tab:green")}
"""(marker, colour) of each kind of row in the figures."""


# ---------------------------------------------------------------------------- labels and cells
def label(entry: Entry) -> str:
    """'torchdiffeq odeint', 'pnode default', 'pnode checkpoints=4, checkpoint_graphs=0', ..."""
    if entry["library"] in TORCHDIFFEQ:
        return f"torchdiffeq {TORCHDIFFEQ[entry['library']]}"
    return f"pnode {options_text(entry['options']) or 'default'}"


def short_label(entry: Entry) -> str:
    """The label of a marker: 'odeint', 'default', 'graphs', 'K=4, 0 graphs', '120MB'."""
    if entry["library"] in TORCHDIFFEQ:
        return TORCHDIFFEQ[entry["library"]]
    parts = [SHORT_OPTION.get(key, key + "={}").format(value) for key, value in entry["options"].items()]
    return ", ".join(parts) or "default"


def solver_title(entry: Entry) -> str:
    if entry["steps"] is not None:
        return f"{entry['method']}, {entry['steps']} steps"
    return f"{entry['method']}, rtol = atol = {entry['tol']:g}"


def cell(text: object, limit: int = 160) -> str:
    """Table-safe text: one line, no pipes, at most ``limit`` characters."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def number(value: Optional[float], digits: str = ".3f") -> str:
    return "–" if value is None else format(value, digits)


def ratio(entry: Entry, other: Optional[Entry], key: str) -> str:
    """``entry[key] / other[key]`` of two results, or '–' where either is missing."""
    if other is None or "error" in other["result"] or "error" in entry["result"] or not other["result"][key]:
        return "–"
    return f"{entry['result'][key] / other['result'][key]:.3f}"


def steps_cell(result: Mapping[str, object]) -> str:
    if "steps" in result:
        return str(result["steps"])
    return f"~{result['steps_tried']} tried" if "steps_tried" in result else "–"


def evaluations(result: Mapping[str, object]) -> tuple:
    """(NFE-F, NFE-B, recomputed): evaluations of f (and JVPs) in the forward pass; evaluations with a
    graph (pnode) or calls of f (torchdiffeq) in the backward pass; pnode's evaluations without a
    graph in the backward pass (checkpointed steps taken again)."""
    forward, backward = result["evaluations"]["forward"], result["evaluations"]["backward"]
    if "graphs" in backward:
        return forward["f"] + forward["jvp"], backward["graphs"], backward["f"]
    return forward["f"], backward["f"], 0


def grad_cell(entry: Entry) -> str:
    result = entry["result"]
    if "grad_check_error" in result:
        return f"error: {cell(result['grad_check_error'], 80)}"
    if "grad_error" not in result:
        return "–"
    return "ref" if result["grad_error"] is None else f"{result['grad_error']:.1e}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def error_row(entry: Entry, width: int) -> List[str]:
    return [label(entry), f"error: {cell(entry['result']['error'])}"] + ["–"] * (width - 2)


def groups(doc: Mapping[str, object], by: Sequence[str] = ("workload", "solver")) -> Dict[tuple, List[Entry]]:
    """The document's entries grouped by the values of the fields ``by``, in the order they first appear."""
    grouped: Dict[tuple, List[Entry]] = {}
    for entry in doc["rows"]:
        grouped.setdefault(tuple(entry[name] for name in by), []).append(entry)
    return grouped


def preamble(doc: Mapping[str, object], title: str, definitions: str) -> str:
    m, s = doc["machine"], doc["settings"]
    kept = "; every row keeps freed memory (pnode.allocator.keep_freed_memory)" if s["keep_freed_memory"] else ""
    if s.get("return_freed_memory"):
        kept = "; every row returns freed memory (pnode.allocator.return_freed_memory)"
    machine = (f"{m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, petsc4py {m['petsc4py']}, torchdiffeq "
               f"{m['torchdiffeq']}, Python {m['python']}; torch threads {s['threads']}{kept}")
    methods = sorted({e["result"]["memory"] for e in doc["rows"] if "memory" in e["result"]})
    rounds = s.get("rounds", 1)
    timed = (f"median of {s['repeats']} timed steps" if rounds == 1 else
             f"median of {s['repeats']} timed steps in each of {rounds} rounds over the rows (a process per row and "
             f"round, so that the machine's drift reaches every row alike)")
    measured = (f"{s['warmup']} warm-up step(s), time: {timed}, peak and held memory: "
                f"median of {s['memory_steps']} further steps of the first round (peak: {' or '.join(methods) or '–'})"
                + ("; quick run: toy sizes" if s["quick"] else ""))
    return "\n\n".join([f"## {title} ({doc['date']})", f"`{doc['command']}`", f"Machine: {machine}.",
                        f"Measured: {measured}. {definitions}"])


DEFINITIONS = (
    "A training step is forward solve, MSE loss, backward. Time: wall time of a step (s). Peak: the most resident "
    "anonymous memory (heap and anonymous mappings: tensors, PETSc vectors, Python objects; not code) during a "
    "step minus that before the first step (MB = 2^20 bytes); held: the part of it that stays allocated between "
    "steps. NFE-F: evaluations of f (and JVPs) in the forward pass; "
    "NFE-B: evaluations of f with a graph in the backward pass (+ those without, recomputing checkpointed steps). "
    "Grad error: relative error of dL/dy0 or dL/dparams, the larger, against autograd through the same steps in "
    "pnode's arithmetic (explicit RK: PETSc's own sums, bit for bit); for torchdiffeq odeint_adjoint, against "
    "torchdiffeq odeint (ref).")


# ---------------------------------------------------------------------------- strategies
STRATEGY_HEADER = ("row", "time / step (s)", "time × odeint", "time × odeint_adjoint", "peak (MB)", "peak × odeint",
                   "peak × odeint_adjoint", "held (MB)", "steps", "NFE-F", "NFE-B (+recomputed)", "grad error")


def strategy_row(entry: Entry, odeint: Optional[Entry], adjoint: Optional[Entry]) -> List[str]:
    result = entry["result"]
    if "error" in result:
        return error_row(entry, len(STRATEGY_HEADER))
    nfe_f, nfe_b, recomputed = evaluations(result)
    return [label(entry), f"{result['time_s']:.3f}", ratio(entry, odeint, "time_s"), ratio(entry, adjoint, "time_s"),
            f"{result['peak_mb']:.1f}", ratio(entry, odeint, "peak_mb"), ratio(entry, adjoint, "peak_mb"),
            f"{result['held_mb']:.1f}", steps_cell(result), str(nfe_f),
            str(nfe_b) + (f" (+{recomputed})" if recomputed else ""), grad_cell(entry)]


def is_budget(entry: Entry) -> bool:
    return "memory_budget" in entry["options"]


BUDGET_HEADER = ("budget", "chose", "held for the adjoint (MB)", "peak (MB)", "peak − budget (MB)",
                 "time / step (s)", "time × previous budget's", "NFE-B (+recomputed)", "grad error")


def budget_mib(budget: str) -> float:
    """A budget row's ``memory_budget`` ('164MiB'; MB = 2**20 bytes in these tables) in MiB."""
    from pnode._impl.budget import parse_bytes

    return parse_bytes(budget) / 2**20


def chosen(adjoint: Optional[Mapping[str, object]]) -> str:
    """What a budget row's last step chose, from its ``AdjointStats`` ('–' if not recorded)."""
    if not adjoint:
        return "–"
    if adjoint["strategy"] == "checkpoints":
        return f"K = {adjoint['checkpoints']} checkpoints"
    if adjoint["strategy"] != "graphs":
        return str(adjoint["strategy"])
    if adjoint.get("stage_states"):
        return f"{adjoint['graphs_kept']} graphs, {adjoint['states_stored']} states with stages"
    return f"all {adjoint['graphs_kept']} graphs"


def held_for_adjoint(adjoint: Optional[Mapping[str, object]]) -> str:
    """Graphs, stored states and solver vectors, as the budget counts them (MB)."""
    if not adjoint:
        return "–"
    total = adjoint["graph_bytes"] + adjoint["stored_bytes"] + adjoint["solver_bytes"]
    return f"{total / 2**20:.1f}"


def budget_table(entries: Sequence[Entry]) -> str:
    """Budget, choice, held bytes, peak, their difference and time of each budget row, in the order of the run."""
    rows, previous = [], None
    for entry in entries:
        result, budget = entry["result"], str(entry["options"]["memory_budget"])
        if "error" in result:
            rows.append([budget, f"error: {cell(result['error'])}"] + ["–"] * (len(BUDGET_HEADER) - 2))
            continue
        _, nfe_b, recomputed = evaluations(result)
        adjoint = result.get("adjoint")
        rows.append([budget, chosen(adjoint), held_for_adjoint(adjoint), f"{result['peak_mb']:.1f}",
                     f"{result['peak_mb'] - budget_mib(budget):+.1f}", f"{result['time_s']:.3f}",
                     ratio(entry, previous, "time_s"), str(nfe_b) + (f" (+{recomputed})" if recomputed else ""),
                     grad_cell(entry)])
        previous = entry
    return table(BUDGET_HEADER, rows)


def one_step_graphs(entries: Sequence[Entry]) -> Optional[float]:
    """One step's kept graphs (MB) as pnode measured them, from a row that kept every graph: the
    transient a budget does not count (one step re-taken with its graphs, or one stage evaluated)."""
    for entry in entries:
        result = entry["result"]
        adjoint = result.get("adjoint")
        if adjoint and adjoint["strategy"] == "graphs" and adjoint["graphs_kept"] and adjoint["steps"]:
            per_graph = adjoint["graph_bytes"] / adjoint["graphs_kept"]
            stages = result["evaluations"]["forward"]["f"] / adjoint["steps"]
            return per_graph * stages / 2**20
    return None


def strategies_markdown(doc: Mapping[str, object]) -> str:
    ratios = " × odeint, × odeint_adjoint: this row over torchdiffeq's row of the same workload and solver."
    parts = [preamble(doc, "Adjoint strategies and memory budgets against torchdiffeq", DEFINITIONS + ratios)]
    for (workload, _), entries in groups(doc).items():
        odeint = next((e for e in entries if e["library"] == "torchdiffeq-odeint"), None)
        adjoint = next((e for e in entries if e["library"] == "torchdiffeq-adjoint"), None)
        parts.append(f"### {doc['workloads'][workload]}; {solver_title(entries[0])}")
        rows = [strategy_row(e, odeint, adjoint) for e in entries if not is_budget(e)]
        parts.append(table(STRATEGY_HEADER, rows))
        budgets = [e for e in entries if is_budget(e)]
        if budgets:
            parts.append(f"Memory budgets (`memory_budget`), {solver_title(entries[0])}, each row with "
                         "`pnode.allocator.return_freed_memory()` (glibc unmaps freed blocks of 1 MiB or more, so "
                         "the resident peak follows live memory; times are not comparable with the rows above):")
            parts.append(budget_table(budgets))
            step = one_step_graphs(budgets)
            if step is not None:
                parts.append("One step's transient, which a budget does not count (one step's stage graphs, as "
                             f"pnode measured them): {step:.1f} MB. Held for the adjoint: kept graphs, stored states "
                             "and the solver's vectors, as the budget counts them.")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- implicit
IMPLICIT_HEADER = ("row", "time / step (s)", "time × rk4", "Newton its / step", "Krylov its / step",
                   "adjoint VJPs / step", "Newton rtol, atol", "Krylov rtol", "peak (MB)", "NFE-F", "NFE-B",
                   "grad error")


def tolerances(result: Mapping[str, object]) -> tuple:
    solver = result.get("solver")
    if not solver:
        return "–", "–"
    ew = ", Eisenstat–Walker" if solver["eisenstat_walker"] else ""
    return (f"{solver['snes_rtol']:.0e}, {solver['snes_atol']:.0e} ({solver['snes']})",
            f"{solver['ksp_rtol']:.0e} ({solver['ksp']}{ew})")


def implicit_row(entry: Entry, explicit: Optional[Entry]) -> List[str]:
    result = entry["result"]
    if "error" in result:
        return error_row(entry, len(IMPLICIT_HEADER))
    nfe_f, nfe_b, _ = evaluations(result)
    newton_tol, krylov_tol = tolerances(result)
    return [f"{entry['method']} ({label(entry)})", f"{result['time_s']:.3f}", ratio(entry, explicit, "time_s"),
            number(result.get("newton_per_step"), ".1f"), number(result.get("krylov_per_step"), ".1f"),
            number(result.get("adjoint_vjps_per_step"), ".1f"), newton_tol, krylov_tol, f"{result['peak_mb']:.1f}",
            str(nfe_f), str(nfe_b), grad_cell(entry)]


def implicit_markdown(doc: Mapping[str, object]) -> str:
    parts = [preamble(doc, "Implicit methods against rk4", DEFINITIONS
                      + " × rk4: this row over pnode rk4 at the same steps. Newton and Krylov iterations: PETSc's "
                        "counts in the forward solve, per step; adjoint VJPs: per step of the backward pass; "
                        "tolerances: read back from the TS's SNES and KSP.")]
    for (workload, steps), entries in groups(doc, ("workload", "steps")).items():
        explicit = next((e for e in entries if e["method"] == "rk4"), None)
        parts.append(f"### {doc['workloads'][workload]}; {steps} steps")
        parts.append(table(IMPLICIT_HEADER, [implicit_row(e, explicit) for e in entries]))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- figures
def pareto_front(points: Sequence[tuple]) -> List[tuple]:
    """The (time, peak) points that no other point beats in both, by increasing time."""
    front: List[tuple] = []
    for point in sorted(points):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    return front


def style_of(entry: Entry) -> tuple:
    return STYLE["budget" if is_budget(entry) else entry["library"]]


def pareto_panel(ax, entries: Sequence[Entry]) -> None:
    """Peak memory against time per step, one labelled marker per measured row."""
    done = [e for e in entries if "error" not in e["result"]]
    for entry in done:
        marker, color = style_of(entry)
        torchdiffeq = entry["library"] in TORCHDIFFEQ
        x, y = entry["result"]["time_s"], entry["result"]["peak_mb"]
        ax.scatter(x, y, marker=marker, color=color, s=90 if torchdiffeq else 45, zorder=3,
                   edgecolors="black" if torchdiffeq else "none")
        ax.annotate(short_label(entry), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                    fontweight="bold" if torchdiffeq else "normal")
    budgets = [e["result"] for e in done if is_budget(e)]
    if budgets:
        ax.plot([r["time_s"] for r in budgets], [r["peak_mb"] for r in budgets], color=STYLE["budget"][1], lw=1)
    # budget rows run with freed memory returned to the OS (slower, lower peaks): not on the same front
    front = pareto_front([(e["result"]["time_s"], e["result"]["peak_mb"]) for e in done if not is_budget(e)])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", ls="--", lw=0.8, zorder=1)
    failed = len(entries) - len(done)
    ax.set_title(solver_title(entries[0]) + (f" ({failed} rows failed)" if failed else ""), fontsize=10)
    ax.set_xlabel("time per training step (s)")
    ax.margins(0.2)
    ax.set_xlim(left=0)  # from zero: distances read as ratios
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def strategies_figures(doc: Mapping[str, object], out_dir: str, plt) -> List[str]:
    paths = []
    by_workload: Dict[str, List[List[Entry]]] = {}
    for (workload, _), entries in groups(doc).items():
        by_workload.setdefault(workload, []).append(entries)
    for workload, panels in by_workload.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 5.5 * len(panels)), 5.0), squeeze=False)
        for ax, entries in zip(axes[0], panels):
            pareto_panel(ax, entries)
        axes[0][0].set_ylabel("peak memory of a training step (MB)")
        title = textwrap.fill(f"Peak memory against time per training step: {doc['workloads'][workload]}", 90)
        note = "torchdiffeq outlined; dashed: the rows no other row beats in both"
        if any(is_budget(e) for panel in panels for e in panel):
            note += "; green: memory budgets, with freed memory returned to the OS"
        fig.suptitle(f"{title}\n({note})", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{doc['benchmark']}-{workload}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def implicit_figures(doc: Mapping[str, object], out_dir: str, plt) -> List[str]:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    lines: Dict[str, List[tuple]] = {}
    for entry in doc["rows"]:
        if "error" not in entry["result"]:
            lines.setdefault(entry["method"], []).append((entry["steps"], entry["result"]["time_s"]))
    for method, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    steps = sorted({p[0] for points in lines.values() for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("fixed steps over the span")
    ax.set_ylabel("time per training step (s)")
    ax.set_title("Time per training step against steps (pnode)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{doc['benchmark']}-time.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


RENDERERS: Dict[str, tuple] = {"strategies": (strategies_markdown, strategies_figures),
                               "implicit": (implicit_markdown, implicit_figures)}
"""benchmark name -> (markdown renderer, figure renderer)."""


def figures(doc: Mapping[str, object], out_dir: str) -> List[str]:
    """Draw the document's figures into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draw: Callable = RENDERERS[doc["benchmark"]][1]
    return draw(doc, out_dir, plt)


def render(doc: Mapping[str, object], out_dir: str, stem: str) -> str:
    """Write ``stem.md`` and the figures from ``doc`` into ``out_dir``; returns the markdown."""
    text = RENDERERS[doc["benchmark"]][0](doc)
    with open(os.path.join(out_dir, stem + ".md"), "w") as fh:
        fh.write(text)
    figures(doc, out_dir)
    return text


def write(doc: Mapping[str, object], out_dir: str, stem: str) -> str:
    """Write ``stem.json``, then render the markdown and figures from it; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    return render(doc, out_dir, stem)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a results document written by benchmarks.strategies or benchmarks.implicit")
    parser.add_argument("--out", help="directory for the markdown and figures (default: the JSON's)")
    args = parser.parse_args(argv)
    with open(args.json) as fh:
        doc = json.load(fh)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    print(render(doc, out_dir, os.path.splitext(os.path.basename(args.json))[0]))


if __name__ == "__main__":
    main()
