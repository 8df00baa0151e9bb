"""pnode against torchdiffeq on a GPU: time and device memory of a training step.

Rows (a training step each: solve from the input, MSE loss of the final state, backward; see
:mod:`benchmarks.workloads`), float32 states on CUDA:

* ODE-Net block, batch 128 and 512 of 64 x 8 x 8, t in [0, 1]: rk4 with 16 steps, dopri5 at
  rtol = atol = 1e-3;
* the MLP 2-64-64-2 (tanh), batch 256 of 2, t in [0, 5]: rk4 with 50 steps, dopri5 at 1e-5;

each by pnode ``odeint_adjoint`` (its default: stored states), pnode ``odeint`` (kept graphs),
torchdiffeq ``odeint`` (backprop through its solver) and torchdiffeq ``odeint_adjoint``. pnode's
``rk4`` is the classic RK4, torchdiffeq's the 3/8 rule (the same cost: four evaluations a step).

Per row: the median wall time of ``--repeats`` training steps after one warm-up (each ended by
``torch.cuda.synchronize()``); **torch peak**: ``torch.cuda.max_memory_allocated`` during one more
step, less what was allocated before it; **other device memory**: the GPU memory in use outside
torch's allocator (``cudaMemGetInfo``'s used memory less ``torch.cuda.memory_reserved``) at the end
of that step's forward pass, less the same before the row's first step: PETSc's vectors (the solver's
work vectors and the trajectory), which torch does not see. Rows run in one process, one after
another (the pnode rows drop their pooled solvers after each row).

Without a GPU (or with ``--device cpu``) the rows run on the CPU, for a smoke test of this module
(``--quick``: toy sizes, one timed step); the report then says that the GPU rows were skipped::

    python -m benchmarks.gpu --out bench-results/gpu                # on a GPU machine
    python -m benchmarks.gpu --quick --device cpu                   # smoke run on a CPU
    python -m benchmarks.gpu --render bench-results/gpu/gpu.json --into BENCHMARKS.md
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks import cli

LIBRARIES = ("pnode:states", "pnode:graphs", "torchdiffeq:odeint", "torchdiffeq:odeint_adjoint")
SECTION_START, SECTION_END = "<!-- gpu-benchmarks -->", "<!-- /gpu-benchmarks -->"


@dataclass(frozen=True)
class Workload:
    """A network and its batch: ``kind`` 'odenet' or 'mlp', ``batch`` states, over [0, ``t_end``]."""

    name: str
    kind: str
    batch: int
    t_end: float

    def build(self, quick: bool, device: torch.device, seed: int = 0):
        """``(func, x, target, t)``: the network and data of a training step, float32, on ``device``."""
        from pnode.testing.networks import MLPFunc, ODENetFunc

        torch.manual_seed(seed)
        channels = 8 if quick else 64
        func = ODENetFunc(channels) if self.kind == "odenet" else MLPFunc()
        shape = (min(self.batch, 8) if quick else self.batch,) + ((channels, 8, 8) if self.kind == "odenet" else (2,))
        x = torch.randn(shape)
        target = torch.randn_like(x)
        t = torch.tensor([0.0, self.t_end])
        return func.to(device), x.to(device), target.to(device), t.to(device)

    def describe(self, quick: bool) -> str:
        if self.kind == "odenet":
            return f"ODE-Net block, batch {min(self.batch, 8) if quick else self.batch} of {8 if quick else 64}x8x8"
        return f"MLP 2-64-64-2 (tanh), batch {min(self.batch, 8) if quick else self.batch} of 2"


WORKLOADS = {w.name: w for w in (Workload("odenet-b128", "odenet", 128, 1.0),
                                 Workload("odenet-b512", "odenet", 512, 1.0), Workload("mlp-b256", "mlp", 256, 5.0))}
SOLVERS = {"odenet": (("rk4", 16, None), ("dopri5", None, 1e-3)), "mlp": (("rk4", 50, None), ("dopri5", None, 1e-5))}


@dataclass(frozen=True)
class Row:
    """One row: a workload, a method with ``steps`` fixed steps or tolerance ``tol``, a library."""

    workload: str
    method: str
    steps: Optional[int]
    tol: Optional[float]
    library: str

    @property
    def solver(self) -> str:
        return f"{self.method}/{self.steps}" if self.steps is not None else f"{self.method}/{self.tol:g}"

    @property
    def id(self) -> str:
        return f"{self.workload}/{self.solver}/{self.library}"


def rows() -> List[Row]:
    return [Row(w.name, method, steps, tol, library) for w in WORKLOADS.values()
            for method, steps, tol in SOLVERS[w.kind] for library in LIBRARIES]


def solve_function(row: Row, func, t) -> Callable[[torch.Tensor], torch.Tensor]:
    """``y0 -> y(t_end)`` by the row's library and method."""
    options = {} if row.steps is None else {"step_size": float(t[-1]) / row.steps}
    tolerances = {} if row.tol is None else {"rtol": row.tol, "atol": row.tol}
    library, mode = row.library.split(":")
    if library == "pnode":
        import pnode

        call = pnode.odeint if mode == "graphs" else pnode.odeint_adjoint
    else:
        import torchdiffeq

        call = torchdiffeq.odeint if mode == "odeint" else torchdiffeq.odeint_adjoint
    extra = {"adjoint_params": tuple(func.parameters())} if mode in ("states", "odeint_adjoint") else {}
    return lambda y0: call(func, y0, t, method=row.method, options=options, **tolerances, **extra)[-1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _other_device_bytes(device: torch.device) -> int:
    """GPU memory in use outside torch's allocator (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def measure(row: Row, quick: bool, repeats: int, device: torch.device) -> Dict[str, object]:
    """Time and memory of the row's training step on ``device``."""
    func, x, target, t = WORKLOADS[row.workload].build(quick, device)
    solve = solve_function(row, func, t)
    mid_forward = {}

    def step():
        func.zero_grad(set_to_none=True)
        y_end = solve(x.detach().requires_grad_(True))
        mid_forward["other"] = _other_device_bytes(device)
        torch.nn.functional.mse_loss(y_end, target).backward()
        _synchronize(device)

    _synchronize(device)
    other_before = _other_device_bytes(device)
    step()  # warm-up: pnode builds and pools its solver, torch its kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result: Dict[str, object] = {"time_s": statistics.median(times), "times_s": times}
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        result["torch_peak_mb"] = (torch.cuda.max_memory_allocated(device) - allocated) / 2**20
        result["other_device_mb"] = (mid_forward["other"] - other_before) / 2**20
    return result


def run(selected: Sequence[Row], quick: bool, repeats: int, device: torch.device) -> List[Dict[str, object]]:
    """Measure each row in this process, one after another; a failing row comes back as its error."""
    entries = []
    for i, row in enumerate(selected, 1):
        started = time.perf_counter()
        try:
            result = measure(row, quick, repeats, device)
        except Exception as exc:  # noqa: BLE001 - a row's failure is reported, the others go on
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if row.library.startswith("pnode"):
                import pnode

                pnode.clear_cache()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        entries.append({**asdict(row), "id": row.id, "result": result})
        shown = result.get("error") or f"{result['time_s'] * 1e3:.1f} ms/step"
        print(f"[{i}/{len(selected)}] {row.id}: {shown} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)
    return entries


def device_description(device: torch.device) -> Dict[str, object]:
    """The GPU (or the CPU) the rows ran on, and whether PETSc kept its vectors there."""
    info: Dict[str, object] = {"device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    from pnode._compat import petsc_has_cuda

    info["petsc_cuda"] = petsc_has_cuda()
    return info


# ------------------------------------------------------------------ the report
def _ratio(entry: Dict[str, object], baseline: Optional[Dict[str, object]]) -> str:
    if baseline is None or "error" in baseline["result"] or "error" in entry["result"]:
        return "-"
    return f"{entry['result']['time_s'] / baseline['result']['time_s']:.2f}x"


def render(doc: Dict[str, object]) -> str:
    """The markdown of a results document: one table per workload and solver."""
    lines = [SECTION_START, f"## On a GPU ({doc['date']})", ""]
    machine = doc["machine"]
    if doc.get("skipped"):
        lines += [f"GPU rows skipped: {doc['skipped']}. Nothing here was measured on a GPU.", "", SECTION_END]
        return "\n".join(lines) + "\n"
    if machine["device"] == "cpu":
        lines += ["Measured on the CPU (a smoke test of this module, `--device cpu`): no GPU was used.", ""]
    lines += [f"Device: {machine.get('gpu', machine['device'])}; PETSc with CUDA: {machine['petsc_cuda']}; torch "
              f"{machine.get('torch')}, petsc4py {machine.get('petsc4py')}, torchdiffeq {machine.get('torchdiffeq')}. "
              f"Command: `{doc['command']}`.", "",
              "Time: median of the timed training steps. torch peak: `torch.cuda.max_memory_allocated` during a "
              "step; other: GPU memory outside torch's allocator at the end of the forward pass (PETSc's vectors).",
              ""]
    by_table: Dict[tuple, List[Dict[str, object]]] = {}
    for entry in doc["rows"]:
        by_table.setdefault((entry["workload"], entry["method"], entry["steps"], entry["tol"]), []).append(entry)
    for (workload, method, steps, tol), entries in by_table.items():
        baseline = next((e for e in entries if e["library"] == "torchdiffeq:odeint"), None)
        solver = f"{method}, {steps} steps" if steps is not None else f"{method}, rtol = atol = {tol:g}"
        lines += [f"### {WORKLOADS[workload].describe(doc['settings']['quick'])}; {solver}", "",
                  "| library | time / step | vs torchdiffeq odeint | torch peak | other device memory |",
                  "|---|---|---|---|---|"]
        for entry in entries:
            result = entry["result"]
            if "error" in result:
                lines.append(f"| {entry['library']} | error: {result['error'][:100]} | | | |")
                continue
            peak = f"{result['torch_peak_mb']:.1f} MB" if "torch_peak_mb" in result else "-"
            other = f"{result['other_device_mb']:.1f} MB" if "other_device_mb" in result else "-"
            lines.append(f"| {entry['library']} | {result['time_s'] * 1e3:.1f} ms | {_ratio(entry, baseline)} | "
                         f"{peak} | {other} |")
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def render_into(markdown: str, path: str) -> None:
    """Replace the GPU section of the markdown file at ``path`` (between its markers), or append it."""
    text = open(path).read() if os.path.exists(path) else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + markdown.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + markdown
    with open(path, "w") as fh:
        fh.write(text)


# ------------------------------------------------------------------ the entry point
def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes (batch 8), one timed step")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto (default): the GPU, or, without one, the rows are reported as skipped; cpu: run "
                             "them on the CPU (a smoke test)")
    parser.add_argument("--rows", nargs="+", metavar="PATTERN", help="only the rows whose id matches (see --list)")
    parser.add_argument("--list", action="store_true", help="print the ids of the rows and exit")
    parser.add_argument("--repeats", type=int, default=None, help="timed training steps per row (default 5)")
    parser.add_argument("--out", default="bench-results/gpu", help="directory for gpu.json and gpu.md")
    parser.add_argument("--render", metavar="JSON", help="render a results document instead of measuring")
    parser.add_argument("--into", metavar="MARKDOWN", help="with --render: replace the GPU section of this file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.render:
        with open(args.render) as fh:
            markdown = render(json.load(fh))
        if args.into:
            render_into(markdown, args.into)
        print(markdown)
        return
    selected = [row for row in rows() if cli.matches(row.id, args.rows)]
    if args.list:
        print("\n".join(row.id for row in selected))
        return
    sys.argv = sys.argv[:1]  # pnode initialises PETSc from sys.argv: keep this module's flags out
    skipped = None
    if args.device == "auto" and not torch.cuda.is_available():
        skipped, selected = "no GPU here (torch.cuda.is_available() is False)", []
    device = torch.device("cuda" if args.device in ("auto", "cuda") else "cpu")
    repeats = args.repeats or (1 if args.quick else 5)
    entries = run(selected, args.quick, repeats, device)
    machine = {**cli.machine(), **(device_description(device) if not skipped else {"device": "cpu"})}
    doc = {"benchmark": "gpu", "command": " ".join(["python -m benchmarks.gpu", *argv]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
           "settings": {"quick": args.quick, "repeats": repeats, "device": str(device)}, "rows": entries,
           "skipped": skipped}
    if skipped:
        print(f"GPU rows skipped: {skipped}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    markdown = render(doc)
    with open(os.path.join(args.out, "gpu.md"), "w") as fh:
        fh.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
