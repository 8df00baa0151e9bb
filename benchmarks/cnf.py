"""The CNF example's 64-d digits flow trained by pnode's adjoint strategies and by torchdiffeq.

Rows, each in a process of its own (:func:`benchmarks.measure.run_in_subprocess`), all on the
example's default model and data (``examples/cnf.py --data digits``: one CNF block, f = 2 x 256
concat-squash layers with softplus, float64, dopri5 with rtol = atol = 1e-4, Hutchinson's trace with
Rademacher probes, global batch 256, Adam with lr 2e-3; the same initial weights, batches and probes
in every row):

* pnode: its default (stored states), kept graphs (``adjoint='graphs'``), binomial checkpoints
  (``checkpoints=1``: one state held, every other step recomputed from the start);
* torchdiffeq 0.2.5: ``odeint_adjoint`` (the continuous adjoint) and ``odeint`` (backpropagation
  through the solver's operations), with the same method and tolerances.

Every row runs on one torch thread unless ``--threads`` says otherwise, as the example does. Rows
are measured by :func:`benchmarks.measure.run_rows` with this module's worker. Per row: ``warmup``
+ ``repeats`` training iterations, the budget (``--repeats 99``: 100 iterations;
**time / iteration** is the median of the ``repeats`` timed ones); then the **test NLL** of the
trained flow (exact trace, the 360 test images, in nats), evaluated by pnode with dopri5 at the
training tolerance for every row, so that rows differ only in how they trained; then
``memory_steps`` more iterations whose **peak** memory (the most resident anonymous memory during the
iteration minus that before the first one, as in :mod:`benchmarks.measure`) and **held** memory
(between iterations) count, medians. **NFE-F / NFE-B**: evaluations of f per iteration in the forward
and the backward pass (mean over the timed iterations; for pnode, the blocks' counters; for
torchdiffeq, calls of f, those of its adjoint solve in the backward pass). With ``--rounds N`` the
timed iterations are measured N times (a process per row and round, budget and all) and their
median counts; NLL, NFE and memory come from the first round. Writes ``cnf.json`` and ``cnf.md``
(printed too) to ``--out``::

    python -m benchmarks.cnf --rounds 3              # the table in BENCHMARKS.md
    python -m benchmarks.cnf --quick --out /tmp/b    # toy sizes, seconds per row
"""

import argparse
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from benchmarks import cli
from benchmarks.measure import Row, Settings, run_rows, serve_worker

WORKLOAD = "cnf-digits"
TOLERANCE = 1e-4
STRATEGIES = ({}, {"adjoint": "graphs"}, {"checkpoints": 1})
EXAMPLE = {"data": "digits", "blocks": 1, "hidden": 256, "layers": 2, "activation": "softplus",
           "layer": "concatsquash", "time_length": 1.0, "method": "dopri5", "rtol": TOLERANCE, "atol": TOLERANCE,
           "step_size": None, "trace": "hutchinson", "noise": "rademacher", "kinetic": 0.0, "jacobian": 0.0,
           "batch_size": 256, "lr": 2e-3, "test_size": 0}
QUICK = {"hidden": 32, "batch_size": 32, "test_size": 40}
DEFAULT_REPEATS = 99


def base_rows() -> List[Row]:
    rows = [Row(WORKLOAD, "pnode", "dopri5", tol=TOLERANCE, options=dict(options)) for options in STRATEGIES]
    return rows + [Row(WORKLOAD, library, "dopri5", tol=TOLERANCE)
                   for library in ("torchdiffeq-adjoint", "torchdiffeq-odeint")]


def example_args(quick: bool) -> argparse.Namespace:
    return argparse.Namespace(**{**EXAMPLE, **(QUICK if quick else {})})


# ---------------------------------------------------------------------------------------------- the worker
def _examples():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import cnf
    import density_data

    return cnf, density_data


class TorchdiffeqBlock(nn.Module):
    """Stands in for a CNF block's ``pnode.ODEBlock``: the same dynamics solved by torchdiffeq.

    Counts evaluations of f like an ODEBlock: ``nfe_backward`` are those of ``odeint_adjoint``'s
    backward solve (grad enabled there, disabled in its forward solve); ``odeint`` has none.
    """

    def __init__(self, block: nn.Module, adjoint: bool):
        super().__init__()
        self.func, self.t, self.rtol, self.atol, self.adjoint = block.func, block.t, block.rtol, block.atol, adjoint
        self.nfe_forward = self.nfe_backward = 0

    def reset_nfe(self) -> None:
        self.nfe_forward = self.nfe_backward = 0

    def counted(self, t: torch.Tensor, state):
        if self.adjoint and torch.is_grad_enabled():
            self.nfe_backward += 1
        else:
            self.nfe_forward += 1
        return self.func(t, state)

    def forward(self, state):
        import torchdiffeq

        extra = {"adjoint_params": tuple(self.func.parameters())} if self.adjoint else {}
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        ys = solve(self.counted, state, self.t.to(state[0].dtype), rtol=self.rtol, atol=self.atol, method="dopri5",
                   **extra)
        return tuple(y[-1] for y in ys)


def build(row: Row, settings: Settings):
    """``(model, optimizer, data, args)`` of ``row``: the example's flow, its solver swapped for the row's."""
    from pnode import distributed

    cnf, density_data = _examples()
    args = example_args(settings.quick)
    distributed.seed_everything(0, per_rank=False)
    data = density_data.load_density("digits", test_size=args.test_size)
    model = cnf.build_model(args, data.dim)
    for i, block in enumerate(model.blocks):
        if row.library == "pnode":
            block.options.update(row.options)
        else:
            model.blocks[i] = TorchdiffeqBlock(block, adjoint=row.library == "torchdiffeq-adjoint")
    return model, torch.optim.Adam(model.parameters(), lr=args.lr), data, args


def prime(model, data) -> None:
    """One forward and backward of f with Hutchinson's trace on a few rows, outside any solver: torch's lazy
    set-up (and the modules its first VJP imports) then counts in no row's memory."""
    cnf, _ = _examples()
    x = data.test[:4].clone()
    dynamics = model.blocks[0].func
    dynamics.noise = cnf.draw_probes("rademacher", x.shape, x.dtype)
    rates = dynamics(torch.zeros((), dtype=x.dtype), (x, torch.zeros(4, 1, dtype=x.dtype)))
    sum(r.sum() for r in rates).backward()
    dynamics.noise = None
    model.zero_grad(set_to_none=True)


def measure_row(row: Row, settings: Settings) -> Dict[str, object]:
    """Time, evaluations, test NLL after the budget and memory of one row (in this process)."""
    from benchmarks.memory import anonymous_mb, release_free_memory, step_memory

    cnf, density_data = _examples()
    torch.set_num_threads(settings.threads)
    model, optimizer, data, args = build(row, settings)
    prime(model, data)
    flow = cnf.CNF([block.func for block in model.blocks], "dopri5", TOLERANCE, TOLERANCE)  # evaluates every row
    initial = {} if settings.memory_steps == 0 else {"initial_nll": cnf.evaluate_nll(flow, data.test)}
    release_free_memory()
    baseline = anonymous_mb()
    steps = [cnf.train_step(model, optimizer, data, args) for _ in range(settings.warmup)]
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        steps.append(cnf.train_step(model, optimizer, data, args))
        times.append(time.perf_counter() - start)
    result: Dict[str, object] = {"time_s": statistics.median(times), "times_s": times}
    if settings.memory_steps == 0:  # a later round: times only
        return result
    timed = steps[settings.warmup:] or steps
    result.update(initial, test_nll=cnf.evaluate_nll(flow, data.test), iterations=len(steps),
                  baselines=density_data.gaussian_baselines(data),
                  train_nll=steps[-1]["train_nll"],
                  nfe_forward=statistics.mean(s["nfe_forward"] for s in timed),
                  nfe_backward=statistics.mean(s["nfe_backward"] for s in timed))
    memory = [step_memory(lambda: cnf.train_step(model, optimizer, data, args), baseline)
              for _ in range(settings.memory_steps)]
    result.update(peak_mb=statistics.median(m["peak_mb"] for m in memory),
                  held_mb=statistics.median(m["held_mb"] for m in memory), memory=memory[0]["memory"])
    stats = getattr(model.blocks[0], "stats", None)
    if stats is not None and stats.adjoint is not None:
        a = stats.adjoint
        result["adjoint"] = {"strategy": a.strategy, "steps": a.steps, "graphs_kept": a.graphs_kept,
                             "states_stored": a.states_stored, "checkpoints": a.checkpoints,
                             "recomputed_steps": a.recomputed_steps}
    return result


# ---------------------------------------------------------------------------------------------- the report
def row_name(entry: Mapping[str, object]) -> str:
    if entry["library"] != "pnode":
        return {"torchdiffeq-adjoint": "torchdiffeq odeint_adjoint", "torchdiffeq-odeint": "torchdiffeq odeint"}[
            entry["library"]]
    options = entry["options"]
    return "pnode " + (", ".join(f"{k}={v}" for k, v in options.items()) if options else "default")


def markdown(doc: Mapping[str, object]) -> str:
    """The results document as a caption and one table."""
    s, m = doc["settings"], doc["machine"]
    measured = [e["result"] for e in doc["rows"] if "test_nll" in e["result"]]
    first = measured[0] if measured else {}
    odeint = next((e["result"] for e in doc["rows"] if e["library"] == "torchdiffeq-odeint"
                   and "error" not in e["result"]), None)
    budget = first.get("iterations", s["warmup"] + s["repeats"])
    lines = [f"`{doc['command']}` ({doc['date']})",
             f"Machine: {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, petsc4py {m['petsc4py']}, torchdiffeq "
             f"{m['torchdiffeq']}; torch threads {s['threads']}. {doc['workload']} Budget: {budget} iterations; time: "
             f"median of the last {s['repeats']} in each of {s['rounds']} round(s) (a process per row and round); "
             f"peak and held memory: median of {s['memory_steps']} further iterations. Test NLL at iteration 0: "
             f"{first.get('initial_nll', float('nan')):.2f} nats; a diagonal Gaussian fitted to the training data: "
             f"{first.get('baselines', {}).get('diagonal_gaussian', float('nan')):.2f}, a full-covariance one: "
             f"{first.get('baselines', {}).get('full_gaussian', float('nan')):.2f}.",
             f"| row | time / iteration (s) | time × odeint | NFE-F / NFE-B | peak (MB) | peak × odeint | held (MB) "
             f"| test NLL after {budget} iterations (nats) | adjoint |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in doc["rows"]:
        lines.append(table_row(entry, odeint))
    return "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n"


def table_row(entry: Mapping[str, object], odeint: Optional[Mapping[str, object]]) -> str:
    r, name = entry["result"], row_name(entry)
    if "error" in r:
        return f"| {name} | error: {r['error'][:120]} |" + " – |" * 8
    ratio = (lambda key: f"{r[key] / odeint[key]:.2f}") if odeint else (lambda key: "–")
    a = r.get("adjoint")
    held = "–" if a is None else (f"{a['strategy']}: {a['steps']} steps, {a['graphs_kept']} graphs, "
                                  f"{a['states_stored']} states" + (f", {a['recomputed_steps']} recomputed"
                                                                    if a["checkpoints"] is not None else ""))
    return (f"| {name} | {r['time_s']:.3f} | {ratio('time_s')} | {r['nfe_forward']:.1f} / {r['nfe_backward']:.1f} | "
            f"{r['peak_mb']:.1f} | {ratio('peak_mb')} | {r['held_mb']:.1f} | {r['test_nll']:.2f} | {held} |")


def document(settings: Settings, entries: List[Dict[str, object]], argv: Sequence[str]) -> Dict[str, object]:
    args = example_args(settings.quick)
    workload = (f"Model: the CNF example's digits flow (64 dims; {args.blocks} block, f = {args.layers} x "
                f"{args.hidden} {args.layer} layers with {args.activation}, float64), dopri5 rtol = atol = "
                f"{TOLERANCE:g}, Hutchinson's trace, batch {args.batch_size}, Adam lr {args.lr:g}, the same weights, "
                "batches and probes in every row; test NLL with the exact trace by pnode for every row.")
    return {"benchmark": "cnf", "command": f"python -m benchmarks.cnf {shlex.join(argv)}".rstrip(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": cli.machine(), "settings": settings.__dict__,
            "workload": workload, "rows": entries}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = cli.arguments(argv)
    parser = cli.new_parser(__doc__)
    parser.set_defaults(threads=1)  # as the example runs (one torch thread per process)
    args = parser.parse_args(argv)
    rows = cli.select(base_rows(), args.rows)
    if cli.listed(args, rows):
        return
    if args.repeats is None and not args.quick:
        args.repeats = DEFAULT_REPEATS
    settings = cli.settings_from(args)
    doc = document(settings, run_rows(rows, settings, module="benchmarks.cnf"), argv)
    cli.save(doc, markdown(doc), args.out, "cnf")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        serve_worker(measure_row)
    else:
        main()
