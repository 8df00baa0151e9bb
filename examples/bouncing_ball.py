"""Learning a bouncing ball's coefficient of restitution from its trajectory, through chained event solves.

A ball dropped from height h0 falls under gravity, dh/dt = v, dv/dt = -g. When it reaches the ground
(the event h = 0, located by ``pnode.odeint_event`` along the computed solution) it bounces: v <- -e v,
where e is the coefficient of restitution. One simulation chains ``--bounces`` event solves, each
starting from the state just after the previous bounce (height 0 going up, which is not itself an
event), and then follows the last flight to the end of the observation window.

The observations are the heights at ``--n-obs`` times in (0, T], from the closed form with the true
coefficient (``--true-e``), optionally with Gaussian noise (``--noise``). T is the top of the flight
after the last bounce, so the window holds exactly ``--bounces`` bounces. Starting from
``--init-e``, the script fits e (as e = sigmoid(w)) by minimising the mean squared height error with
L-BFGS (or Adam). The gradient with respect to e reaches every bounce time through the implicit
function theorem, composed with PETSc's discrete adjoint of the steps between them: a larger e
launches the ball faster, which delays every later bounce.

    python examples/bouncing_ball.py                          # dopri5, 4 bounces, L-BFGS; a few seconds
    python examples/bouncing_ball.py --method rk4 --step-size 0.01
    python examples/bouncing_ball.py --noise 0.02 --optimizer adam --niters 150
    python examples/bouncing_ball.py -ts_adapt_monitor          # PETSc options pass through

Writes ``<out>/log.txt``, ``<out>/metrics.jsonl``, ``<out>/checkpoint.pt`` (every ``--log-every``
iterations; ``--resume`` continues from it) and ``<out>/bouncing_ball.png``.
"""

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

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
E_MIN = 0.2  # the smallest coefficient the model can take


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=float, default=1.0, help="drop height h0 (m)")
    parser.add_argument("--gravity", type=float, default=9.81, help="g (m/s^2)")
    parser.add_argument("--true-e", type=float, default=0.8, help="coefficient of restitution of the observed ball")
    parser.add_argument("--init-e", type=float, default=0.5, help="initial guess of the coefficient")
    parser.add_argument("--bounces", type=int, default=4, help="bounces simulated (and observed)")
    parser.add_argument("--n-obs", type=int, default=40, help="observed heights, evenly spaced in (0, T]")
    parser.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise on the heights (m)")
    parser.add_argument("--method", default="dopri5", help="pnode method (see pnode.available_methods())")
    parser.add_argument("--step-size", type=float, default=None, help="fixed step (needed by fixed-step methods)")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--atol", type=float, default=1e-10)
    parser.add_argument("--event-tol", type=float, default=1e-10,
                        help="event tolerance on |h| (m): a start lower than it is not an event, so flights lower "
                             "than it are not seen; the bounce time is refined beyond it")
    parser.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    parser.add_argument("--niters", type=int, default=10, help="optimiser iterations")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 1 for L-BFGS, 0.05 for Adam)")
    parser.add_argument("--log-every", type=int, default=1, help="iterations between log lines and checkpoints")
    parser.add_argument("--no-plot", action="store_true")
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


# ---------------------------------------------------------------------------------------------- closed form
def bounce_times(h0: float, g: float, e: float, bounces: int) -> List[float]:
    """Times of the first ``bounces`` impacts: sqrt(2 h0 / g), then flights of 2 e^k v1 / g."""
    first = math.sqrt(2 * h0 / g)
    times, speed = [first], g * first
    for _ in range(bounces - 1):
        speed *= e
        times.append(times[-1] + 2 * speed / g)
    return times


def window_end(h0: float, g: float, e: float, bounces: int) -> float:
    """The top of the flight after the last bounce."""
    return bounce_times(h0, g, e, bounces)[-1] + e ** bounces * math.sqrt(2 * h0 * g) / g


def closed_form_heights(times: torch.Tensor, h0: float, g: float, e: float, bounces: int) -> torch.Tensor:
    """Heights at ``times`` (within the window) of a ball dropped from ``h0`` with restitution ``e``."""
    impacts = bounce_times(h0, g, e, bounces)
    heights = h0 - 0.5 * g * times ** 2
    for k, impact in enumerate(impacts, start=1):
        launch = e ** k * math.sqrt(2 * h0 * g)
        s = times - impact
        heights = torch.where(times >= impact, launch * s - 0.5 * g * s ** 2, heights)
    return heights


# ---------------------------------------------------------------------------------------------- model
class Restitution(nn.Module):
    """The trainable coefficient ``e = E_MIN + (1 - E_MIN) sigmoid(logit)``, in (E_MIN, 1).

    Bounded below so that a line search's trial values keep the flights higher than the event
    tolerance: a ball that leaves the ground by less than it is at rest, and its landing is no event.
    """

    def __init__(self, e: float):
        super().__init__()
        if not E_MIN < e < 1:
            raise ValueError(f"the coefficient of restitution must lie in ({E_MIN}, 1), got {e}")
        fraction = (e - E_MIN) / (1 - E_MIN)
        self.logit = nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction)), dtype=DTYPE))

    @property
    def e(self) -> torch.Tensor:
        return E_MIN + (1 - E_MIN) * torch.sigmoid(self.logit)


class Ball:
    """The flight between bounces, ``y = (h, v)``: ``dy/dt = (v, -g)``; the event is ``h = 0``."""

    def __init__(self, args: argparse.Namespace):
        self.g = args.gravity
        self.solver = {"method": args.method, "rtol": args.rtol, "atol": args.atol}
        self.options = {} if args.step_size is None else {"step_size": args.step_size}
        self.event_options = dict(self.options, event_tol=args.event_tol)

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], torch.full_like(y[1], -self.g)])

    @staticmethod
    def ground(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y[0]

    def next_bounce(self, state: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(t_impact, state at impact)`` of the flight that starts at ``t`` from ``state``."""
        t_impact, solution = pnode.odeint_event(self, state, t, event_fn=self.ground, options=self.event_options,
                                                **self.solver)
        return t_impact, solution[-1]

    def heights(self, state: torch.Tensor, t: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Heights at ``times`` (all later than ``t``) of the flight from ``state`` at ``t``."""
        if len(times) == 0:
            return times
        ys = pnode.odeint_adjoint(self, state, torch.cat([t.reshape(1), times]), options=self.options,
                                  **self.solver)
        return ys[1:, 0]


def simulate(ball: Ball, e: torch.Tensor, h0: float, bounces: int,
             times: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Heights at ``times`` (increasing, in (0, T]) and the bounce times, for restitution ``e``.

    Each flight ends at the next event; the observation times in (t_start, t_impact] are integrated
    from the flight's start. After ``bounces`` bounces the ball flies on to the end of ``times``.
    """
    state = torch.tensor([h0, 0.0], dtype=DTYPE)
    start = torch.tensor(0.0, dtype=DTYPE)
    pieces, impacts = [], []
    for _ in range(bounces):
        t_impact, at_impact = ball.next_bounce(state, start)
        inside = (times > float(start.detach())) & (times <= float(t_impact.detach()))
        pieces.append(ball.heights(state, start, times[inside]))
        # the bounce: back at the ground, going up with e times the impact speed
        state = torch.stack([torch.zeros_like(at_impact[0]), -e * at_impact[1]])
        start = t_impact
        impacts.append(t_impact)
    pieces.append(ball.heights(state, start, times[times > float(start.detach())]))
    return torch.cat(pieces), impacts


# ---------------------------------------------------------------------------------------------- figure
def save_figure(times, observed, dense_times, curves: Dict[str, torch.Tensor], impacts, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    styles = {"true": dict(color="0.7", lw=4), "initial guess": dict(color="tab:orange", ls="--"),
              "fitted (pnode)": dict(color="tab:blue", lw=1.5)}
    for name, heights in curves.items():
        ax.plot(dense_times.numpy(), heights.numpy(), label=name, **styles[name])
    ax.plot(times.numpy(), observed.numpy(), "k.", ms=4, label="observed")
    for impact in impacts:
        ax.axvline(impact, color="tab:blue", lw=0.6, alpha=0.5)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("height (m)")
    top = float(max(c.max() for c in curves.values()))
    ax.set_ylim(-0.08 * top, 1.08 * top)  # a model that ran out of simulated bounces falls through the floor
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- fit
def make_optimizer(name: str, params, lr: Optional[float]) -> torch.optim.Optimizer:
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=lr or 1.0, max_iter=1, history_size=10, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-14, tolerance_change=1e-16)
    return torch.optim.Adam(params, lr=lr or 0.05)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(build_parser(), argv)
    logger = setup_run(args, "bouncing_ball")

    h0, g = args.height, args.gravity
    end = window_end(h0, g, args.true_e, args.bounces)
    times = torch.linspace(0.0, end, args.n_obs + 1, dtype=DTYPE)[1:]
    observed = closed_form_heights(times, h0, g, args.true_e, args.bounces)
    if args.noise > 0:
        observed = observed + args.noise * torch.randn(observed.shape, dtype=DTYPE)
    ball = Ball(args)
    model = Restitution(args.init_e)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    logger.info("bouncing ball: h0 %g m, g %g m/s^2, %d bounces in [0, %.4f] s, %d observed heights (noise %g m); "
                "%s; e from %g (true %g); optimiser %s", h0, g, args.bounces, end, args.n_obs, args.noise,
                args.method, args.init_e, args.true_e, args.optimizer)

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
        predicted, _ = simulate(ball, model.e, h0, args.bounces, times)
        loss = ((predicted - observed) ** 2).mean()
        loss.backward()
        return loss

    tick = time.perf_counter()
    previous = None
    for itr in progress(range(start + 1, args.niters + 1), desc="bouncing ball", enabled=not args.no_progress,
                        total=args.niters - start):
        loss = optimizer.step(closure)
        if args.optimizer == "lbfgs" and loss.item() == previous and loss.item() > 0:
            # The line search found no decrease. The loss has kinks where a bounce passes an observation
            # time (that height switches from one flight to the next), and a curvature pair taken across
            # one can spoil L-BFGS's history: start it afresh.
            optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
        previous = loss.item()
        if itr % args.log_every == 0 or itr == args.niters:
            now = time.perf_counter()
            elapsed += now - tick
            e = float(model.e.detach())
            record = {"iteration": itr, "loss": loss.item(), "e": e, "relative_error": e / args.true_e - 1.0,
                      "loss_evaluations": evaluations, "elapsed": elapsed}
            history.append(record)
            append_jsonl(metrics_path, record)
            logger.info("iter %d | loss %.3e (before the update) | e %.6f (%+.3f%%) | %d simulations | %.1f s", itr,
                        record["loss"], e, 100 * record["relative_error"], evaluations, elapsed)
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "iteration": itr, "rng": rng_state(), "history": history,
                                              "elapsed": elapsed, "args": vars(args)})
            evaluations = 0
            tick = time.perf_counter()

    e = float(model.e.detach())
    with torch.no_grad():
        predicted, impacts = simulate(ball, model.e, h0, args.bounces, times)
        final_loss = float(((predicted - observed) ** 2).mean())
    impacts = [float(t) for t in impacts]
    exact = bounce_times(h0, g, e, args.bounces)
    impact_error = max(abs(a - b) for a, b in zip(impacts, exact))
    logger.info("fitted e = %.6f (true %g, %+.3f%%); final loss %.3e; %.1f s", e, args.true_e,
                100 * (e / args.true_e - 1), final_loss, elapsed)
    logger.info("bounce times at the fitted e: %s s; closed form %s s (largest difference %.1e s)",
                ", ".join(f"{t:.6f}" for t in impacts), ", ".join(f"{t:.6f}" for t in exact), impact_error)
    summary = {"restitution": e, "true_restitution": args.true_e, "relative_error": e / args.true_e - 1,
               "final_loss": final_loss, "elapsed": elapsed, "bounce_times": impacts, "bounce_time_error": impact_error,
               "history": history, "out": args.out}

    if not args.no_plot:
        dense = torch.linspace(0.0, end, 400, dtype=DTYPE)[1:]
        with torch.no_grad():
            curves = {"true": closed_form_heights(dense, h0, g, args.true_e, args.bounces),
                      "initial guess": simulate(ball, torch.tensor(args.init_e, dtype=DTYPE), h0, args.bounces,
                                                dense)[0],
                      "fitted (pnode)": simulate(ball, model.e, h0, args.bounces, dense)[0]}
        figure = os.path.join(args.out, "bouncing_ball.png")
        save_figure(times, observed, dense, curves, impacts, figure)
        logger.info("figure: %s", figure)
        summary["figure"] = figure
    return summary


if __name__ == "__main__":
    main()
