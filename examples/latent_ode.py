"""A latent ODE (Chen et al. 2018; Rubanova et al. 2019) on irregularly sampled noisy spirals, with pnode.

Data: 2-D spirals (clockwise or counter-clockwise, random radius and phase, slowly decaying) on one
irregular grid of times in [0, T]. Each trajectory observes its OWN random subset of the grid points
in the observation window [0, T_obs] (with Gaussian noise); the other window points are held out for
interpolation, and the points in (T_obs, T] for extrapolation.

Model, trained as a variational auto-encoder (ELBO = Gaussian log-likelihood of the observations -
KL(q(z0) || N(0, I))):

* encoder: a GRU run backwards in time over a trajectory's observations (input: the observation
  and its time; the hidden state is carried unchanged over times it did not observe) -> q(z0) =
  N(mean, diag(exp(logvar))) at t = 0;
* a sample z0 -> ``pnode.odeint_adjoint`` of a latent MLP ODE dz/dt = f(z), output at the union of
  the batch's observation times (sorted; irregular; PETSc hits every one exactly) -> decoder MLP.

Interpolation and extrapolation errors are measured on a held-out test set from the mean of q(z0),
against the noise-free spirals.

    python examples/latent_ode.py                       # ~4 minutes on one CPU core
    python examples/latent_ode.py --niters 1500 --latent-dim 6
    python examples/latent_ode.py -ts_rk_type 5bs       # PETSc options pass through

Writes ``<out>/log.txt``, ``<out>/metrics.jsonl``, ``<out>/checkpoint.pt`` (every ``--log-every``
iterations; ``--resume`` continues from it) and ``<out>/latent_ode.png``.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--n-train", type=int, default=1000, help="training spirals")
    data.add_argument("--n-test", type=int, default=100, help="test spirals")
    data.add_argument("--n-grid", type=int, default=60, help="irregular time points in [0, T]")
    data.add_argument("--t-end", type=float, default=10.0, help="T: the last time of the grid")
    data.add_argument("--t-obs", type=float, default=6.5, help="end of the observation window")
    data.add_argument("--n-obs", type=int, default=20, help="observed points per spiral (in the window)")
    data.add_argument("--noise-std", type=float, default=0.1, help="observation noise")
    model = parser.add_argument_group("model")
    model.add_argument("--latent-dim", type=int, default=4)
    model.add_argument("--hidden", type=int, default=64, help="width of the latent ODE and decoder MLPs")
    model.add_argument("--rnn-hidden", type=int, default=25, help="GRU encoder width")
    solver = parser.add_argument_group("solver and training")
    solver.add_argument("--method", default="dopri5", help="pnode method (default: dopri5, adaptive)")
    solver.add_argument("--rtol", type=float, default=1e-4)
    solver.add_argument("--atol", type=float, default=1e-5)
    solver.add_argument("--niters", type=int, default=800)
    solver.add_argument("--batch-size", type=int, default=250)
    solver.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate")
    solver.add_argument("--lr-decay", type=float, default=0.997,
                        help="learning-rate factor per iteration (0.997: 1e-2 -> 9e-4 over 800 iterations)")
    solver.add_argument("--log-every", type=int, default=50,
                        help="iterations between test evaluations, log lines and checkpoints")
    solver.add_argument("--plot-spirals", type=int, default=4, help="test spirals in the figure (0: no figure)")
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Spirals:
    """Noisy spirals on one irregular time grid.

    Attributes:
        times: ``(n_grid,)`` increasing, ``times[0] == 0``.
        shape: ``(n, 3)`` per spiral: sense of rotation (+-1), phase, initial radius.
        truth: noise-free positions ``(n, n_grid, 2)``.
        values: noisy observations ``(n, n_grid, 2)`` (used only where ``observed``).
        observed: ``(n, n_grid)`` bool, the points the encoder and the likelihood see.
        held_out: ``(n, n_grid)`` bool, the unobserved points in the window (interpolation).
        beyond: ``(n_grid,)`` bool, the points after the window (extrapolation).
    """

    times: torch.Tensor
    shape: torch.Tensor
    truth: torch.Tensor
    values: torch.Tensor
    observed: torch.Tensor
    held_out: torch.Tensor
    beyond: torch.Tensor

    def subset(self, index) -> "Spirals":
        return Spirals(self.times, self.shape[index], self.truth[index], self.values[index], self.observed[index],
                       self.held_out[index], self.beyond)


def spiral_positions(shape: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """r0 exp(-0.06 t) (cos, sin)(phase + 0.9 s t) for each row ``(s, phase, r0)`` of ``shape``: ``(n, len(t), 2)``."""
    sense, phase, radius0 = (shape[:, i:i + 1] for i in range(3))
    angle = phase + 0.9 * sense * t
    radius = radius0 * torch.exp(-0.06 * t)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


def make_times(n_grid: int, t_end: float, rng: np.random.RandomState) -> torch.Tensor:
    """An irregular grid: 0, then ``n_grid - 1`` sorted uniform times in (0, t_end] (last = t_end)."""
    inner = np.sort(rng.uniform(0.0, t_end, n_grid - 2))
    return torch.as_tensor(np.concatenate([[0.0], inner, [t_end]]), dtype=DTYPE)


def make_spirals(n: int, times: torch.Tensor, t_obs: float, n_obs: int, noise_std: float,
                 rng: np.random.RandomState) -> Spirals:
    """``n`` random spirals (either sense, any phase, radius 1.5 to 2.5), each observed with noise at
    ``n_obs`` random grid points of the window ``t <= t_obs``."""
    shape = torch.as_tensor(np.stack([rng.choice([-1.0, 1.0], size=n), rng.uniform(0.0, 2.0 * math.pi, size=n),
                                      rng.uniform(1.5, 2.5, size=n)], axis=1), dtype=DTYPE)
    truth = spiral_positions(shape, times)
    values = truth + noise_std * torch.as_tensor(rng.randn(*truth.shape), dtype=DTYPE)
    in_window = times <= t_obs
    window = torch.nonzero(in_window)[:, 0].numpy()
    observed = torch.zeros(n, len(times), dtype=torch.bool)
    for i in range(n):
        observed[i, rng.choice(window, size=n_obs, replace=False)] = True
    return Spirals(times, shape, truth, values, observed, in_window & ~observed, ~in_window)


# ---------------------------------------------------------------------------------------------- model
class Encoder(nn.Module):
    """GRU run backwards over each trajectory's own observations -> mean and log-variance of q(z0)."""

    def __init__(self, obs_dim: int, hidden: int, latent_dim: int, t_scale: float):
        super().__init__()
        self.cell = nn.GRUCell(obs_dim + 1, hidden)
        self.head = nn.Linear(hidden, 2 * latent_dim)
        self.t_scale = t_scale

    def forward(self, times: torch.Tensor, values: torch.Tensor, observed: torch.Tensor):
        """``times (k,)``, ``values (b, k, d)``, ``observed (b, k)`` -> ``(mean, logvar)``, each ``(b, latent)``."""
        h = torch.zeros(values.shape[0], self.cell.hidden_size, dtype=values.dtype)
        for j in reversed(range(len(times))):
            time_column = (times[j] / self.t_scale).expand(values.shape[0], 1)
            updated = self.cell(torch.cat([values[:, j], time_column], dim=1), h)
            h = torch.where(observed[:, j:j + 1], updated, h)
        mean, logvar = self.head(h).chunk(2, dim=1)
        return mean, logvar


class LatentDynamics(nn.Module):
    """dz/dt = f(z): an autonomous MLP in latent space, counting its evaluations.

    pnode evaluates f without a graph in forward solves (``nfe_forward``) and with one where the
    adjoint needs vector-Jacobian products (``nfe_backward``).
    """

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, latent_dim))
        self.nfe_forward = self.nfe_backward = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.nfe_backward += 1
        else:
            self.nfe_forward += 1
        return self.net(z)


class LatentODE(nn.Module):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.encoder = Encoder(2, args.rnn_hidden, args.latent_dim, args.t_end)
        self.dynamics = LatentDynamics(args.latent_dim, args.hidden)
        self.decoder = nn.Sequential(nn.Linear(args.latent_dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 2))
        self.solver = dict(method=args.method, rtol=args.rtol, atol=args.atol)

    def decode_path(self, z0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Solve the latent ODE from ``z0`` (at ``times[0]``) and decode: ``(b, len(times), 2)``."""
        z = pnode.odeint_adjoint(self.dynamics, z0, times, **self.solver)  # (len(times), b, latent)
        return self.decoder(z).transpose(0, 1)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per row."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=1)


def negative_elbo(model: LatentODE, batch: Spirals, noise_std: float) -> torch.Tensor:
    """Mean over the batch of -[log p(observations | z0) - KL(q(z0) || p(z0))], z0 ~ q (one sample)."""
    # The ODE runs over the union of the batch's observation times (and t = 0, where z0 lives).
    keep = batch.observed.any(dim=0)
    keep[0] = True
    times, values, observed = batch.times[keep], batch.values[:, keep], batch.observed[:, keep]
    mean, logvar = model.encoder(times, values, observed)
    z0 = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
    predicted = model.decode_path(z0, times)
    log_density = -0.5 * ((values - predicted) / noise_std) ** 2 - math.log(noise_std) - 0.5 * math.log(2 * math.pi)
    log_likelihood = (log_density.sum(dim=2) * observed).sum(dim=1)
    return (gaussian_kl(mean, logvar) - log_likelihood).mean()


@torch.no_grad()
def evaluate(model: LatentODE, data: Spirals) -> Dict[str, float]:
    """RMSE against the noise-free spirals from the mean of q(z0), at held-out window points
    (interpolation), past the window (extrapolation) and at the observed points (reconstruction)."""
    mean, _ = model.encoder(data.times, data.values, data.observed)
    predicted = model.decode_path(mean, data.times)
    squared = ((predicted - data.truth) ** 2).sum(dim=2)

    def rmse(mask):
        return math.sqrt(float((squared * mask).sum() / mask.sum()))

    beyond = data.beyond.expand_as(data.observed)
    return {"interp_rmse": rmse(data.held_out), "extrap_rmse": rmse(beyond), "recon_rmse": rmse(data.observed)}


@torch.no_grad()
def save_figure(model: LatentODE, data: Spirals, t_obs: float, path: str) -> None:
    """Observations, the fit inside the window and the extrapolation beyond it, on a fine time grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = torch.linspace(0.0, float(data.times[-1]), 400, dtype=DTYPE)
    fine = torch.unique(torch.cat([fine, torch.tensor([t_obs], dtype=DTYPE)]))  # sorted, with t_obs
    mean, _ = model.encoder(data.times, data.values, data.observed)
    predicted = model.decode_path(mean, fine)
    truth = spiral_positions(data.shape, fine)
    inside, after = fine <= t_obs, fine >= t_obs
    n = data.values.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.plot(truth[i, :, 0], truth[i, :, 1], color="0.8", lw=3, label="true spiral")
        obs = data.observed[i]
        ax.scatter(data.values[i, obs, 0], data.values[i, obs, 1], s=10, color="k", zorder=3, label="observed")
        ax.plot(predicted[i, inside, 0], predicted[i, inside, 1], color="tab:blue", label="fit (interpolation)")
        ax.plot(predicted[i, after, 0], predicted[i, after, 1], color="tab:red", ls="--", label="extrapolation")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- training
def main(argv=None) -> Dict[str, object]:
    args = parse_args(build_parser(), argv)
    logger = setup_run(args, "latent_ode")

    data_rng = np.random.RandomState(args.seed + 1)  # the data set depends on the seed only
    times = make_times(args.n_grid, args.t_end, data_rng)
    train = make_spirals(args.n_train, times, args.t_obs, args.n_obs, args.noise_std, data_rng)
    test = make_spirals(args.n_test, times, args.t_obs, args.n_obs, args.noise_std, data_rng)
    model = LatentODE(args).to(DTYPE)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    logger.info("latent ODE: %d train / %d test spirals, %d of %d irregular times observed in [0, %g], "
                "extrapolation to %g; %d parameters; solver %s rtol=%g atol=%g",
                args.n_train, args.n_test, args.n_obs, int((times <= args.t_obs).sum()), args.t_obs, args.t_end,
                sum(p.numel() for p in model.parameters()), args.method, args.rtol, args.atol)

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
        record = {"iteration": 0, **evaluate(model, test)}
        history.append(record)
        append_jsonl(metrics_path, record)
        logger.info("iter 0 | test RMSE interp %.4f extrap %.4f recon %.4f", record["interp_rmse"],
                    record["extrap_rmse"], record["recon_rmse"])

    dynamics = model.dynamics
    window = {"loss": 0.0, "n": 0, "times": 0}
    dynamics.nfe_forward = dynamics.nfe_backward = 0
    tick = time.perf_counter()
    for itr in progress(range(start + 1, args.niters + 1), desc="latent ODE", enabled=not args.no_progress,
                        total=args.niters - start):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * args.lr_decay ** (itr - 1)
        batch = train.subset(torch.randperm(args.n_train)[:args.batch_size])
        loss = negative_elbo(model, batch, args.noise_std)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window["loss"] += loss.item()
        window["times"] += int(batch.observed.any(dim=0).sum())
        window["n"] += 1

        if itr % args.log_every == 0 or itr == args.niters:
            n = window["n"]
            now = time.perf_counter()
            elapsed += now - tick
            train_nfe = (dynamics.nfe_forward, dynamics.nfe_backward)
            errors = evaluate(model, test)
            record = {"iteration": itr, "neg_elbo": window["loss"] / n, **errors,
                      "output_times_per_batch": window["times"] / n, "nfe_forward": train_nfe[0] / n,
                      "nfe_backward": train_nfe[1] / n, "seconds_per_iter": (now - tick) / n,
                      "elapsed": elapsed}
            history.append(record)
            append_jsonl(metrics_path, record)
            logger.info("iter %d | -ELBO %.2f | test RMSE interp %.4f extrap %.4f recon %.4f | %.0f output times "
                        "| NFE-F %.0f NFE-B %.0f | %.3f s/iter", itr, record["neg_elbo"], record["interp_rmse"],
                        record["extrap_rmse"], record["recon_rmse"], record["output_times_per_batch"],
                        record["nfe_forward"], record["nfe_backward"], record["seconds_per_iter"])
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "iteration": itr, "rng": rng_state(), "history": history,
                                              "elapsed": elapsed, "args": vars(args)})
            window = {"loss": 0.0, "n": 0, "times": 0}
            dynamics.nfe_forward = dynamics.nfe_backward = 0
            tick = time.perf_counter()

    figure = os.path.join(args.out, "latent_ode.png")
    if args.plot_spirals > 0:
        save_figure(model, test.subset(torch.arange(min(args.plot_spirals, args.n_test))), args.t_obs, figure)
        logger.info("figure: %s", figure)
    final = history[-1] if history else {}
    logger.info("done: test RMSE interpolation %.4f, extrapolation %.4f (noise std %g) in %.0f s of training",
                final.get("interp_rmse", float("nan")), final.get("extrap_rmse", float("nan")), args.noise_std,
                elapsed)
    return {"history": history, "figure": figure, "out": args.out}


if __name__ == "__main__":
    main()
