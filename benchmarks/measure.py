"""Measure rows, each in a fresh interpreter: time and peak memory of a training step, gradient error.

A row is one solver configuration on one workload (:class:`Row`). Every row runs in its own process
(``python -m benchmarks.measure --worker``, the row as JSON on stdin), so that its peak memory is
its own and no other row's solvers, caches or heap layout are in it. The worker:

1. builds the workload (:mod:`benchmarks.workloads`) and evaluates f once in each way the row's
   solver will (torch's lazy set-up and imports: :func:`benchmarks.workloads.prime`), then takes
   the **baseline**: the resident anonymous memory (``RssAnon``: heap and anonymous mappings; not
   code or mapped files, whose pages the first call of a library touches once) after handing the
   memory that glibc keeps cached back to the OS (``malloc_trim``);
2. takes ``warmup`` training steps (the first builds and pools pnode's PETSc solvers), then
   ``repeats`` timed ones: **time / step** is their median wall time (s);
3. takes ``memory_steps`` more, each after ``malloc_trim``: **peak** is the most anonymous memory
   resident during the step minus the baseline, **held** the anonymous memory just before the
   step minus the baseline (what stays allocated between steps: pnode's pooled solvers and their
   work vectors); the medians count. The peak comes from the kernel's high-water mark of the RSS
   (``VmHWM``, reset just before the step by writing 5 to ``/proc/self/clear_refs``: exact however
   short the peak) less the file-backed pages (:class:`benchmarks.memory.PeakMemory`); where the
   kernel refuses the
   reset, a thread samples ``RssAnon`` every millisecond instead (``memory`` says which). It
   counts every allocation of the process alike: torch's CPU tensors (which torch takes from
   malloc without a cache of its own), PETSc's vectors, Python objects. MB means 2**20 bytes;
4. counts the evaluations of f of one step (pnode's ``EvaluationCounter``; torchdiffeq: calls of
   f); for pnode rows, one more forward solve gives the steps taken and, for implicit methods,
   Newton and Krylov iterations and tolerances read from its PETSc TS;
5. computes the relative gradient error (of ``dL/dy0`` and of ``dL/dparams``, the larger counts)
   against autograd through the same steps (explicit RK: PETSc's own sums,
   :mod:`pnode.testing.petsc_arithmetic`; implicit: :mod:`pnode.testing.references`); torchdiffeq
   ``odeint_adjoint`` against torchdiffeq ``odeint`` with the same method and steps.

With ``rounds`` > 1 the driver measures the rows again, in the same order, rounds - 1 more times
(a fresh process per row and round, steps 1-2 only), and a row's **time / step** is the median of
its timed steps from every round: the machine's speed wanders by tens of percent over minutes, and
rounds spread that drift over every row alike instead of charging it to the rows measured in a
slow minute. Memory, counts and gradient errors come from the first round.

The worker prints one line ``BENCHMARK_RESULT {json}``; a row that fails (an option pnode does not
accept, a solver error, a time-out) comes back as ``{"error": "..."}`` and the run goes on.
"""

import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from benchmarks.memory import anonymous_mb, release_free_memory, step_memory

RESULT_TAG = "BENCHMARK_RESULT "
LIBRARIES = ("pnode", "torchdiffeq-odeint", "torchdiffeq-adjoint")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Row:
    """What one row runs.

    Attributes:
        workload: a key of :data:`benchmarks.workloads.WORKLOADS` ('odenet', 'small').
        library: 'pnode', 'torchdiffeq-odeint' (backprop through the solver) or
            'torchdiffeq-adjoint' (torchdiffeq's continuous adjoint).
        method: the solver's method name ('rk4', 'dopri5', 'cn', 'beuler'); torchdiffeq's 'rk4' is
            the 3/8 rule, pnode's the classic one.
        steps: fixed steps over the span (``step_size = t_end / steps``), or None: adaptive.
        tol: rtol = atol of an adaptive row.
        options: pnode's ``options`` beyond ``step_size`` (strategy, budget, solver tolerances).
    """

    workload: str
    library: str
    method: str
    steps: Optional[int] = None
    tol: Optional[float] = None
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if self.library not in LIBRARIES:
            raise ValueError(f"library {self.library!r} is not one of {', '.join(LIBRARIES)}")
        if (self.steps is None) == (self.tol is None):
            raise ValueError(f"a row has fixed steps or a tolerance, not both or neither: steps={self.steps}, "
                             f"tol={self.tol}")

    @property
    def solver(self) -> str:
        """The solver configuration, shared by the rows that are compared: 'rk4-16', 'dopri5-1e-03'."""
        return f"{self.method}-{self.steps}" if self.steps is not None else f"{self.method}-{self.tol:.0e}"

    @property
    def id(self) -> str:
        """'workload/solver/library[:options]', unique in a run (``--rows`` matches it)."""
        if self.library != "pnode":
            return f"{self.workload}/{self.solver}/{self.library}"
        return f"{self.workload}/{self.solver}/pnode:{options_text(self.options, ',') or 'default'}"

    def to_json(self) -> Dict[str, object]:
        return {"id": self.id, "solver": self.solver, **asdict(self), "options": dict(self.options)}

    @staticmethod
    def from_json(data: Mapping[str, object]) -> "Row":
        return Row(**{key: value for key, value in data.items() if key in Row.__dataclass_fields__})


def options_text(options: Mapping[str, object], separator: str = ", ") -> str:
    """``{'checkpoints': 4, 'checkpoint_graphs': 0}`` -> 'checkpoints=4, checkpoint_graphs=0'."""
    return separator.join(f"{key}={value}" for key, value in options.items())


@dataclass(frozen=True)
class Settings:
    """How every row of a run is measured.

    Attributes:
        quick: the workloads' toy sizes.
        warmup: untimed training steps first.
        repeats: timed training steps (the median counts).
        memory_steps: training steps whose peak memory is measured (the median counts).
        threads: torch's intra-op threads.
        keep_freed_memory: every row first calls ``pnode.allocator.keep_freed_memory()`` (glibc
            keeps freed memory for the next step instead of returning it to the OS).
        return_freed_memory: every row first calls ``pnode.allocator.return_freed_memory()``
            (blocks of 1 MiB or more are unmapped when freed: resident memory follows live memory).
        grad_check: whether to compute the gradient error.
        rounds: measure the times of every row this many times, a row after another (see the module
            docstring); the later rounds take no memory steps and no gradient error.
        timeout_s: seconds a row may take, its process included.
    """

    quick: bool = False
    warmup: int = 1
    repeats: int = 5
    memory_steps: int = 3
    threads: int = 1
    keep_freed_memory: bool = False
    return_freed_memory: bool = False
    grad_check: bool = True
    rounds: int = 1
    timeout_s: float = 3600.0


# ---------------------------------------------------------------------------- the solvers of a row
class CountedSolve:
    """``solve(y0) -> y(t_end)`` by the row's library, counting evaluations of f.

    ``snapshot()`` gives the counts so far; a call records the counts before and after the forward
    solve (``start``, ``after_forward``), so that :meth:`phase_counts` can split a training step.
    Only the row's own library is imported (a torchdiffeq row never initialises PETSc).
    """

    def __init__(self, row: Row, problem):
        self.row = row
        self.problem = problem
        self.calls = 0
        self.counter = self.stats = None
        if row.library == "pnode":
            from pnode._impl.odeint import odeint_adjoint_reported
            from pnode._impl.rhs import EvaluationCounter
            from pnode._impl.stats import SolveStats

            self.counter = EvaluationCounter()
            self.stats = SolveStats(counter=self.counter)
            self._odeint = functools.partial(odeint_adjoint_reported, problem.func, stats=self.stats)
        else:
            import torchdiffeq

            self._odeint = (functools.partial(torchdiffeq.odeint, self.func) if row.library == "torchdiffeq-odeint"
                            else functools.partial(torchdiffeq.odeint_adjoint, self.func,
                                                   adjoint_params=tuple(problem.func.parameters())))
        self.start = self.after_forward = self.snapshot()

    def func(self, t, y):
        """The workload's f, counted (torchdiffeq rows)."""
        self.calls += 1
        return self.problem.func(t, y)

    def solver_options(self) -> Dict[str, object]:
        row = self.row
        options = {} if row.steps is None else {"step_size": float(self.problem.t[-1]) / row.steps}
        return {**options, **row.options} if row.library == "pnode" else options

    def __call__(self, y0):
        tolerances = {} if self.row.tol is None else {"rtol": self.row.tol, "atol": self.row.tol}
        self.start = self.snapshot()
        ys = self._odeint(y0, self.problem.t, method=self.row.method, options=self.solver_options(), **tolerances)
        self.after_forward = self.snapshot()
        return ys[-1]

    def snapshot(self) -> Dict[str, int]:
        c = self.counter
        if c is None:
            return {"f": self.calls}
        return {"f": c.forward, "jvp": c.jvp, "graphs": c.backward, "vjp": c.vjp}

    def phase_counts(self) -> Dict[str, Dict[str, int]]:
        """Counts of the last training step: ``{'forward': {...}, 'backward': {...}}``."""
        end = self.snapshot()
        return {"forward": {k: self.after_forward[k] - self.start[k] for k in end},
                "backward": {k: end[k] - self.after_forward[k] for k in end}}


def pnode_forward_solve(row: Row, problem, options: Mapping[str, object]) -> Dict[str, object]:
    """What pnode's forward solve of ``row`` does, from one more solve without a trajectory.

    Returns ``step_times`` (the accepted steps' times, ``[t0, ..., t_end]``) and, for an implicit
    method, ``newton_its`` and ``krylov_its`` of the solve (PETSc's ``TSGetSNESIterations`` and
    ``TSGetKSPIterations``, counted from the start of the solve; an adjoint resets them, so they
    are read here and not after a training step) and the tolerances of its SNES and KSP (what
    PETSc ran, whatever set it). The solve has the training step's inputs, so it takes the same
    steps and iterations. pnode has no public accessor for its forward record yet
    (``pnode._impl.problem.check_inputs``, ``pnode._impl.adjoint.solve_forward``): this is the one place that
    depends on them.
    """
    from pnode._impl.adjoint import release_solver, solve_forward
    from pnode._impl.problem import check_inputs
    from pnode.testing.petsc_arithmetic import petsc_tableau

    tol = 1e-7 if row.tol is None else row.tol  # pnode's default rtol; fixed steps do not use it
    pnode_problem = check_inputs(problem.func, problem.x, problem.t, tol, tol, row.method, dict(options), None)
    key, solver, record = solve_forward(pnode_problem, (), record=False)
    try:
        result: Dict[str, object] = {"step_times": [float(t) for t in record.step_times],
                                     "step_sizes": [float(h) for h in record.step_sizes]}
        if not solver.explicit:
            result.update(implicit_solve(solver.ts))
        elif solver.ts.getType() == "rk":
            result["tableau"] = petsc_tableau(solver.ts)
        return result
    finally:
        release_solver(key, solver)


def implicit_solve(ts) -> Dict[str, object]:
    """Newton and Krylov iterations of the TS's last solve, and its SNES and KSP settings."""
    snes = ts.getSNES()
    ksp = snes.getKSP()
    snes_rtol, snes_atol, snes_stol, snes_max_it = snes.getTolerances()
    ksp_rtol, ksp_atol, _, ksp_max_it = ksp.getTolerances()
    solver = {"ts": ts.getType(), "snes": snes.getType(), "snes_rtol": snes_rtol, "snes_atol": snes_atol,
              "snes_stol": snes_stol, "snes_max_it": snes_max_it, "ksp": ksp.getType(), "ksp_rtol": ksp_rtol,
              "ksp_atol": ksp_atol, "ksp_max_it": ksp_max_it, "eisenstat_walker": bool(snes.getUseEW())}
    return {"newton_its": ts.getSNESIterations(), "krylov_its": ts.getKSPIterations(), "solver": solver}


# ---------------------------------------------------------------------------- the worker
def timed_steps(problem, solve: CountedSolve, count: int) -> List[float]:
    from benchmarks.workloads import training_step

    times = []
    for _ in range(count):
        start = time.perf_counter()
        training_step(problem, solve)
        times.append(time.perf_counter() - start)
    return times


def solve_record(row: Row, problem, solve: CountedSolve) -> Optional[Dict[str, object]]:
    """``step_times`` of the row's solver (the fixed grid, or pnode's accepted steps), and for pnode rows
    what :func:`pnode_forward_solve` reads; None for adaptive torchdiffeq rows (not recorded)."""
    from pnode.testing import references

    if row.library == "pnode":
        return pnode_forward_solve(row, problem, solve.solver_options())
    if row.steps is None:
        return None
    return {"step_times": references.fixed_grid(float(problem.t[-1]), row.steps)}


def step_counts(record: Optional[Dict[str, object]], counts: Dict[str, Dict[str, int]]) -> Dict[str, object]:
    """``steps`` taken (torchdiffeq adaptive: ``steps_tried``); of implicit rows, iterations per step and
    the Newton and Krylov settings (``solver``)."""
    if record is None:
        # torchdiffeq's dopri5: two evaluations choose the first step, then six per attempted step
        return {"steps_tried": (counts["forward"]["f"] - 2) // 6}
    steps = len(record["step_times"]) - 1
    result: Dict[str, object] = {"steps": steps}
    if "newton_its" in record:
        result.update(newton_per_step=record["newton_its"] / steps, krylov_per_step=record["krylov_its"] / steps,
                      adjoint_vjps_per_step=counts["backward"]["vjp"] / steps, solver=record["solver"])
    return result


def reference_solve(row: Row, problem, record: Optional[Dict[str, object]]) -> Optional[Callable]:
    """The solve that a row's gradient is compared with (None for torchdiffeq odeint: it is one)."""
    from pnode._impl.bridge import petsc_dtype
    from pnode.testing import references
    from pnode.testing.petsc_arithmetic import petsc_rk_reference

    if row.library == "torchdiffeq-odeint":
        return None
    if row.library == "torchdiffeq-adjoint":
        return CountedSolve(Row(**{**asdict(row), "library": "torchdiffeq-odeint"}), problem)
    times, real = record["step_times"], petsc_dtype()
    func = references.in_dtype(problem.func, problem.x.dtype)
    if record.get("tableau") is not None:  # explicit RK: PETSc's own sums, bit for bit
        sizes, tableau = record["step_sizes"], record["tableau"]
        return lambda y0: petsc_rk_reference(func, y0.to(real), times, sizes, tableau).to(y0.dtype)
    return lambda y0: references.reference(func, y0.to(real), times, row.method).to(y0.dtype)


def gradient_error(row: Row, problem, solve: CountedSolve, record: Optional[Dict[str, object]]) -> Dict[str, object]:
    """``grad_error``: the larger relative error of ``dL/dy0`` and ``dL/dparams`` against the reference."""
    from benchmarks.workloads import gradients
    from pnode.testing.references import relative_error

    reference = reference_solve(row, problem, record)
    if reference is None:
        return {"grad_error": None}
    got, want = gradients(problem, solve), gradients(problem, reference)
    y0_error, param_error = relative_error(got[:1], want[:1]), relative_error(got[1:], want[1:])
    return {"grad_error": max(y0_error, param_error), "grad_error_y0": y0_error, "grad_error_params": param_error}


def measure_row(row: Row, settings: Settings) -> Dict[str, object]:
    """Time, memory, evaluations, iterations and gradient error of one row (in this process)."""
    import torch

    from benchmarks import workloads
    from pnode.testing.references import THETA

    torch.set_num_threads(settings.threads)
    problem = workloads.build(row.workload, settings.quick)
    solve = CountedSolve(row, problem)
    workloads.prime(problem, jvp=row.method in THETA)  # pnode's implicit methods take JVPs
    release_free_memory()
    baseline = anonymous_mb()
    timed_steps(problem, solve, settings.warmup)
    times = timed_steps(problem, solve, settings.repeats)
    if settings.memory_steps == 0:  # a later round: times only
        return {"time_s": statistics.median(times), "times_s": times}
    counts = solve.phase_counts()
    memory = [step_memory(lambda: workloads.training_step(problem, solve), baseline)
              for _ in range(settings.memory_steps)]
    result: Dict[str, object] = {
        "time_s": statistics.median(times), "times_s": times, "evaluations": counts,
        "peak_mb": statistics.median(m["peak_mb"] for m in memory),
        "held_mb": statistics.median(m["held_mb"] for m in memory), "memory": memory[0]["memory"]}
    if solve.stats is not None and solve.stats.adjoint is not None:
        result["adjoint"] = asdict(solve.stats.adjoint)  # what the last step's strategy chose and held
    record = solve_record(row, problem, solve)
    result.update(step_counts(record, counts))
    if settings.grad_check:
        try:
            result.update(gradient_error(row, problem, solve, record))
        except Exception as exc:  # noqa: BLE001 - the time and memory above still stand
            traceback.print_exc()
            result["grad_check_error"] = f"{type(exc).__name__}: {exc}"
    return result


def apply_memory_policy(settings: Settings) -> None:
    """Apply the run's policy for freed memory (:mod:`pnode.allocator`) in a worker, if it has one."""
    if settings.keep_freed_memory or settings.return_freed_memory:
        from pnode import allocator

        policy = allocator.keep_freed_memory if settings.keep_freed_memory else allocator.return_freed_memory
        if not policy():
            raise RuntimeError(f"{policy.__name__} needs glibc")


def serve_worker(measure: Callable[[Row, Settings], Dict[str, object]]) -> None:
    """A worker process: read ``{"row": ..., "settings": ...}`` from stdin, apply the memory policy,
    ``measure(row, settings)``, print the tagged result line (an exception becomes the row's error)."""
    spec = json.load(sys.stdin)
    row, settings = Row.from_json(spec["row"]), Settings(**spec["settings"])
    sys.argv = sys.argv[:1]  # pnode initialises PETSc from sys.argv: keep the worker's own flags out
    try:
        apply_memory_policy(settings)
        result = measure(row, settings)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the row's error
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_TAG + json.dumps(result), flush=True)


def worker_main() -> None:
    """The worker of this module's rows (:func:`measure_row`)."""
    serve_worker(measure_row)


# ---------------------------------------------------------------------------- the driver
def run_in_subprocess(row: Row, settings: Settings, module: str = "benchmarks.measure") -> Dict[str, object]:
    """Measure ``row`` in a fresh interpreter (``python -m <module> --worker``, the row and settings as
    JSON on stdin); a crash or time-out becomes ``{"error": ...}``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    spec = json.dumps({"row": row.to_json(), "settings": asdict(settings)})
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--worker"], input=spec, env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=settings.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {settings.timeout_s:g} s"}
    lines = proc.stdout.splitlines()
    result = next((json.loads(line[len(RESULT_TAG):]) for line in reversed(lines) if line.startswith(RESULT_TAG)),
                  None)
    if result is None or "error" in result or "grad_check_error" in result:
        sys.stderr.write(proc.stderr[-3000:])
    if result is None:
        last = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": f"worker exited with status {proc.returncode}: {last[-1] if last else 'no output'}"}
    return result


def progress_line(index: int, total: int, row: Row, result: Mapping[str, object], seconds: float) -> str:
    head = f"[{index}/{total}] {row.id}"
    if "error" in result:
        return f"{head}: error: {result['error']} ({seconds:.0f} s)"
    if "peak_mb" not in result:  # a later round: times only
        return f"{head}: {result['time_s']:.3f} s/step ({seconds:.0f} s)"
    error = result.get("grad_error")
    return (f"{head}: {result['time_s']:.3f} s/step, peak {result['peak_mb']:.1f} MB, held {result['held_mb']:.1f} MB, "
            f"grad error {'-' if error is None else f'{error:.1e}'} ({seconds:.0f} s)")


def run_rows(rows: Sequence[Row], settings: Settings, done: int = 0, total: Optional[int] = None,
             module: str = "benchmarks.measure") -> List[Dict[str, object]]:
    """Measure each row in its own process (``python -m <module> --worker``), in order, in
    ``settings.rounds`` rounds; returns ``[{**row.to_json(), 'result': ...}]``.

    ``done`` and ``total`` number the progress lines (stderr) when a run measures rows in batches.
    """
    entries = [{**row.to_json(), "result": _measured(row, settings, i, total or len(rows), module)}
               for i, row in enumerate(rows, done + 1)]
    times_only = replace(settings, memory_steps=0, grad_check=False)
    for round_number in range(2, settings.rounds + 1):
        for i, (row, entry) in enumerate(zip(rows, entries), done + 1):
            if "error" in entry["result"]:
                continue
            later = _measured(row, times_only, i, total or len(rows), module, f" (round {round_number})")
            entry["result"] = merge_round(entry["result"], later)
    return entries


def _measured(row: Row, settings: Settings, index: int, total: int, module: str, note: str = "") -> Dict[str, object]:
    start = time.perf_counter()
    result = run_in_subprocess(row, settings, module)
    print(progress_line(index, total, row, result, time.perf_counter() - start) + note, file=sys.stderr, flush=True)
    return result


def merge_round(result: Dict[str, object], later: Mapping[str, object]) -> Dict[str, object]:
    """``result`` with the timed steps of a later round added (time / step: the median of them all);
    a later round that failed is noted and leaves the times as they were."""
    if "error" in later:
        return {**result, "round_errors": [*result.get("round_errors", []), later["error"]]}
    times = [*result["times_s"], *later["times_s"]]
    return {**result, "times_s": times, "time_s": statistics.median(times), "rounds": result.get("rounds", 1) + 1}


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        raise SystemExit("usage: python -m benchmarks.measure --worker  (a row as JSON on stdin)")
    worker_main()
