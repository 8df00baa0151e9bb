"""Learning the reaction term of a stiff reaction-diffusion equation with an IMEX method (pnode.IMEX, kencarp4).

    u_t = D u_xx + R(u)        on x in [0, 1], no flux at the ends,  R(u) = r u (1 - u) (u - a)

(the bistable Nagumo/Allen-Cahn reaction: fronts that travel at a speed set by r, D and a). The
diffusion is known and stiff: on a grid of ``--grid`` points its eigenvalues reach ``-4 D / dx^2``
(-1640 by default), which holds an explicit method to steps of ~2e-3. The reaction is what the
model learns: ``u (1 - u) g(u)`` with ``g`` a small MLP, at every grid point. The right-hand side is split,
``pnode.IMEX(explicit=reaction, implicit=diffusion)``, and integrated by ``kencarp4`` (Kennedy &
Carpenter's ARK4(3)6L[2]SA, PETSc's ARKIMEX): the reaction is stepped explicitly, the diffusion
solved for (each implicit stage is one LU solve with the per-sample block, here the diffusion
matrix), so the steps follow the fronts, not the diffusion's stability limit. Gradients are
PETSc's discrete adjoint of the IMEX steps taken.

The data are ``--batch`` fronts started at random positions, solved with the true reaction at
rtol 1e-8 and observed at ``--n-obs`` times in (0, ``--t-end``]. The fit minimises the squared
error with Adam. At the end the trained model is integrated with kencarp4 and with dopri5 at the
same tolerances, and their steps compared.

    python examples/reaction_diffusion.py                       # kencarp4, 100 Adam iterations; ~1.5 minutes
    python examples/reaction_diffusion.py --method dopri5 --niters 20   # the same fit with an explicit method

Writes ``<out>/log.txt``, ``<out>/metrics.jsonl``, ``<out>/checkpoint.pt`` (``--resume`` continues
from it) and ``<out>/reaction_diffusion.png`` (the learned reaction against the true one, and the
fronts).
"""

import argparse
import os
import sys
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="grid points in [0, 1]")
    parser.add_argument("--diffusion", type=float, default=0.1, help="D")
    parser.add_argument("--rate", type=float, default=10.0, help="r of the true reaction")
    parser.add_argument("--threshold", type=float, default=0.25, help="a of the true reaction")
    parser.add_argument("--batch", type=int, default=16, help="fronts in the data")
    parser.add_argument("--t-end", type=float, default=1.0)
    parser.add_argument("--n-obs", type=int, default=8, help="observation times in (0, t_end]")
    parser.add_argument("--hidden", type=int, default=32, help="width of the reaction MLP")
    parser.add_argument("--method", default="kencarp4", help="pnode method (kencarp3/4/5: IMEX; others: the sum)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-7)
    parser.add_argument("--niters", type=int, default=100, help="Adam iterations")
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--log-every", type=int, default=10, help="iterations between log lines and checkpoints")
    parser.add_argument("--no-plot", action="store_true")
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


# ---------------------------------------------------------------------------------------------- model
class Diffusion(nn.Module):
    """``D u_xx`` by second differences with no flux at the ends: ``u L^T``, ``u`` of shape ``(B, n)``."""

    def __init__(self, n: int, coefficient: float):
        super().__init__()
        dx = 1.0 / n
        laplacian = -2 * torch.eye(n, dtype=DTYPE) + torch.diag(torch.ones(n - 1, dtype=DTYPE), 1) \
            + torch.diag(torch.ones(n - 1, dtype=DTYPE), -1)
        laplacian[0, 0] = laplacian[-1, -1] = -1.0  # reflecting ends: no flux
        self.register_buffer("operator", coefficient * laplacian / dx ** 2)

    def forward(self, t, u):
        return u @ self.operator.T


class TrueReaction(nn.Module):
    """``r u (1 - u) (u - a)``."""

    def __init__(self, rate: float, threshold: float):
        super().__init__()
        self.rate, self.threshold = rate, threshold

    def forward(self, t, u):
        return self.rate * u * (1 - u) * (u - self.threshold)


class LearnedReaction(nn.Module):
    """``R(u) = u (1 - u) g(u)`` at every grid point, ``g`` an MLP: ``(B, n) -> (B, n)``. The states 0
    and 1 stay at rest, as chemistry says (no reactant, all converted); the data teach ``g``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(DTYPE)

    def forward(self, t, u):
        return u * (1 - u) * self.net(u.unsqueeze(-1)).squeeze(-1)


def fronts(batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, n)`` fronts ``(1 + tanh((x0 - x) / 0.05)) / 2`` at random positions x0 in [0.2, 0.6]."""
    x = (torch.arange(n, dtype=DTYPE) + 0.5) / n
    x0 = 0.2 + 0.4 * torch.rand(batch, 1, generator=generator, dtype=DTYPE)
    return 0.5 * (1 + torch.tanh((x0 - x) / 0.05))


class CountedIMEX(pnode.IMEX):
    """The split, counting the steps the solver accepts and rejects (torchdiffeq's step callbacks)."""

    def __init__(self, explicit, implicit):
        super().__init__(explicit, implicit)
        self.steps = self.rejected_steps = 0

    def callback_accept_step(self, t0, y0, dt):
        self.steps += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected_steps += 1

    def reset_counts(self) -> None:
        self.steps = self.rejected_steps = 0


def solve(func, u0, times, args):
    return pnode.odeint_adjoint(func, u0, times, rtol=args.rtol, atol=args.atol, method=args.method)


def step_counts(reaction: nn.Module, diffusion: Diffusion, u0, times, args) -> Dict[str, int]:
    """Steps of kencarp4 (IMEX) and of dopri5 on the trained model, same tolerances."""
    counts = {}
    for method in ("kencarp4", "dopri5"):
        func = CountedIMEX(reaction, diffusion)
        with torch.no_grad():
            pnode.odeint(func, u0, times, rtol=args.rtol, atol=args.atol, method=method)
        counts[method] = func.steps
    return counts


def save_figure(reaction, truth, data, predicted, times, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    u = torch.linspace(-0.1, 1.1, 121, dtype=DTYPE)
    with torch.no_grad():
        axes[0].plot(u, truth(0.0, u), color="0.6", lw=4, label="true r u (1-u) (u-a)")
        axes[0].plot(u, reaction(0.0, u), color="tab:blue", label="learned")
    axes[0].set_xlabel("u")
    axes[0].set_title("reaction R(u)")
    axes[0].legend(fontsize=8)
    x = (torch.arange(data.shape[-1]) + 0.5) / data.shape[-1]
    for k in range(len(times)):
        axes[1].plot(x, data[k, 0], color="0.6", lw=3)
        axes[1].plot(x, predicted[k, 0], "--", color="tab:blue")
    axes[1].set_xlabel("x")
    axes[1].set_title("a front at the observation times (grey: data)")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- fit
def main(argv=None) -> Dict[str, object]:
    args = parse_args(build_parser(), argv)
    logger = setup_run(args, "reaction_diffusion")
    generator = torch.Generator().manual_seed(args.seed)
    diffusion = Diffusion(args.grid, args.diffusion)
    truth = TrueReaction(args.rate, args.threshold)
    u0 = fronts(args.batch, args.grid, generator)
    times = torch.linspace(0.0, args.t_end, args.n_obs + 1, dtype=DTYPE)
    with torch.no_grad():
        data = pnode.odeint(pnode.IMEX(truth, diffusion), u0, times, rtol=1e-8, atol=1e-10, method="kencarp5")
    reaction = LearnedReaction(args.hidden)
    func = CountedIMEX(explicit=reaction, implicit=diffusion)
    optimizer = torch.optim.Adam(reaction.parameters(), lr=args.lr)
    stiff = -float(torch.linalg.eigvalsh(diffusion.operator).min())
    logger.info("reaction-diffusion: grid %d, D = %g (diffusion eigenvalues down to -%.0f), %d fronts, observed at "
                "%d times in (0, %g]; %s, rtol %g, atol %g; Adam lr %g", args.grid, args.diffusion, stiff, args.batch,
                args.n_obs, args.t_end, args.method, args.rtol, args.atol, args.lr)

    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    checkpoint = load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        reaction.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"])
        start, history, elapsed = checkpoint["iteration"], checkpoint["history"], checkpoint["elapsed"]
        logger.info("resumed from %s at iteration %d", checkpoint_path, start)
    else:
        start, history, elapsed = 0, [], 0.0

    tick = time.perf_counter()
    for itr in progress(range(start + 1, args.niters + 1), desc="reaction-diffusion", enabled=not args.no_progress,
                        total=args.niters - start):
        optimizer.zero_grad()
        func.reset_counts()  # the forward pass's steps
        loss = ((solve(func, u0, times, args)[1:] - data[1:]) ** 2).mean()
        loss.backward()
        optimizer.step()
        if itr % args.log_every == 0 or itr == args.niters:
            now = time.perf_counter()
            elapsed += now - tick
            tick = now
            record = {"iteration": itr, "loss": loss.item(), "steps": func.steps, "elapsed": elapsed}
            history.append(record)
            append_jsonl(metrics_path, record)
            logger.info("iter %d | loss %.3e | %d steps (%d rejected) | %.1f s", itr, record["loss"], func.steps,
                        func.rejected_steps, elapsed)
            save_checkpoint(checkpoint_path, {"model": reaction.state_dict(), "optimizer": optimizer.state_dict(),
                                              "iteration": itr, "rng": rng_state(), "history": history,
                                              "elapsed": elapsed, "args": vars(args)})

    u = torch.linspace(0.0, 1.0, 101, dtype=DTYPE)
    with torch.no_grad():
        reaction_error = float((reaction(0.0, u) - truth(0.0, u)).abs().max() / truth(0.0, u).abs().max())
        predicted = pnode.odeint(func, u0, times, rtol=args.rtol, atol=args.atol, method=args.method)
    final_loss = float(((predicted[1:] - data[1:]) ** 2).mean())
    counts = step_counts(reaction, diffusion, u0, times, args)
    logger.info("final loss %.3e; learned reaction within %.1f %% of the true one on [0, 1] (of its largest value); "
                "%.1f s", final_loss, 100 * reaction_error, elapsed)
    logger.info("steps over [0, %g] at rtol %g: kencarp4 (IMEX) %d, dopri5 %d (%.0fx)", args.t_end, args.rtol,
                counts["kencarp4"], counts["dopri5"], counts["dopri5"] / max(counts["kencarp4"], 1))
    summary = {"final_loss": final_loss, "reaction_error": reaction_error, "history": history, "steps": counts,
               "elapsed": elapsed, "out": args.out}
    if not args.no_plot:
        figure = os.path.join(args.out, "reaction_diffusion.png")
        save_figure(reaction, truth, data, predicted, times, figure)
        logger.info("figure: %s", figure)
        summary["figure"] = figure
    return summary


if __name__ == "__main__":
    main()
