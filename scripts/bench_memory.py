"""Memory and time of one training step of the ODE-Net block: pnode against torchdiffeq.

Workload: one training step (zero_grad, forward, MSE loss against a fixed random target,
backward, SGD step with momentum) of the classic ODE-Net block (GroupNorm, ReLU, time-concat
conv 3x3, GroupNorm, ReLU, time-concat conv 3x3, GroupNorm; ``ODEFunc`` of scripts/bench_core.py)
integrated over t = [0, 1]; the input y0 requires grad, as it would behind a downsampling layer.
Default: batch 128, state 64x8x8, float32, on the CPU (and on the GPU when there is one).

Rows (each one configuration, run in a fresh process so that the peak RSS is its own):

* pnode (store all): PETSc's trajectory keeps every step; euler, rk4 (classic) and cn at fixed
  steps, dopri5 adaptive;
* pnode (K=4): ``options={'checkpoints': K}``, at most K states held, the rest recomputed in the
  backward pass (binomial schedule); euler, rk4, dopri5;
* pnode (K=4, stages re-evaluated): the same with ``options['checkpoint_graphs'] = 0``: a
  re-taken step drops its stage graphs and the adjoint evaluates each stage again (less memory,
  one more evaluation per stage); euler and rk4 at 16 steps. ``--lean-rows 0,2`` adds
  "last 2 stage graphs kept" rows (``checkpoint_graphs = 2``: the adjoint evaluates only the
  other stages again); ``--no-lean-rows``: none;
* torchdiffeq odeint (backprop through the solver) and odeint_adjoint (continuous adjoint);
  euler, rk4 (torchdiffeq's rk4 is the 3/8 rule) and dopri5;
* with ``--single-python PYTHON``, every pnode CPU row once more, run by an interpreter whose
  PETSc is a single-precision build ("float32 PETSc"): PETSc then integrates, stores and sums in
  float32, as torchdiffeq does, instead of float64.

Fixed-step rows take ``step_size = 1/steps`` (``--steps``, default 4, 16, 64); adaptive rows use
rtol = atol = ``--tol`` (1e-3). Columns:

* time / step: median over ``--repeats`` training steps after one warm-up step (CUDA synchronised).
  On the CPU it includes the page faults of memory that glibc returned to the OS after one step
  and the next step touches again; ``--keep-freed-memory`` makes every row (torchdiffeq's too)
  call ``pnode.allocator.keep_freed_memory()`` first, which removes them.
* page faults / step: minor page faults (getrusage's ru_minflt: first touches of a page, each
  zeroed by the kernel) during a timed training step, median like the time. Each is 4 KiB of
  memory that the step touched afresh.
* peak memory: the most memory the process held during a training step beyond what it held before
  the ODE block first ran, so that what the block keeps from one step to the next counts. On the
  CPU: peak RSS during one more training step (VmHWM, reset by writing 5 to /proc/self/clear_refs
  just before it) minus RSS before the first training step. Before each RSS baseline glibc hands
  the free memory it keeps cached back to the OS (malloc_trim), so that pages count however the
  allocator reuses them; the timed steps are left alone. Before the first baseline, one evaluation
  of the ODE function (forward, backward, SGD step) has initialised torch's kernels and the
  optimizer's state, which are not the block's. On CUDA: ``torch.cuda.max_memory_allocated``
  during the step minus ``memory_allocated`` before the first training step; the host RSS
  increase is shown beside it.
* held: the part of the peak that stays allocated between training steps (pooled PETSc solvers
  with their trajectories and Krylov workspaces): RSS (CUDA: allocated memory) just before the
  measured step minus before the first training step. Both include ~2 MB of allocator noise
  (pages malloc_trim cannot return), which only matters at toy sizes.
* NFE-F: evaluations of the ODE function in the forward pass (pnode: plus JVPs of Newton-Krylov);
  NFE-B: evaluations with a graph, each followed by VJPs, in the backward pass; "(+r)": r more
  evaluations without a graph that the backward pass spent recomputing checkpointed steps.
* grad error: the larger of the relative errors of the y0 gradient and of the parameter gradient
  against torch autograd through the same steps: a hand-written Euler or classic RK4 loop; for
  dopri5 the Dormand-Prince tableau over the step times pnode's forward solve accepted; for cn a
  hand-written Crank-Nicolson step (fixed-point iterations, VJPs by autograd). The reference does
  the row's own arithmetic: on a float64 PETSc pnode sums the steps of a float32 state in float64
  and evaluates the network in float32, so the reference of those explicit rows does too (each
  stage value cast down to the network, each evaluation cast back up), and computes the very
  function pnode differentiates. Beside it, "vs float32 autograd": the same loop in float32
  throughout. The two differ because the block's ReLUs make the gradient jump where a
  pre-activation crosses zero, and two computations whose round-off differs put a few of them on
  different sides: that alone moves the gradient by 1e-5 to 1e-3 (whoever computes it, against
  float64 autograd too; scripts/bench_grad_precision.py). On a float32 PETSc the textbook loop in
  float32 rounds differently from PETSc (its step sizes, its float32 tableau, the grouping of its
  stage sums, FSAL), which is enough to flip ReLUs; the reference of those explicit rows is
  autograd through PETSc's own float32 arithmetic (petsc_rk_reference, whose forward pass equals
  pnode's bit for bit), and "vs float32 autograd" the textbook loop. torchdiffeq odeint_adjoint
  rows are compared with backprop through torchdiffeq's own odeint with the same method and
  steps (its continuous adjoint's error); odeint rows are that reference ("ref"). The float64
  check below has no such noise.

Then an acceptance table computes the ratios the memory issue asks for from the rows of this run,
and ``--float64-check`` adds a small float64 run (pnode rk4, 16 steps, store all and K
checkpoints) against autograd, where round-off is ~1e-15.

The full benchmark::

    python scripts/bench_memory.py --markdown BENCHMARKS.md --float64-check \\
        --plot docs/figures/bench_memory_cpu.png

Smoke run (seconds per configuration)::

    python scripts/bench_memory.py --batch 4 --channels 8 --size 4 --steps 4 --repeats 1
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# pnode, torchdiffeq and bench_core (which imports pnode) are imported inside the worker's
# functions only: pnode initialises PETSc from sys.argv on import, and the worker clears its own
# flags from sys.argv first.
RESULT_TAG = "BENCH_MEMORY_RESULT "
PNODE_FAMILIES = ("pnode", "pnode-K", "pnode-K-lean")
FAMILIES = PNODE_FAMILIES + ("odeint", "odeint_adjoint")
STAGES = {"euler": 1, "rk4": 4}  # stage evaluations per step of the fixed-step methods
FLOAT64_CHECK = "float64-check"
METHOD_ORDER = ("euler", "rk4", "dopri5", "cn")
ADAPTIVE = ("dopri5",)
PNODE_METHODS = ("euler", "rk4", "dopri5", "cn")
TORCHDIFFEQ_METHODS = ("euler", "rk4", "dopri5")
EULER = ([0.0], [[]], [1.0])
# Crank-Nicolson rows: PETSc's default Newton tolerances cannot be met with float32 evaluations
# of f (DIVERGED_NONLINEAR_SOLVE); a Newton residual of 1e-6 is float32's level, and tight Krylov
# solves keep the adjoint's linear-solve error below the gradient's round-off. A float32 PETSc
# cannot resolve a Krylov tolerance of 1e-8 (each solve would run to its iteration cap): its rows
# ask for 1e-6, float32's level.
CN_OPTIONS = {"snes_rtol": 1e-6, "ksp_rtol": 1e-8}
CN_OPTIONS_FLOAT32_PETSC = {"snes_rtol": 1e-6, "ksp_rtol": 1e-6}
# Fixed-point tolerance of the Crank-Nicolson reference: a few ulps of the state's dtype.
CN_REFERENCE_TOL = {torch.float32: 4e-6, torch.float64: 1e-13}


@dataclass(frozen=True)
class Config:
    """One row of the benchmark, as passed to a worker process (JSON).

    Attributes:
        family: 'pnode', 'pnode-K', 'pnode-K-lean' (checkpoints, stage graphs not kept),
            'odeint', 'odeint_adjoint', or 'float64-check'.
        method: 'euler', 'rk4', 'dopri5' or 'cn'.
        steps: fixed steps over [0, 1] (step_size = 1/steps), or None for adaptive steps.
        device: 'cpu' or 'cuda'.
        batch, channels, size: the state is (batch, channels, size, size), float32.
        tol: rtol = atol of adaptive rows.
        checkpoints: K of 'pnode-K' rows and of the float64 check.
        repeats: timed training steps (the median is reported).
        threads: torch intra-op threads.
        grad_check: whether to compute the gradient error.
        petsc: '' for the PETSc of the interpreter running the benchmark, 'single' for a pnode row
            run by ``--single-python`` (a single-precision PETSc build).
        stage_graphs: of 'pnode-K-lean' rows, how many stage graphs a re-taken step keeps
            (``options['checkpoint_graphs']``; 0: every stage is evaluated again).
        keep_freed_memory: whether the worker first calls ``pnode.allocator.keep_freed_memory()``
            (glibc keeps freed memory for the next step instead of returning it to the OS).
    """

    family: str
    method: str
    steps: Optional[int]
    device: str = "cpu"
    batch: int = 128
    channels: int = 64
    size: int = 8
    tol: float = 1e-3
    checkpoints: int = 4
    repeats: int = 3
    threads: int = 1
    grad_check: bool = True
    petsc: str = ""
    stage_graphs: int = 0
    keep_freed_memory: bool = False

    @property
    def label(self) -> str:
        label = family_label(self.family, self.checkpoints, self.stage_graphs)
        return label[:-1] + ", float32 PETSc)" if self.petsc == "single" else label

    @property
    def is_pnode(self) -> bool:
        return self.family in PNODE_FAMILIES

    def describe(self) -> str:
        steps = f"{self.steps} steps" if self.steps else f"adaptive, tol {self.tol:g}"
        return f"{self.label} {self.method} ({steps}, {self.device})"


def family_label(family: str, checkpoints: int, stage_graphs: int = 0) -> str:
    lean = "stages re-evaluated" if stage_graphs == 0 else f"last {stage_graphs} stage graphs kept"
    return {"pnode": "pnode (store all)", "pnode-K": f"pnode (K={checkpoints})",
            "pnode-K-lean": f"pnode (K={checkpoints}, {lean})",
            "odeint": "torchdiffeq odeint", "odeint_adjoint": "torchdiffeq odeint_adjoint",
            FLOAT64_CHECK: "float64 check"}[family]


# ---------------------------------------------------------------------------- worker: the workload
class CountedFunc(nn.Module):
    """The ODE function with a count of its calls (torchdiffeq rows' NFE)."""

    def __init__(self, func: nn.Module):
        super().__init__()
        self.func = func
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.func(t, y)


class Solve:
    """``y(1)`` from ``y(0)`` by the row's solver over t = [0, 1], with evaluation counts."""

    def __init__(self, config: Config, func: CountedFunc):
        import torchdiffeq

        import pnode
        from pnode.rhs import EvaluationCounter

        self.config = config
        self.func = func
        self.t = torch.tensor([0.0, 1.0], device=config.device)
        self.counter = EvaluationCounter()
        self._pnode = pnode
        self._torchdiffeq = torchdiffeq

    def options(self) -> dict:
        cfg = self.config
        opts = {} if cfg.steps is None else {"step_size": 1.0 / cfg.steps}
        if cfg.is_pnode and cfg.method == "cn":
            opts.update(CN_OPTIONS_FLOAT32_PETSC if cfg.petsc == "single" else CN_OPTIONS)
        if cfg.family in ("pnode-K", "pnode-K-lean"):
            opts["checkpoints"] = cfg.checkpoints
        if cfg.family == "pnode-K-lean":
            opts["checkpoint_graphs"] = cfg.stage_graphs
        return opts

    def __call__(self, y0: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        kwargs = {"rtol": cfg.tol, "atol": cfg.tol, "method": cfg.method, "options": self.options()}
        if cfg.is_pnode:
            ys = self._pnode.odeint_adjoint(self.func, y0, self.t.to(y0.dtype), _counter=self.counter, **kwargs)
        elif cfg.family == "odeint_adjoint":
            ys = self._torchdiffeq.odeint_adjoint(self.func, y0, self.t.to(y0.dtype), **kwargs)
        else:
            ys = self._torchdiffeq.odeint(self.func, y0, self.t.to(y0.dtype), **kwargs)
        return ys[-1]

    def snapshot(self) -> Tuple[int, int]:
        """(evaluations without a graph, evaluations with one) so far; torchdiffeq: all calls twice."""
        if self.config.is_pnode:
            return self.counter.nfe_forward, self.counter.backward
        return self.func.calls, self.func.calls

    def nfe(self, start, after_forward, after_backward) -> Dict[str, int]:
        recompute = after_backward[0] - after_forward[0] if self.config.is_pnode else 0
        return {"nfe_f": after_forward[0] - start[0], "nfe_b": after_backward[1] - after_forward[1],
                "nfe_recompute": recompute}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_of(y1: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y1, target)


def minor_faults() -> int:
    """Page faults this process has taken that needed no disk read (first touches of pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def training_step(solve: Solve, x: torch.Tensor, target: torch.Tensor,
                  optimizer: torch.optim.Optimizer) -> Tuple[float, Dict[str, int]]:
    """One training step; returns its wall time (s), its evaluation counts and its page faults."""
    synchronize(x.device)
    faults = minor_faults()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    counts = [solve.snapshot()]
    y0 = x.detach().requires_grad_(True)
    loss = loss_of(solve(y0), target)
    counts.append(solve.snapshot())
    loss.backward()
    counts.append(solve.snapshot())
    optimizer.step()
    synchronize(x.device)
    elapsed = time.perf_counter() - start
    return elapsed, {**solve.nfe(*counts), "faults": minor_faults() - faults}


def prime(func: nn.Module, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One plain evaluation of f, forward and backward, and an SGD step: torch's lazy set-up, not the block's."""
    optimizer.zero_grad(set_to_none=True)
    loss_of(func(torch.tensor(0.0, device=x.device), x.detach().requires_grad_(True)), target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- worker: memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Hand memory the allocator keeps cached back to the OS, so that RSS is live memory."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: RSS may include freed memory the allocator keeps
        return
    # Pinning glibc's mmap threshold instead would make RSS follow live memory exactly, but it
    # slows torch's CPU kernels down by orders of magnitude (they map and unmap large buffers per call).
    libc.malloc_trim(0)


def block_baseline(device: torch.device) -> Tuple[float, float]:
    """(host RSS, device memory allocated) in MB, after giving cached memory back."""
    release_free_memory()
    allocated = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return rss_mb(), allocated


def measure_memory(step: Callable[[], object], device: torch.device,
                   before_block: Tuple[float, float]) -> Dict[str, object]:
    """Memory of one call of ``step`` (MB) over ``before_block``, the baseline before the first step.

    Returns ``peak_mb`` (the peak over ``before_block``), ``held_mb`` (held just before the step),
    ``step_peak_mb`` (the peak over what was held just before the step), ``host_peak_mb`` (the
    host RSS peak over ``before_block``; equal to ``peak_mb`` on the CPU) and ``hwm_reset``.
    """
    rss_before, allocated_before = block_baseline(device)
    hwm_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    step()
    host_peak = peak_rss_mb() - before_block[0]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - before_block[1]
        held = allocated_before - before_block[1]
    else:
        peak, held = host_peak, rss_before - before_block[0]
    return {"peak_mb": peak, "held_mb": held, "step_peak_mb": peak - held, "host_peak_mb": host_peak,
            "hwm_reset": hwm_reset}


MEMORY_STEPS = 3
"""Training steps whose memory is measured (each after handing cached memory back); the median counts."""


def median_memory(samples: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """The median of each measure of :func:`measure_memory` over ``samples`` (the CPU peak of one
    step moves by a few MB from step to step with where the allocator places its buffers)."""
    result: Dict[str, object] = {key: statistics.median(s[key] for s in samples)
                                 for key in ("peak_mb", "held_mb", "step_peak_mb", "host_peak_mb")}
    result["hwm_reset"] = all(s["hwm_reset"] for s in samples)
    return result


# ---------------------------------------------------------------------------- worker: gradients
def gradients(solve: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor,
              params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """(dL/dy0, dL/dparams...) of the loss through ``solve``."""
    y0 = x.detach().requires_grad_(True)
    return torch.autograd.grad(loss_of(solve(y0), target), (y0, *params))


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    num = sum(float((g - w).double().norm() ** 2) for g, w in zip(got, want)) ** 0.5
    den = sum(float(w.double().norm() ** 2) for w in want) ** 0.5
    return num / den


def worst_relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The larger of the relative errors of the y0 part (first) and of the parameter part (the rest)."""
    return max(relative_error(got[:1], want[:1]), relative_error(got[1:], want[1:]))


def fixed_point(update: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, tol: float,
                max_iter: int = 500) -> torch.Tensor:
    """Iterate ``x = update(x)`` until the relative change is below ``tol`` or stalls at round-off."""
    x, previous_change = start, float("inf")
    for _ in range(max_iter):
        new = update(x)
        change = float((new - x).norm() / new.norm())
        x = new
        if change <= tol or (change >= previous_change and change < tol**0.5):
            return x
        previous_change = change
    raise RuntimeError(f"Crank-Nicolson reference: fixed-point iteration did not converge in {max_iter} "
                       f"iterations (relative change {change:.1e}); the step is too large for it")


def _time(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(t, dtype=like.dtype, device=like.device)


def cn_step(func: nn.Module, y: torch.Tensor, t0: float, t1: float, tol: float) -> torch.Tensor:
    """``z = y + h/2 (f(t0, y) + f(t1, z))`` solved by fixed-point iteration (no graph)."""
    half = 0.5 * (t1 - t0)
    with torch.no_grad():
        explicit = y + half * func(_time(t0, y), y)
        return fixed_point(lambda z: explicit + half * func(_time(t1, y), z), y, tol)


def cn_step_adjoint(func: nn.Module, y: torch.Tensor, z: torch.Tensor, t0: float, t1: float,
                    cotangent: torch.Tensor, params: Sequence[torch.Tensor],
                    tol: float) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(dL/dy, dL/dp)`` of one step ``y -> z`` given ``dL/dz``.

    ``mu`` solves ``(I - h/2 J(z))^T mu = dL/dz`` by fixed-point iteration with autograd VJPs;
    then ``dL/dy = mu + h/2 J(y)^T mu`` and ``dL/dp = h/2 (f_p(t0, y) + f_p(t1, z))^T mu``.
    """
    half = 0.5 * (t1 - t0)
    z = z.clone().requires_grad_(True)
    f_end = func(_time(t1, z), z)
    mu = fixed_point(lambda m: cotangent + half * torch.autograd.grad(f_end, z, m, retain_graph=True)[0],
                     cotangent, tol)
    grads_end = torch.autograd.grad(f_end, params, mu)
    y = y.clone().requires_grad_(True)
    grad_y, *grads_start = torch.autograd.grad(func(_time(t0, y), y), (y, *params), mu)
    return mu + half * grad_y, [half * (a + b) for a, b in zip(grads_start, grads_end)]


def cn_reference_gradients(func: nn.Module, x: torch.Tensor, target: torch.Tensor, times: Sequence[float],
                           params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Gradients of the loss through Crank-Nicolson steps over ``times``, by hand.

    Backprop through every fixed-point iteration would hold a graph per iteration, far more
    memory than the rows being checked; the adjoint of each step is written out instead.
    """
    tol = CN_REFERENCE_TOL[x.dtype]
    states = [x.detach()]
    for t0, t1 in zip(times[:-1], times[1:]):
        states.append(cn_step(func, states[-1], t0, t1, tol))
    y1 = states[-1].clone().requires_grad_(True)
    (cotangent,) = torch.autograd.grad(loss_of(y1, target), y1)
    param_grads = [torch.zeros_like(p) for p in params]
    for i in range(len(times) - 1, 0, -1):
        cotangent, step_grads = cn_step_adjoint(func, states[i - 1], states[i], times[i - 1], times[i], cotangent,
                                                params, tol)
        for total, step in zip(param_grads, step_grads):
            total.add_(step)
    return (cotangent, *param_grads)


def reference_gradients(config: Config, solve: Solve, x: torch.Tensor, target: torch.Tensor,
                        params: Sequence[torch.Tensor], wide: Optional[torch.dtype] = None
                        ) -> Optional[Tuple[torch.Tensor, ...]]:
    """Autograd through the row's own steps (None for torchdiffeq odeint: it is that reference).

    In the state's dtype; with ``wide`` (explicit methods), in pnode's arithmetic on a PETSc of that
    wider scalar type instead: the steps' sums in ``wide``, the network in the state's dtype
    (:func:`network_in`).
    """
    import bench_core

    if config.family == "odeint":
        return None
    if config.family == "odeint_adjoint":
        plain = Solve(Config(**{**asdict(config), "family": "odeint"}), solve.func)
        return gradients(plain, x, target, params)
    times = pnode_step_times(config, solve, x)
    if config.method == "cn":
        return cn_reference_gradients(solve.func, x, target, times, params)
    tableau = rk_tableau(config.method)
    if wide is None:
        return gradients(lambda y0: bench_core.rk_reference(solve.func, y0, times, tableau), x, target, params)
    func = network_in(solve.func, x.dtype)
    return gradients(lambda y0: bench_core.rk_reference(func, y0.to(wide), times, tableau).to(x.dtype),
                     x, target, params)


def rk_tableau(method: str) -> tuple:
    """``(c, A, b)`` of the hand-written autograd reference of an explicit method (euler, rk4, dopri5)."""
    import bench_core

    return {"euler": EULER, "rk4": bench_core.RK4,
            "dopri5": (bench_core.DOPRI5_C, bench_core.DOPRI5_A, bench_core.DOPRI5_B)}[method]


def network_in(func: Callable, dtype: torch.dtype) -> Callable:
    """``func`` on wider states, evaluated in ``dtype``: what pnode does on a float64 PETSc with a float32
    network (each stage value cast down on its way in, each evaluation cast up on its way out)."""
    def cast(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return func(t.to(dtype), y.to(dtype)).to(y.dtype)
    return cast


def wider_petsc_scalar(config: Config, x: torch.Tensor) -> Optional[torch.dtype]:
    """PETSc's scalar type where a pnode row sums its explicit steps in a wider type than the state's."""
    if not config.is_pnode or config.method == "cn":
        return None
    from pnode.bridge import PETSC_DTYPE

    return PETSC_DTYPE if torch.finfo(PETSC_DTYPE).eps < torch.finfo(x.dtype).eps else None


def own_arithmetic_reference(config: Config, solve: Solve, x: torch.Tensor, target: torch.Tensor,
                             params: Sequence[torch.Tensor], plain: Tuple[torch.Tensor, ...]
                             ) -> Tuple[torch.Tensor, ...]:
    """The reference in the row's own arithmetic: for a pnode row that sums in a wider PETSc scalar
    type (:func:`wider_petsc_scalar`), autograd in that arithmetic; for an explicit pnode row on a
    PETSc of the state's own float32 type, autograd through PETSc's float32 arithmetic itself
    (:func:`petsc_rk_reference`); else ``plain`` (autograd in the state's dtype)."""
    wide = wider_petsc_scalar(config, x)
    if wide is not None:
        return reference_gradients(config, solve, x, target, params, wide)
    steps = petsc_arithmetic_steps(config, solve, x)
    if steps is None:
        return plain
    return gradients(lambda y0: petsc_rk_reference(solve.func, y0, *steps), x, target, params)


def petsc_arithmetic_steps(config: Config, solve: Solve, x: torch.Tensor) -> Optional[tuple]:
    """``(times, sizes, (A, b, c, fsal))`` of the row's forward solve, for :func:`petsc_rk_reference`.

    Only for an explicit pnode row whose state dtype is PETSc's own float32 scalar type (a
    single-precision build), where round-off decides which of the block's ReLUs are on and a loop
    that rounds differently from PETSc is not a reference; None otherwise, or where this PETSc does
    not say what it computes (no ``TSRKGetTableau``), or where it retried a step (it rolls the state
    back by subtracting the rejected update, which this loop does not repeat).
    """
    from pnode.bridge import PETSC_DTYPE

    if not config.is_pnode or config.method == "cn" or not (x.dtype == PETSC_DTYPE == torch.float32):
        return None
    import bench_core

    from pnode.schedule import retried_steps

    options = {} if config.steps is None else {"step_size": 1.0 / config.steps}
    record, (tableau, retried) = bench_core.forward_record_of(
        solve.func, x, config.method, options, config.tol, config.tol,
        read_ts=lambda ts: (petsc_tableau(ts), retried_steps(ts)))
    if tableau is None or retried:
        return None
    return record.step_times, record.step_sizes, tableau


def petsc_tableau(ts) -> Optional[tuple]:
    """``(A, b, c, fsal)`` of an explicit RK ``ts`` as PETSc holds them (``TSRKGetTableau``), as float32
    NumPy arrays; None when this PETSc does not export it. PETSc's ``c`` are its own float32 row sums
    of ``A`` (``0.79999995`` for dopri5's 4/5), which only PETSc can say."""
    from pnode._compat import PETSc

    try:
        get = ctypes.CDLL(PETSc.__file__).TSRKGetTableau  # libpetsc is a dependency: dlsym finds it
    except (OSError, AttributeError):
        return None
    int_t = ctypes.c_int64 if PETSc.IntType().itemsize == 8 else ctypes.c_int32
    real = ctypes.POINTER(ctypes.c_float if PETSc.RealType().itemsize == 4 else ctypes.c_double)
    s, fsal = int_t(), ctypes.c_int()
    a, b, c = real(), real(), real()
    if get(ctypes.c_void_p(ts.handle), ctypes.byref(s), ctypes.byref(a), ctypes.byref(b), ctypes.byref(c),
           None, None, None, ctypes.byref(fsal)) != 0:
        return None
    n = s.value
    as_array = lambda ptr, count: np.array([ptr[i] for i in range(count)], dtype=PETSc.RealType)  # noqa: E731
    return as_array(a, n * n).reshape(n, n), as_array(b, n), as_array(c, n), bool(fsal.value)


def petsc_maxpy(y: torch.Tensor, weights: Sequence[torch.Tensor], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    """PETSc's ``VecMAXPY(y, n, w, k)`` as it rounds: the first ``n % 4`` terms summed left to right and
    added to ``y``, then each group of four the same way (its unrolled AXPY kernels)."""
    n = len(weights)
    first = n % 4
    groups = ([range(first)] if first else []) + [range(j, j + 4) for j in range(first, n, 4)]
    for group in groups:
        terms = [weights[j] * ks[j] for j in group]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        y = y + total
    return y


def petsc_rk_reference(func: Callable, y0: torch.Tensor, times: Sequence[float], sizes: Sequence[float],
                       tableau: tuple) -> torch.Tensor:
    """The explicit RK steps of PETSc's ``TSStep_RK`` in its own arithmetic, differentiable.

    Step ``n`` starts at ``times[n]`` with PETSc's own size ``sizes[n]``; stage ``i`` is
    ``y + sum_j (h a_ij) k_j`` summed as :func:`petsc_maxpy`, at time ``t + h c_i``, every product
    and sum rounded to PETSc's real type (the tableau's dtype; ``y0`` must be of it too) as PETSc
    rounds it; an FSAL method's first stage after the first step is the previous step's last. Its
    forward pass equals pnode's bit for bit on either precision (``tests/test_precision.py``), so
    it rounds, and sets the block's ReLUs, as pnode did.
    """
    a, b, c, fsal = tableau
    real = a.dtype.type
    y, last = y0, None
    for t, h in zip(times, sizes):
        t, h = real(t), real(h)
        ks = []
        for i in range(len(b)):
            weights = [torch.tensor(real(h * a[i, j])) for j in range(i)]
            stage = petsc_maxpy(y, weights, ks)
            if i == 0 and fsal and last is not None:
                ks.append(last)
            else:
                ks.append(func(torch.tensor(real(t + real(h * c[i]))), stage))
        y = petsc_maxpy(y, [torch.tensor(real(h * bj)) for bj in b], ks)
        last = ks[-1]
    return y


def pnode_step_times(config: Config, solve: Solve, x: torch.Tensor) -> List[float]:
    """The step times of pnode's forward solve: the fixed grid, or the steps dopri5 accepted."""
    import bench_core

    if config.steps is not None:
        return bench_core.grid(config.steps)
    return bench_core.step_times_of(solve.func, x, config.method, {}, config.tol, config.tol)


def gradient_errors(config: Config, solve: Solve, x: torch.Tensor, target: torch.Tensor) -> Dict[str, object]:
    """Relative gradient errors against autograd through the same steps.

    ``grad_err``: in the row's own arithmetic (on a float64 PETSc, pnode's float64 sums of float32
    evaluations; on a float32 PETSc, PETSc's own float32 step arithmetic); ``grad_err_plain``:
    against the textbook loop in the state's dtype throughout.
    """
    params = tuple(solve.func.parameters())
    plain = reference_gradients(config, solve, x, target, params)
    if plain is None:
        return {"grad_err": None}
    got = gradients(solve, x, target, params)
    same = own_arithmetic_reference(config, solve, x, target, params, plain)
    err_y0, err_params = relative_error(got[:1], same[:1]), relative_error(got[1:], same[1:])
    return {"grad_err": max(err_y0, err_params), "grad_err_y0": err_y0, "grad_err_params": err_params,
            "grad_err_plain": worst_relative_error(got, plain)}


# ---------------------------------------------------------------------------- worker: entry points
def run_config(config: Config) -> Dict[str, object]:
    """Time, memory, evaluations and gradient error of one row."""
    import bench_core

    torch.manual_seed(0)
    device = torch.device(config.device)
    func = CountedFunc(bench_core.ODEFunc(config.channels)).to(device)
    x = torch.randn(config.batch, config.channels, config.size, config.size, device=device)
    target = torch.randn_like(x)
    optimizer = torch.optim.SGD(func.parameters(), lr=1e-3, momentum=0.9)
    solve = Solve(config, func)
    prime(func.func, x, target, optimizer)
    before_block = block_baseline(device)
    training_step(solve, x, target, optimizer)
    timed = [training_step(solve, x, target, optimizer) for _ in range(config.repeats)]
    result: Dict[str, object] = {**timed[-1][1], "time_s": statistics.median(t for t, _ in timed),
                                 "times_s": [t for t, _ in timed],
                                 "faults": int(statistics.median(c["faults"] for _, c in timed))}
    result.update(median_memory([measure_memory(lambda: training_step(solve, x, target, optimizer), device,
                                                before_block) for _ in range(MEMORY_STEPS)]))
    if config.is_pnode and config.steps is None:
        result["steps_taken"] = len(pnode_step_times(config, solve, x)) - 1
    elif config.steps is None:
        # torchdiffeq's dopri5: two evaluations pick the first step, then six per attempted step.
        result["steps_tried"] = (result["nfe_f"] - 2) // 6
    if config.grad_check:
        try:
            result.update(gradient_errors(config, solve, x, target))
        except Exception as exc:  # noqa: BLE001 - the timing and memory above still stand
            traceback.print_exc()
            result["grad_error_message"] = f"{type(exc).__name__}: {exc}"
    return result


def run_float64_check(config: Config) -> Dict[str, object]:
    """pnode rk4 in float64, store all and K checkpoints, against autograd through classic RK4."""
    import bench_core

    torch.manual_seed(0)
    func = bench_core.ODEFunc(config.channels).double()
    x = torch.randn(config.batch, config.channels, config.size, config.size, dtype=torch.float64)
    target = torch.randn_like(x)
    params = tuple(func.parameters())
    reference = gradients(lambda y0: bench_core.rk_reference(func, y0, bench_core.grid(config.steps), bench_core.RK4),
                          x, target, params)
    store_all = gradients(pnode_solver(func, config.steps, None), x, target, params)
    result: Dict[str, object] = {"err_store_all": relative_error(store_all, reference)}
    try:
        checkpointed = gradients(pnode_solver(func, config.steps, config.checkpoints), x, target, params)
    except Exception as exc:  # noqa: BLE001 - reported in the table; the store-all check stands
        traceback.print_exc()
        result["checkpoint_error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["err_checkpointed"] = relative_error(checkpointed, reference)
    result["checkpointed_vs_store_all"] = relative_error(checkpointed, store_all)
    return result


def pnode_solver(func: nn.Module, steps: int, checkpoints: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    import pnode

    options = {"step_size": 1.0 / steps, **({"checkpoints": checkpoints} if checkpoints else {})}

    def solve(y0: torch.Tensor) -> torch.Tensor:
        return pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=y0.dtype), method="rk4",
                                    options=options)[-1]

    return solve


def check_precision(config: Config) -> None:
    """A 'single' row must run on a single-precision PETSc (and a default row on a double one)."""
    if not config.is_pnode:
        return
    from petsc4py import PETSc

    real = PETSc.RealType.__name__
    wanted = "float32" if config.petsc == "single" else "float64"
    if real != wanted:
        raise RuntimeError(f"{sys.executable} runs a {real} PETSc, this row needs {wanted} "
                           "(--single-python: an interpreter from PETSC_PRECISION=single bash scripts/setup.sh)")


def worker_main(spec: str) -> None:
    config = Config(**json.loads(spec))
    # pnode initialises PETSc from sys.argv on import: keep the worker's own flags out of it.
    sys.argv = sys.argv[:1]
    torch.set_num_threads(config.threads)
    try:
        if config.keep_freed_memory:
            from pnode.allocator import keep_freed_memory

            if not keep_freed_memory():
                raise RuntimeError("--keep-freed-memory needs glibc (pnode.allocator.keep_freed_memory)")
        check_precision(config)
        result = run_float64_check(config) if config.family == FLOAT64_CHECK else run_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the row's error message
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- driver
def configurations(args: argparse.Namespace) -> List[Config]:
    methods = [m for m in METHOD_ORDER if m in args.methods]
    common = {"batch": args.batch, "channels": args.channels, "size": args.size, "tol": args.tol,
              "checkpoints": args.checkpoints, "repeats": args.repeats, "threads": args.threads,
              "grad_check": not args.no_grad_check, "keep_freed_memory": args.keep_freed_memory}
    configs = []
    for device in args.devices:
        for method in methods:
            for steps in ([None] if method in ADAPTIVE else args.steps):
                families = []  # (family, stage graphs kept)
                if args.only in (None, "pnode") and method in PNODE_METHODS:
                    families.append(("pnode", 0))
                    if args.checkpoints and method in args.checkpoint_methods:
                        families.append(("pnode-K", 0))
                        if method in ("euler", "rk4") and steps in args.lean_steps:
                            families += [("pnode-K-lean", n) for n in args.lean_rows if n < STAGES[method]]
                variants = [(family, graphs, petsc) for family, graphs in families
                            for petsc in ("", "single")[:2 if args.single_python and device == "cpu" else 1]]
                if args.only in (None, "torchdiffeq") and method in TORCHDIFFEQ_METHODS:
                    variants += [("odeint", 0, ""), ("odeint_adjoint", 0, "")]
                configs += [Config(family, method, steps, device, **common, petsc=petsc, stage_graphs=graphs)
                            for family, graphs, petsc in variants]
    return configs


def float64_config(args: argparse.Namespace) -> Config:
    return Config(FLOAT64_CHECK, "rk4", 16, "cpu", batch=min(args.batch, 8), channels=min(args.channels, 16),
                  size=min(args.size, 8), checkpoints=args.checkpoints or 4, threads=args.threads)


def run_worker(config: Config, timeout: float, interpreters: Dict[str, str]) -> Dict[str, object]:
    """Run one row in a fresh process of the interpreter for its PETSc (``interpreters[config.petsc]``)."""
    python = interpreters.get(config.petsc, sys.executable)
    command = [python, os.path.abspath(__file__), "--worker", json.dumps(asdict(config))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            if "error" in result or "grad_error_message" in result:
                sys.stderr.write(proc.stderr[-3000:])
            return result
    sys.stderr.write(proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"error": f"worker exited with status {proc.returncode}: {lines[-1] if lines else 'no output'}"}


def progress_line(index: int, total: int, config: Config, result: Dict[str, object], seconds: float) -> str:
    head = f"[{index}/{total}] {config.describe()}"
    if "error" in result:
        return f"{head}: FAILED {result['error']} ({seconds:.0f} s)"
    if config.family == FLOAT64_CHECK:
        return f"{head}: {json.dumps(result)} ({seconds:.0f} s)"
    err = result.get("grad_err")
    return (f"{head}: {result['time_s']:.3f} s/step, peak {result['peak_mb']:.1f} MB, held {result['held_mb']:.1f} MB, "
            f"NFE {result['nfe_f']}/{result['nfe_b']}, grad err {'-' if err is None else f'{err:.1e}'}, "
            f"faults {result.get('faults', '-')} ({seconds:.0f} s)")


def run_all(configs: Sequence[Config], timeout: float, rounds: int = 1,
            interpreters: Optional[Dict[str, str]] = None) -> List[Tuple[Config, Dict[str, object]]]:
    """Run every configuration once per round, round after round (so that a slow spell of the
    machine hits every row alike); a row's time is the median of its rounds' medians, and its
    peak and held memory, faults too, the median over rounds (the heap's layout moves a CPU peak
    by several MB from process to process). Later rounds skip the gradient check."""
    rows = []
    for i, config in enumerate(configs, 1):
        start = time.perf_counter()
        result = run_worker(config, timeout, interpreters or {})
        print(progress_line(i, len(configs), config, result, time.perf_counter() - start), file=sys.stderr, flush=True)
        rows.append((config, result))
    for round_number in range(2, rounds + 1):
        for i, (config, result) in enumerate(rows, 1):
            if "error" in result or config.family == FLOAT64_CHECK:
                continue
            again = run_worker(Config(**{**asdict(config), "grad_check": False}), timeout, interpreters or {})
            print(f"round {round_number}: " + progress_line(i, len(rows), config, again, 0.0), file=sys.stderr,
                  flush=True)
            if "error" not in again:
                for key in ROUND_MEDIANS:
                    result.setdefault("rounds_" + key, [result[key]]).append(again[key])
    for _, result in rows:
        combine_rounds(result)
    return rows


ROUND_MEDIANS = ("time_s", "peak_mb", "held_mb", "faults")


def combine_rounds(result: Dict[str, object]) -> None:
    """Replace each measure of ``ROUND_MEDIANS`` by its median over the rounds (``rounds_<key>``)."""
    for key in ROUND_MEDIANS:
        values = result.get("rounds_" + key)
        if values:
            median = statistics.median(values)
            result[key] = int(median) if key == "faults" else median


# ---------------------------------------------------------------------------- tables
def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:200]


def steps_cell(config: Config, result: Dict[str, object]) -> str:
    if config.steps is not None:
        return str(config.steps)
    if "steps_taken" in result:
        return f"adaptive ({result['steps_taken']})"
    if "steps_tried" in result:
        return f"adaptive (~{result['steps_tried']} tried)"
    return "adaptive"


def grad_cell(config: Config, result: Dict[str, object], key: str = "grad_err") -> str:
    if "grad_error_message" in result:
        return f"failed: {_cell(result['grad_error_message'])}"
    if not config.grad_check:
        return "-"
    if config.family == "odeint":
        return "ref"
    return f"{result[key]:.1e}"


def sort_key(row: Tuple[Config, Dict[str, object]]) -> tuple:
    config = row[0]
    return (config.device, METHOD_ORDER.index(config.method), config.steps or 10**9, FAMILIES.index(config.family),
            config.stage_graphs, config.petsc)


def results_table(rows: Sequence[Tuple[Config, Dict[str, object]]]) -> str:
    cuda = any(config.device == "cuda" for config, _ in rows)
    header = ["solver", "method", "steps", "time / step (s)", "peak memory (MB)", "of which held (MB)", "NFE-F",
              "NFE-B (+recompute)", "grad rel. error", "grad rel. error vs float32 autograd", "page faults / step"]
    if cuda:
        header[1:1] = ["device"]
        header.insert(header.index("of which held (MB)") + 1, "host peak RSS (MB)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config, result in sorted(rows, key=sort_key):
        cells = [config.label, config.method, steps_cell(config, result)]
        if "error" in result:
            cells += ["failed", "-", "-", "-", "-", f"failed: {_cell(result['error'])}", "-", "-"]
        else:
            nfe_b = str(result["nfe_b"]) + (f" (+{result['nfe_recompute']})" if result["nfe_recompute"] else "")
            peak = f"{result['peak_mb']:.1f}" + ("" if result["hwm_reset"] else " (HWM not reset)")
            cells += [f"{result['time_s']:.3f}", peak, f"{result['held_mb']:.1f}", str(result["nfe_f"]), nfe_b,
                      grad_cell(config, result), grad_cell(config, result, "grad_err_plain"),
                      f"{result['faults']:,}" if "faults" in result else "-"]
        if cuda:
            cells[1:1] = [config.device]
            cells.insert(header.index("host peak RSS (MB)"),
                         "-" if "error" in result else f"{result['host_peak_mb']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOT_RUN: Dict[str, object] = {}
"""What :meth:`Rows.get` returns for a row this run did not include (a failed row gives None)."""


class Rows:
    """Look-up of finished rows by (family, method, steps, device, petsc)."""

    def __init__(self, rows: Sequence[Tuple[Config, Dict[str, object]]]):
        keyed = [(self._key(c.family, c.method, c.steps, c.device, c.petsc, c.stage_graphs), r) for c, r in rows]
        self.run = {key for key, _ in keyed}
        self.by_key = {key: r for key, r in keyed if "error" not in r}
        self.stage_graphs = sorted({c.stage_graphs for c, _ in rows if c.family == "pnode-K-lean"})

    @staticmethod
    def _key(family, method, steps, device, petsc, stage_graphs) -> tuple:
        return family, method, steps, device, petsc if family in PNODE_FAMILIES else "", stage_graphs

    def get(self, family: str, method: str, steps: Optional[int], device: str,
            petsc: str = "", stage_graphs: int = 0) -> Optional[Dict[str, object]]:
        """The row's result; None if it failed, :data:`NOT_RUN` if this run did not include it."""
        key = self._key(family, method, steps, device, petsc, stage_graphs)
        return self.by_key.get(key) if key in self.run else NOT_RUN


def ratio_check(name: str, num: Optional[dict], den: Optional[dict], key: str, bound: float,
                extra: str = "") -> Optional[Tuple[str, str, str]]:
    """``(target, value, mark)``; None when the run did not include one of the two rows."""
    if num is NOT_RUN or den is NOT_RUN:
        return None
    if num is None or den is None or not den[key]:
        return name, "not measured", ""
    value = num[key] / den[key]
    shown = f"{value:.2f}" if abs(value - bound) >= 0.005 else f"{value:.3f}"  # 1.504 is not "1.50"
    return name, f"{shown}{extra}", "✓" if value <= bound else "✗"


def acceptance_rows(rows: Sequence[Tuple[Config, Dict[str, object]]], args: argparse.Namespace,
                    float64: Optional[Dict[str, object]]) -> List[Tuple[str, str, str]]:
    look = Rows(rows)
    checks = []
    for device in args.devices:
        on = "" if len(args.devices) == 1 else f" [{device}]"
        for petsc in sorted({c.petsc for c, _ in rows if c.device == device and c.is_pnode}):
            checks += [c for c in pnode_checks(look, args, device, petsc, on) if c is not None]
    if not args.no_grad_check:
        checks += gradient_checks(rows)
    checks += float64_checks(float64)
    return checks


def pnode_checks(look: Rows, args: argparse.Namespace, device: str, petsc: str, on: str
                 ) -> List[Optional[Tuple[str, str, str]]]:
    """The issue's ratios for the pnode rows of one device and one PETSc build (``petsc``); None
    for a ratio whose rows this run did not include."""
    k, tol = args.checkpoints, f"{args.tol:g}"

    def row(family: str, method: str, steps: Optional[int], graphs: int = 0) -> Optional[Dict[str, object]]:
        return look.get(family, method, steps, device, petsc, graphs)

    def name(family: str, graphs: int = 0) -> str:
        return Config(family, "rk4", None, petsc=petsc, checkpoints=k, stage_graphs=graphs).label

    store, ckpt = name("pnode"), name("pnode-K")
    checks = [
        ratio_check(f"rk4, 16 steps: time {store} / torchdiffeq odeint_adjoint ≤ 1.05{on}",
                    row("pnode", "rk4", 16), row("odeint_adjoint", "rk4", 16), "time_s", 1.05),
        ratio_check(f"rk4, 16 steps: peak memory {store} / torchdiffeq odeint ≤ 0.35{on}",
                    row("pnode", "rk4", 16), row("odeint", "rk4", 16), "peak_mb", 0.35),
        ratio_check(f"rk4, 16 steps: peak memory {ckpt} / torchdiffeq odeint_adjoint ≤ 1.5{on}",
                    row("pnode-K", "rk4", 16), row("odeint_adjoint", "rk4", 16), "peak_mb", 1.5)]
    for n in look.stage_graphs:
        lean = name("pnode-K-lean", n)
        if row("pnode-K-lean", "rk4", 16, n):
            checks.append(ratio_check(f"rk4, 16 steps: peak memory {lean} / torchdiffeq odeint_adjoint ≤ 1.5{on}",
                                      row("pnode-K-lean", "rk4", 16, n), row("odeint_adjoint", "rk4", 16),
                                      "peak_mb", 1.5))
        for steps in args.lean_steps:
            if row("pnode-K-lean", "rk4", steps, n):
                checks.append(ratio_check(f"rk4, {steps} steps: time {lean} / {store} ≤ 1.5{on}",
                                          row("pnode-K-lean", "rk4", steps, n), row("pnode", "rk4", steps),
                                          "time_s", 1.5))
    checks.append(dopri5_check(row("pnode", "dopri5", None), row("odeint_adjoint", "dopri5", None), store, tol, on))
    for method in [m for m in METHOD_ORDER if m in args.checkpoint_methods and m not in ADAPTIVE]:
        checks.append(ratio_check(f"{method}, {ckpt}: peak memory at 64 steps / at 4 steps ≤ 1.10{on}",
                                  row("pnode-K", method, 64), row("pnode-K", method, 4), "peak_mb", 1.10))
        for steps in args.steps:
            checks.append(ratio_check(f"{method}, {steps} steps: time {ckpt} / {store} ≤ 1.5{on}",
                                      row("pnode-K", method, steps), row("pnode", method, steps), "time_s", 1.5))
    if "dopri5" in args.checkpoint_methods:
        checks.append(ratio_check(f"dopri5 rtol=atol={tol}: time {ckpt} / {store} ≤ 1.5{on}",
                                  row("pnode-K", "dopri5", None), row("pnode", "dopri5", None), "time_s", 1.5))
    return checks


def dopri5_check(ours: Optional[dict], theirs: Optional[dict], store: str, tol: str, on: str
                 ) -> Optional[Tuple[str, str, str]]:
    extra = ""
    if ours and theirs:  # NOT_RUN is empty, so false too
        extra = (f" (NFE-F/NFE-B: pnode {ours['nfe_f']}/{ours['nfe_b']}, "
                 f"torchdiffeq {theirs['nfe_f']}/{theirs['nfe_b']})")
    return ratio_check(f"dopri5 rtol=atol={tol}: time {store} / torchdiffeq odeint_adjoint ≤ 0.7{on}",
                       ours, theirs, "time_s", 0.7, extra)


def worst_gradient_error(rows, families, key: str = "grad_err") -> Optional[Tuple[float, Config]]:
    errors = [(r[key], c) for c, r in rows
              if c.family in families and "error" not in r and r.get("grad_err") is not None]
    return max(errors, key=lambda e: e[0]) if errors else None


def gradient_checks(rows) -> List[Tuple[str, str, str]]:
    checks = []
    target = "gradient error of every pnode row (float32; autograd in the row's arithmetic) ≤ 1e-5"
    worst = worst_gradient_error(rows, PNODE_FAMILIES)
    failed = [c for c, r in rows if c.is_pnode and ("error" in r or "grad_error_message" in r)]
    if worst is None:
        checks.append((target, f"{len(failed)} pnode rows failed" if failed else "not measured",
                       "✗" if failed else ""))
    else:
        err, config = worst
        note = f" ({len(failed)} pnode rows failed)" if failed else ""
        checks.append((target, f"max {err:.1e}: {config.describe()}{note}", "✓" if err <= 1e-5 and not failed else "✗"))
        plain, config = worst_gradient_error(rows, PNODE_FAMILIES, "grad_err_plain")
        checks.append(("gradient error of pnode against float32 autograd (for comparison)",
                       f"max {plain:.1e}: {config.describe()}", ""))
    theirs = worst_gradient_error(rows, ("odeint_adjoint",))
    if theirs is not None:
        checks.append(("gradient error of torchdiffeq odeint_adjoint (for comparison)",
                       f"max {theirs[0]:.1e}: {theirs[1].describe()}", ""))
    return checks


def float64_checks(result: Optional[Dict[str, object]]) -> List[Tuple[str, str, str]]:
    if result is None:
        return []
    if "error" in result:
        return [("float64 check", f"failed: {_cell(result['error'])}", "✗")]
    checks = [("float64 rk4 16 steps: pnode (store all) gradient error ≤ 1e-12", f"{result['err_store_all']:.1e}",
               "✓" if result["err_store_all"] <= 1e-12 else "✗")]
    if "checkpoint_error" in result:
        checks.append(("float64 rk4 16 steps: pnode (K) gradient error ≤ 1e-12",
                       f"failed: {_cell(result['checkpoint_error'])}", "✗"))
        return checks
    for name, key in (("pnode (K) gradient error", "err_checkpointed"),
                      ("pnode (K) vs store all", "checkpointed_vs_store_all")):
        checks.append((f"float64 rk4 16 steps: {name} ≤ 1e-12", f"{result[key]:.1e}",
                       "✓" if result[key] <= 1e-12 else "✗"))
    return checks


def acceptance_table(checks: Sequence[Tuple[str, str, str]]) -> str:
    lines = ["| target | this run | |", "|---|---|---|"]
    lines += [f"| {_cell(name)} | {_cell(value)} | {mark} |" for name, value, mark in checks]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report
def machine_line(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = []
    for package in ("torch", "petsc4py", "torchdiffeq"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if "cuda" in args.devices else ""
    single = (f"; float32 PETSc rows: {os.path.relpath(args.single_python)} (PETSc {metadata.version('petsc4py')}, "
              "--with-precision=single)" if args.single_python else "")
    return (f"{os.cpu_count()} CPUs ({cpu}){gpu}; {', '.join(versions)}; torch threads {args.threads}; "
            f"Python {platform.python_version()}{single}")


def workload_line(args: argparse.Namespace) -> str:
    rounds = f" (per round; the median over {args.rounds} interleaved rounds)" if args.rounds > 1 else ""
    memory_rounds = f" (per round; the median over the {args.rounds} rounds)" if args.rounds > 1 else ""
    return (f"Training step of the ODE-Net block, batch {args.batch}, state {args.channels}x{args.size}x{args.size}, "
            f"float32, t = [0, 1], fixed steps step_size = 1/steps, adaptive rtol = atol = {args.tol:g}; "
            f"time: median of {args.repeats} steps after a warm-up{rounds}; peak memory: peak during a step over "
            "the memory held before the first step (CPU: RSS; CUDA: allocated); held: the part of it kept between "
            f"steps; both the median of {MEMORY_STEPS} steps{memory_rounds}. Grad error: relative, against "
            "autograd through the same steps in the row's own arithmetic (pnode on a float64 PETSc: float64 "
            "sums of float32 evaluations, cast as pnode casts them; on a float32 PETSc: PETSc's own float32 "
            "step arithmetic, forward pass equal to pnode's bit for bit); beside it, against the textbook "
            "loop in float32 throughout."
            + (" Allocator: every row (torchdiffeq's too) first calls pnode.allocator.keep_freed_memory(), so "
               "glibc keeps the memory a step frees for the next step." if args.keep_freed_memory else ""))


def report(rows, checks, args: argparse.Namespace) -> str:
    return "\n".join([workload_line(args), "", results_table(rows), "", acceptance_table(checks)])


def write_markdown(path: str, body: str, args: argparse.Namespace, command: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"\n## Memory and time of a training step ({time.strftime('%Y-%m-%d')})\n\n"
                 f"`{command}`\n\nMachine: {machine_line(args)}\n\n{body}\n")


def _kept_graphs_color(family: str) -> str:
    """A colour per number of kept stage graphs for 'pnode-K-lean n [single]' (greys on float32 PETSc)."""
    parts = family.split()
    graphs = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    shades = ("darkslategray", "tab:gray", "darkgray", "lightslategray") if "single" in parts else (
        "black", "tab:brown", "peru", "rosybrown")
    return shades[(graphs - 1) % len(shades)]


def plot(rows: Sequence[Tuple[Config, Dict[str, object]]], path: str) -> None:
    """Peak memory and time per step against the number of steps, one line per solver and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"pnode": "tab:blue", "pnode-K": "tab:green", "pnode-K-lean": "tab:olive", "odeint": "tab:red",
              "pnode single": "tab:purple", "pnode-K single": "tab:cyan", "pnode-K-lean single": "tab:pink",
              "odeint_adjoint": "tab:orange"}
    markers = {"euler": "o", "rk4": "s", "dopri5": "*", "cn": "^"}
    lines = {"euler": ":", "rk4": "-", "dopri5": "none", "cn": "-."}
    groups: Dict[tuple, List[Tuple[float, Dict[str, object]]]] = {}
    for config, result in rows:
        steps = config.steps or result.get("steps_taken") or result.get("steps_tried")
        if "error" not in result and steps:
            family = (config.family + (f" {config.stage_graphs}" if config.stage_graphs else "")
                      + (" single" if config.petsc == "single" else ""))
            groups.setdefault((config.device, family, config.method, config.label), []).append((steps, result))
    order = {key: (key[0], FAMILIES.index(key[1].split()[0]), key[1], METHOD_ORDER.index(key[2])) for key in groups}
    legend_rows = (len(groups) + 2) // 3
    legend_inches = 0.3 + 0.17 * legend_rows  # three columns of long labels below the axes
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6 + legend_inches))
    for (device, family, method, label), points in sorted(groups.items(), key=lambda item: order[item[0]]):
        points.sort(key=lambda p: p[0])
        adaptive = method in ADAPTIVE
        name = f"{label} {method}" + (" (adaptive)" if adaptive else "") + (f" [{device}]" if device != "cpu" else "")
        color = colors.get(family) or _kept_graphs_color(family)
        for ax, key in zip(axes, ("peak_mb", "time_s")):
            ax.plot([p[0] for p in points], [max(p[1][key], 1e-3) for p in points], color=color,
                    marker=markers[method], linestyle="--" if device != "cpu" and not adaptive else lines[method],
                    markersize=10 if adaptive else 6, label=name)
    for ax, ylabel in zip(axes, ("peak memory of the training step (MB)", "time per training step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps over [0, 1] (adaptive: steps taken, torchdiffeq: tried)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / (4.6 + legend_inches), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _first_results_table(text: str) -> List[str]:
    """The lines of the first results table in ``text`` (header to the last row)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| solver | method | steps |")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def rows_from_markdown(path: str) -> List[Tuple[Config, Dict[str, object]]]:
    """The time and memory of the rows of the first results table in ``path`` (for ``--replot``).

    Only what the plot needs is read back: family, method, steps, PETSc build, kept stage graphs,
    time and peak memory. Failed rows are skipped.
    """
    with open(path) as fh:
        text = fh.read()
    # every label a row of this file can carry: the K values and kept stage graphs it mentions
    ks = {int(k) for k in re.findall(r"\(K=(\d+)", text)} or {4}
    graphs = {0} | {int(n) for n in re.findall(r"last (\d+) stage graphs", text)}
    labels = {}
    for family in FAMILIES:
        for petsc in ("", "single"):
            for n in (graphs if family == "pnode-K-lean" else {0}):
                for k in ks:
                    config = Config(family, "rk4", None, petsc=petsc, stage_graphs=n, checkpoints=k)
                    labels[config.label] = config
    rows = []
    for line in _first_results_table(text):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or cells[0] not in labels or cells[3] == "failed":
            continue
        steps = None if cells[2].startswith("adaptive") else int(cells[2])
        config = Config(**{**asdict(labels[cells[0]]), "method": cells[1], "steps": steps})
        result: Dict[str, object] = {"time_s": float(cells[3]), "peak_mb": float(cells[4].split()[0])}
        if steps is None and "(" in cells[2]:
            key = "steps_tried" if "~" in cells[2] else "steps_taken"
            result[key] = int(cells[2].split("(")[1].strip("~)").split()[0])
        rows.append((config, result))
    return rows


# ---------------------------------------------------------------------------- command line
def _list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=_list(str), default=list(METHOD_ORDER),
                        help="comma-separated, from euler,rk4,dopri5,cn (default: all)")
    parser.add_argument("--checkpoint-methods", type=_list(str), default=["euler", "rk4", "dopri5"],
                        help="methods that also get a pnode (K checkpoints) row (default: euler,rk4,dopri5)")
    parser.add_argument("--steps", type=_list(int), default=[4, 16, 64],
                        help="fixed step counts (default: 4,16,64; powers of two keep torchdiffeq's "
                        "float32 grid exact)")
    parser.add_argument("--only", choices=["pnode", "torchdiffeq"], help="run only these rows")
    parser.add_argument("--checkpoints", type=int, default=4, help="K of the pnode (K) rows; 0: no such rows")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the adaptive rows (default 1e-3)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="spatial size of the state (default 8: 8x8)")
    parser.add_argument("--devices", type=_list(str), default=default_devices.split(","),
                        help=f"comma-separated (default here: {default_devices})")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per row (median)")
    parser.add_argument("--lean-rows", type=_list(int), default=[0],
                        help="stage graphs kept by the extra K rows (options['checkpoint_graphs'] = n; euler and "
                             "rk4 at --lean-steps, n below the method's stage count), comma-separated (default 0: "
                             "every stage evaluated again)")
    parser.add_argument("--lean-steps", type=_list(int), default=[16],
                        help="step counts at which those rows run, comma-separated (default 16)")
    parser.add_argument("--no-lean-rows", dest="lean_rows", action="store_const", const=[],
                        help="leave out those rows")
    parser.add_argument("--single-python", metavar="PYTHON",
                        help="also run every pnode CPU row with this interpreter, whose petsc4py is a "
                             "single-precision PETSc (PETSC_PRECISION=single VENV=.venv-single bash scripts/setup.sh "
                             "makes .venv-single/bin/python); rows labelled 'float32 PETSc'")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every row, torchdiffeq's too, first calls pnode.allocator.keep_freed_memory(): "
                             "glibc keeps freed memory for the next training step instead of returning it to "
                             "the OS and faulting it in again (default: glibc's own policy)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run all rows this many times, interleaved; time: median over rounds (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per configuration")
    parser.add_argument("--no-grad-check", action="store_true",
                        help="skip the gradient-error column (its references backprop through every step, "
                        "which takes as much memory as torchdiffeq odeint)")
    parser.add_argument("--float64-check", action="store_true",
                        help="also run pnode rk4 (16 steps) in float64, store all and K, against autograd")
    parser.add_argument("--markdown", metavar="FILE", help="append the report to FILE (e.g. BENCHMARKS.md)")
    parser.add_argument("--plot", metavar="FILE.png", help="write the memory and time plot to FILE.png")
    parser.add_argument("--replot", metavar="TABLE.md",
                        help="only draw --plot from the results table of an earlier run (its markdown), "
                             "running nothing")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "channels", "size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(steps < 1 for steps in args.steps) or args.checkpoints < 0:
        parser.error("--steps must be positive and --checkpoints at least 0")
    unknown = sorted(set(args.methods + args.checkpoint_methods) - set(METHOD_ORDER))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {','.join(METHOD_ORDER)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.replot:
        if not args.plot:
            raise SystemExit("--replot needs --plot FILE.png")
        plot(rows_from_markdown(args.replot), args.plot)
        return
    command = "python " + shlex.join([os.path.relpath(os.path.abspath(__file__)), *argv])
    configs = configurations(args)
    if args.float64_check:
        configs.append(float64_config(args))
    results = run_all(configs, args.timeout, args.rounds, {"single": args.single_python} if args.single_python else {})
    float64 = next((r for c, r in results if c.family == FLOAT64_CHECK), None)
    rows = [(c, r) for c, r in results if c.family != FLOAT64_CHECK]
    body = report(rows, acceptance_rows(rows, args, float64), args)
    print(body)
    if args.markdown:
        write_markdown(args.markdown, body, args, command)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
