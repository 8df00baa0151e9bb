"""Learning the rate constants of Robertson's stiff chemical kinetics with implicit methods and PETSc's adjoint.

    y1' = -k1 y1 + k3 y2 y3
    y2' =  k1 y1 - k3 y2 y3 - k2 y2^2        y(0) = (1, 0, 0),  (k1, k2, k3) = (0.04, 3e7, 1e4)
    y3' =  k2 y2^2

The reference trajectory comes from SciPy's BDF (rtol 1e-10, atol 1e-12) at log-spaced times from
1e-5 to ``--t-end``. Starting from perturbed constants (k1 x2, k2 x0.5, k3 x2 by default), the
script fits log10(k) by minimising the squared error of the three species, each divided by its
largest value (y2 never exceeds 4e-5), with L-BFGS (or Adam). Each loss evaluation is one
``pnode.odeint_adjoint`` solve with an implicit method and one TSAdjoint solve.

Step sizes. The eigenvalues of the Jacobian reach -1e4 while the solution changes on time scales
from 1e-5 to 1e5, so an explicit method is held to steps of ~1e-4 by stability alone. An implicit
method steps with the solution. By default it is called as a stiff problem is posed: a method and
tolerances (``--method kencarp4 --rtol 1e-6 --atol 1e-10``), and PETSc's controller chooses the
steps from the method's error estimate, starting from pnode's automatic first step. With
``--steps-per-interval m`` the steps are fixed instead: m log-spaced steps between consecutive
output times (one solve with those extra output times, which pnode hits exactly). At the end,
dopri5 (adaptive, explicit) integrates the true system under a step budget
(``--explicit-max-steps``) for comparison: pnode warns that the problem looks stiff.

    python examples/robertson.py                          # kencarp4, rtol 1e-6, atol 1e-10, L-BFGS; ~1 minute
    python examples/robertson.py --method cn              # Crank-Nicolson, error-controlled (many more steps)
    python examples/robertson.py --method cn --steps-per-interval 2     # fixed steps
    python examples/robertson.py -snes_converged_reason   # PETSc options pass through

Writes ``<out>/log.txt``, ``<out>/metrics.jsonl``, ``<out>/checkpoint.pt`` (every ``--log-every``
iterations; ``--resume`` continues from it) and ``<out>/robertson.png``.
"""

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    add_common_args,
    append_jsonl,
    load_checkpoint,
    parse_args,
    progress,
    rng_state,
    save_checkpoint,
    set_rng_state,
    setup_run,
)
from torch import nn  # noqa: E402

import pnode  # noqa: E402

DTYPE = torch.float64
TRUE_K = (0.04, 3e7, 1e4)
Y0 = (1.0, 0.0, 0.0)
# Columns: the reactions A -> B (rate k1 y1), B + B -> C + B (k2 y2^2), B + C -> A + C (k3 y2 y3).
STOICHIOMETRY = torch.tensor([[-1.0, 0.0, 1.0],
                              [1.0, -1.0, -1.0],
                              [0.0, 1.0, 0.0]], dtype=DTYPE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t-end", type=float, default=1e5, help="last output time")
    parser.add_argument("--n-times", type=int, default=41, help="log-spaced output times in [1e-5, t_end] (plus t=0)")
    parser.add_argument("--noise", type=float, default=0.0, help="relative Gaussian noise on the reference data")
    parser.add_argument("--perturb", type=float, nargs=3, default=(2.0, 0.5, 2.0),
                        help="initial guess = true constants times these factors")
    parser.add_argument("--method", choices=["kencarp4", "kencarp3", "kencarp5", "cn", "beuler", "theta"],
                        default="kencarp4", help="implicit pnode method")
    parser.add_argument("--steps-per-interval", type=int, default=None,
                        help="fixed implicit steps between consecutive output times (log-spaced); default: "
                             "error-controlled steps")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (and of dopri5)")
    parser.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance (and of dopri5)")
    parser.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    parser.add_argument("--niters", type=int, default=15,
                        help="optimiser iterations (an L-BFGS iteration is one update with a line search)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 1 for L-BFGS, 0.02 for Adam)")
    parser.add_argument("--log-every", type=int, default=1, help="iterations between log lines and checkpoints")
    parser.add_argument("--explicit-max-steps", type=int, default=100000,
                        help="step budget of the dopri5 comparison run (0: skip it)")
    parser.add_argument("--no-plot", action="store_true")
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


# ---------------------------------------------------------------------------------------------- model
class RateConstants(nn.Module):
    """The trainable parameters: ``log10_k``, shape ``(3,)``."""

    def __init__(self, k):
        super().__init__()
        self.log10_k = nn.Parameter(torch.log10(torch.as_tensor(k, dtype=DTYPE)))

    @property
    def k(self) -> torch.Tensor:
        return torch.exp(math.log(10.0) * self.log10_k)


class Kinetics:
    """The right-hand side for given rate constants ``k`` (a ``(3,)`` tensor), counting its work.

    ``k`` is computed from ``log10_k`` once per solve and handed to pnode as ``adjoint_params``:
    TSAdjoint returns dL/dk and autograd carries it on to ``log10_k``. (Computing k from the
    parameter inside f would be as correct, but adds the exponential to every evaluation and every
    Jacobian product.)

    Attributes:
        evaluations: calls of f (the Jacobian blocks' evaluations included).
        implicit_steps: steps of the solves, counted by :meth:`count_step`, which the integrator makes
            torchdiffeq's ``callback_accept_step`` (error control) or ``callback_step`` (fixed steps).
    """

    def __init__(self, k: torch.Tensor):
        self.k = k
        self.evaluations = 0
        self.implicit_steps = 0

    def count_step(self, t0, y0, dt) -> None:
        self.implicit_steps += 1

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        rates = torch.stack([y1, y2 * y2, y2 * y3], dim=-1) * self.k
        return rates @ STOICHIOMETRY.T


def reference_solution(times: np.ndarray, k=TRUE_K) -> np.ndarray:
    """SciPy BDF (rtol 1e-10, atol 1e-12) at ``times``: ``(len(times), 3)``."""
    from scipy.integrate import solve_ivp

    k1, k2, k3 = k

    def rhs(t, y):
        return [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2, k2 * y[1] ** 2]

    def jacobian(t, y):
        return [[-k1, k3 * y[2], k3 * y[1]],
                [k1, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]],
                [0.0, 2 * k2 * y[1], 0.0]]

    sol = solve_ivp(rhs, (times[0], times[-1]), Y0, method="BDF", t_eval=times, rtol=1e-10, atol=1e-12,
                    jac=jacobian)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return sol.y.T


def output_times(t_end: float, n_times: int) -> torch.Tensor:
    """0 followed by ``n_times`` log-spaced times from 1e-5 to ``t_end``."""
    return torch.cat([torch.zeros(1, dtype=DTYPE), torch.logspace(-5, math.log10(t_end), n_times, dtype=DTYPE)])


def refine(times: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` steps per interval of ``times``: log-spaced sub-points (linear ones on an interval from 0)."""
    if m == 1:
        return times
    pieces = [times[:1]]
    for a, b in zip(times[:-1].tolist(), times[1:].tolist()):
        if a > 0:
            pieces.append(torch.logspace(math.log10(a), math.log10(b), m + 1, dtype=DTYPE)[1:])
        else:
            pieces.append(torch.linspace(a, b, m + 1, dtype=DTYPE)[1:])
    points = torch.cat(pieces)
    points[m::m] = times[1:]  # exactly the output times, not their log/exp round trip
    return points


class Integrator:
    """The implicit solve the fit uses: ``integrate(kinetics)`` -> ``(len(times), 3)`` at the output times.

    pnode solves each implicit stage by Newton's method, its linear systems by the LU of the 3 x 3
    Jacobian (the state has no batch dimension, so pnode's per-sample block is the whole Jacobian);
    the adjoint's transposed solves use the same factors, transposed, inside GMRES, to 1e-12.
    """

    def __init__(self, args: argparse.Namespace, times: torch.Tensor):
        self.method = args.method
        self.times = times
        self.adaptive = args.steps_per_interval is None
        if self.adaptive:
            self.solve_times, self.stride = times, 1
            self.options = {}
            self.tolerances = {"rtol": args.rtol, "atol": args.atol}
        else:
            m = args.steps_per_interval
            self.solve_times, self.stride = refine(times, m), m
            # A step longer than the whole span: pnode shortens every step to the next solve time,
            # so each interval of solve_times is one implicit step (PETSc may halve the last one).
            span = float(times[-1] - times[0])
            self.options = {"step_size": 2.0 * span}
            self.tolerances = {}

    def describe(self) -> str:
        if self.adaptive:
            return f"{self.method}, error-controlled steps (rtol={self.tolerances['rtol']:g}, " \
                   f"atol={self.tolerances['atol']:g})"
        return f"{self.method}, {self.stride} fixed step(s) per output interval"

    def integrate(self, kinetics: Kinetics) -> torch.Tensor:
        y0 = torch.tensor(Y0, dtype=DTYPE)
        if self.adaptive:
            kinetics.callback_accept_step = kinetics.count_step
        else:
            kinetics.callback_step = kinetics.count_step
        ys = pnode.odeint_adjoint(kinetics, y0, self.solve_times, method=self.method, options=self.options,
                                  adjoint_params=(kinetics.k,), **self.tolerances)
        return ys[::self.stride]


def scaled_loss(predicted: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the species, each divided by its largest reference value (t = 0 excluded)."""
    return (((predicted[1:] - reference[1:]) / scale) ** 2).mean()


def relative_errors(model: RateConstants) -> List[float]:
    return (model.k.detach() / torch.tensor(TRUE_K, dtype=DTYPE) - 1.0).tolist()


# ---------------------------------------------------------------------------------------------- explicit comparison
def explicit_comparison(times: torch.Tensor, args: argparse.Namespace) -> Dict[str, object]:
    """dopri5 on the true constants under a step budget: how far does it get, at what cost?"""
    kinetics = Kinetics(torch.tensor(TRUE_K, dtype=DTYPE))
    start = time.perf_counter()
    try:
        pnode.odeint(kinetics, torch.tensor(Y0, dtype=DTYPE), times, method="dopri5", rtol=args.rtol, atol=args.atol,
                     options={"max_num_steps": args.explicit_max_steps})
        outcome = {"completed": True, "t_reached": float(times[-1]), "message": "reached the last output time"}
    except pnode.SolverError as exc:
        outcome = {"completed": False, "t_reached": exc.t_reached, "message": str(exc)}
    outcome.update(evaluations=kinetics.evaluations, seconds=time.perf_counter() - start,
                   max_steps=args.explicit_max_steps)
    return outcome


def save_figure(times, reference, fitted, initial, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = times[1:].numpy()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for s, ax in enumerate(axes):
        ax.semilogx(t, reference[1:, s].numpy(), color="0.7", lw=4, label="reference (SciPy BDF)")
        ax.semilogx(t, initial[1:, s].numpy(), color="tab:orange", ls="--", label="initial guess")
        ax.semilogx(t, fitted[1:, s].numpy(), "o", color="tab:blue", ms=3, label="fitted (pnode)")
        ax.set_title(f"$y_{s + 1}$")
        ax.set_xlabel("t")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- fit
def make_optimizer(name: str, params, lr: Optional[float]) -> torch.optim.Optimizer:
    if name == "lbfgs":
        # one quasi-Newton update per iteration (the curvature history persists across calls)
        return torch.optim.LBFGS(params, lr=lr or 1.0, max_iter=1, history_size=10, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-14, tolerance_change=1e-16)
    return torch.optim.Adam(params, lr=lr or 0.02)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(build_parser(), argv)
    logger = setup_run(args, "robertson")

    times = output_times(args.t_end, args.n_times)
    reference = torch.as_tensor(reference_solution(times.numpy()), dtype=DTYPE)
    if args.noise > 0:
        reference = reference * (1.0 + args.noise * torch.randn(reference.shape, dtype=DTYPE))
    scale = reference.abs().amax(dim=0)
    integrator = Integrator(args, times)
    initial_k = [k * f for k, f in zip(TRUE_K, args.perturb)]
    model = RateConstants(initial_k)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    logger.info("Robertson: %d output times in [1e-5, %g]; %s; optimiser %s; initial k = %s",
                len(times) - 1, args.t_end, integrator.describe(), args.optimizer,
                ", ".join(f"{k:.4g}" for k in initial_k))

    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    checkpoint = load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"])
        start, history, elapsed = checkpoint["iteration"], checkpoint["history"], checkpoint["elapsed"]
        logger.info("resumed from %s at iteration %d", checkpoint_path, start)
    else:
        start, history, elapsed = 0, [], 0.0

    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = scaled_loss(integrator.integrate(Kinetics(model.k)), reference, scale)
        loss.backward()
        return loss

    tick = time.perf_counter()
    for itr in progress(range(start + 1, args.niters + 1), desc="robertson", enabled=not args.no_progress,
                        total=args.niters - start):
        loss = optimizer.step(closure)
        if itr % args.log_every == 0 or itr == args.niters:
            now = time.perf_counter()
            elapsed += now - tick
            k = model.k.detach().tolist()
            errors = relative_errors(model)
            record = {"iteration": itr, "loss": loss.item(), "k": k, "relative_error": errors,
                      "loss_evaluations": evaluations, "elapsed": elapsed}
            history.append(record)
            append_jsonl(metrics_path, record)
            logger.info("iter %d | loss %.3e (before the update) | k1 %.5g k2 %.5g k3 %.5g | rel. errors %s | "
                        "%d solves | %.1f s", itr, record["loss"], *k, " ".join(f"{e:+.2%}" for e in errors),
                        evaluations, elapsed)
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "iteration": itr, "rng": rng_state(), "history": history,
                                              "elapsed": elapsed, "args": vars(args)})
            evaluations = 0
            tick = time.perf_counter()

    with torch.no_grad():
        kinetics = Kinetics(model.k)
        fitted = integrator.integrate(kinetics)
        final_loss = float(scaled_loss(fitted, reference, scale))
        implicit_evaluations, steps = kinetics.evaluations, kinetics.implicit_steps
    errors = relative_errors(model)
    logger.info("fitted k = %s (true %s); relative errors %s; final loss %.3e; %.1f s",
                ", ".join(f"{k:.5g}" for k in model.k.detach().tolist()), ", ".join(f"{k:g}" for k in TRUE_K),
                ", ".join(f"{e:+.3%}" for e in errors), final_loss, elapsed)
    logger.info("implicit solve (%s): %d steps over [0, %g], %d evaluations of f (the Jacobian blocks' included)",
                args.method, steps, args.t_end, implicit_evaluations)
    summary = {"k": model.k.detach().tolist(), "relative_error": errors, "final_loss": final_loss, "elapsed": elapsed,
               "implicit_steps": steps, "implicit_evaluations": implicit_evaluations, "history": history,
               "out": args.out}

    if args.explicit_max_steps > 0:
        explicit = explicit_comparison(times, args)
        logger.info("explicit dopri5 (rtol=%g, atol=%g, true k, budget %d steps): %s at t=%.4g after %d evaluations "
                    "in %.1f s. %s", args.rtol, args.atol, args.explicit_max_steps,
                    "completed" if explicit["completed"] else "stopped", explicit["t_reached"],
                    explicit["evaluations"], explicit["seconds"], explicit["message"])
        summary["explicit"] = explicit

    if not args.no_plot:
        with torch.no_grad():
            initial = integrator.integrate(Kinetics(torch.tensor(initial_k, dtype=DTYPE)))
        figure = os.path.join(args.out, "robertson.png")
        save_figure(times, reference, fitted, initial, figure)
        logger.info("figure: %s", figure)
        summary["figure"] = figure
    return summary


if __name__ == "__main__":
    main()
