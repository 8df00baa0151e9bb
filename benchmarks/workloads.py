"""The benchmark's workloads: the ODE functions, their data, and one training step.

* ``odenet``: the classic ODE-Net block (GroupNorm, ReLU, time-concatenated 3x3 conv, GroupNorm,
  ReLU, time-concatenated 3x3 conv, GroupNorm) on a batch of 128 states of 64 channels x 8 x 8,
  float32, integrated over t in [0, 1].
* ``small``: a small state: the MLP 2 -> 64 -> 64 -> 2 with tanh activations (autonomous), on a
  batch of 256 states of 2, float32, integrated over t in [0, 5].
* ``scale``: ``f(t, y) = a y`` on the small workload's states: f costs next to nothing, so a
  training step measures what each solver itself spends per stage.

With ``quick=True`` the same networks run at toy sizes (batch 8; 8 channels for the ODE-Net
block), for smoke tests.

A training step is: zero the parameter gradients, solve from ``y0`` (the input, detached, with
``requires_grad``, as behind a downsampling layer) to the end of the span, MSE loss of the final
state against a fixed random target, backward. The parameter update is left out: it costs the
same in every row, and it would move the weights, and with them an adaptive solver's steps, from
one timed step to the next.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from pnode.testing.networks import MLPFunc, ODENetFunc, ScaleFunc


@dataclass(frozen=True)
class Workload:
    """A network and the shape of its states, full size and quick.

    Attributes:
        name: 'odenet', 'small' or 'scale'.
        t_end: the span is [0, t_end] (the network's time units).
        make_func: ``make_func(quick)`` builds the ODE function.
        state_shape: ``state_shape(quick)``: the shape of a batch of states.
        description: one line for the report, ``{shape}`` standing for the state's shape.
    """

    name: str
    t_end: float
    make_func: Callable[[bool], nn.Module]
    state_shape: Callable[[bool], tuple]
    description: str

    def describe(self, quick: bool) -> str:
        shape = "x".join(str(n) for n in self.state_shape(quick))
        return self.description.format(shape=shape, t_end=f"{self.t_end:g}")


WORKLOADS: Dict[str, Workload] = {
    "odenet": Workload("odenet", 1.0, lambda quick: ODENetFunc(8 if quick else 64),
                       lambda quick: (8, 8, 8, 8) if quick else (128, 64, 8, 8),
                       "ODE-Net block (GroupNorm, ReLU, concat-conv x2, GroupNorm), state {shape}, float32, "
                       "t in [0, {t_end}]"),
    "small": Workload("small", 5.0, lambda quick: MLPFunc(), lambda quick: (8, 2) if quick else (256, 2),
                      "MLP 2-64-64-2 with tanh, state {shape}, float32, t in [0, {t_end}]"),
    "scale": Workload("scale", 5.0, lambda quick: ScaleFunc(), lambda quick: (8, 2) if quick else (256, 2),
                      "f(t, y) = a y (one parameter; the solvers' own cost per stage), state {shape}, float32, "
                      "t in [0, {t_end}]"),
}


@dataclass
class Problem:
    """One instance of a workload: the function, the input batch, the target and the span.

    Attributes:
        func: the ODE function (its parameters are trained).
        x: the input batch (``y0`` before ``requires_grad``).
        target: the fixed random target of the MSE loss, shaped like ``x``.
        t: ``tensor([0, t_end])`` in the state's dtype.
    """

    func: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor


def build(name: str, quick: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    """The problem of workload ``name``, initialised from ``seed`` (function first, then x, target)."""
    workload = WORKLOADS[name]
    torch.manual_seed(seed)
    func = workload.make_func(quick).to(dtype)
    x = torch.randn(workload.state_shape(quick), dtype=dtype)
    target = torch.randn_like(x)
    return Problem(func, x, target, torch.tensor([0.0, workload.t_end], dtype=dtype))


Solve = Callable[[torch.Tensor], torch.Tensor]
"""``solve(y0) -> y(t_end)``: one row's solver over the problem's span."""


def loss_of(problem: Problem, y_end: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y_end, problem.target)


def training_step(problem: Problem, solve: Solve) -> torch.Tensor:
    """Zero the gradients, solve, take the loss, backward; returns the loss (detached)."""
    problem.func.zero_grad(set_to_none=True)
    y0 = problem.x.detach().requires_grad_(True)
    loss = loss_of(problem, solve(y0))
    loss.backward()
    return loss.detach()


def gradients(problem: Problem, solve: Solve) -> tuple:
    """``(dL/dy0, dL/dparams...)`` of the training loss through ``solve``, without touching ``.grad``."""
    y0 = problem.x.detach().requires_grad_(True)
    loss = loss_of(problem, solve(y0))
    return torch.autograd.grad(loss, (y0, *problem.func.parameters()))


def prime(problem: Problem, jvp: bool = False) -> None:
    """Evaluate f once in each way a solver may: with a backward pass (``loss.backward()``), a VJP
    (``torch.autograd.grad(f, y, v)``) and, with ``jvp``, a JVP (``torch.func.jvp``, as pnode's
    Newton-Krylov solves take them): torch's lazy set-up, not the solver's.

    On torch 2.14 the first VJP with an explicit cotangent imports some 480 modules (sympy, mpmath;
    34 MB), the first ``torch.func.jvp`` some 400 more (46 MB, seconds): without this they would
    count in the memory of every adjoint or implicit row, and of no other row.
    """
    problem.func.zero_grad(set_to_none=True)
    y0 = problem.x.detach().requires_grad_(True)
    out = problem.func(problem.t[0], y0)
    torch.autograd.grad(out, y0, torch.ones_like(out), retain_graph=True)
    loss_of(problem, out).backward()
    problem.func.zero_grad(set_to_none=True)
    if not jvp:
        return
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.func.jvp trips torch.jit's deprecation internally
        torch.func.jvp(lambda y: problem.func(problem.t[0], y), (problem.x,), (problem.x,))
