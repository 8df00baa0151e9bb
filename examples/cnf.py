"""A continuous normalizing flow (FFJORD-style) on 2-D toy densities, integrated and differentiated by PETSc.

The flow carries a data point x (time 0) to a point z of the base density N(0, I) (time 1) along
dz/dt = f(t, z), a small time-conditioned MLP. By the instantaneous change of variables, the
log-density along the path changes at the rate -tr(df/dz), so with the running change

    delta(t) = -int_0^t tr(df/dz) ds,   log p_model(x) = log N(z(1); 0, I) - delta(1).

``(z, delta)`` is ONE tuple state, integrated by PETSc TS from t = 0 to t = 1 with
``pnode.odeint_adjoint`` (through ``pnode.ODEBlock``) and differentiated by TSAdjoint. Sampling runs
the same ODE backwards, from t = 1 (base samples) to t = 0 (data space).

The trace is exact (``--trace exact``: one autograd pass per dimension, cheap in 2-D) or Hutchinson's
unbiased estimate eps^T (df/dz) eps (``--trace hutchinson``: one pass whatever the dimension). The
noise eps is drawn once per solve and held by the dynamics module, so the forward solve and the
adjoint solve (which re-evaluates f to take vector-Jacobian products) see the same function. Test
log-likelihoods and the density plot always use the exact trace.

    python examples/cnf.py --data moons                          # ~3.5 minutes on one CPU core
    python examples/cnf.py --data 8gaussians --trace hutchinson
    python examples/cnf.py --data checkerboard --niters 1000 -ts_adapt_monitor   # PETSc options pass through

Writes ``<out>/log.txt``, ``<out>/metrics.jsonl``, ``<out>/checkpoint.pt`` (every ``--log-every``
iterations; ``--resume`` continues from it) and ``<out>/cnf_<data>.png`` (data, learned density,
samples).
"""

import argparse
import math
import os
import sys
import time
from typing import Dict, Optional

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

DTYPE = torch.float64  # PETSc integrates in float64; a float64 model avoids casts at every evaluation
PLOT_RANGE = 4.0  # the figure shows [-4, 4]^2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["moons", "8gaussians", "checkerboard"], default="moons")
    parser.add_argument("--trace", choices=["exact", "hutchinson"], default="exact",
                        help="how training computes tr(df/dz) (evaluation is always exact)")
    parser.add_argument("--noise", choices=["rademacher", "gaussian"], default="rademacher",
                        help="distribution of Hutchinson's probe vectors")
    parser.add_argument("--hidden", type=int, default=64, help="width of the dynamics MLP")
    parser.add_argument("--layers", type=int, default=3, help="hidden layers of the dynamics MLP")
    parser.add_argument("--activation", choices=["tanh", "softplus"], default="tanh")
    parser.add_argument("--method", default="dopri5", help="pnode method (default: dopri5, adaptive)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--niters", type=int, default=400, help="training iterations (one batch each)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--test-size", type=int, default=4096, help="held-out data points for the test NLL")
    parser.add_argument("--log-every", type=int, default=25,
                        help="iterations between test evaluations, log lines and checkpoints")
    parser.add_argument("--grid", type=int, default=120, help="grid points per side of the density panel")
    parser.add_argument("--plot-samples", type=int, default=20000, help="data and model samples in the figure")
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


# ---------------------------------------------------------------------------------------------- data
def sample_data(name: str, n: int, rng: np.random.RandomState) -> torch.Tensor:
    """``n`` points of a 2-D toy density, shape ``(n, 2)``, spread over roughly [-3, 3]^2."""
    if name == "moons":
        # two interleaved half circles with Gaussian noise, centred and scaled by 2
        upper = rng.rand(n) < 0.5
        angle = rng.rand(n) * math.pi
        x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
        y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
        points = np.stack([x - 0.5, y - 0.25], axis=1) * 2.0 + 0.1 * 2.0 * rng.randn(n, 2)
    elif name == "8gaussians":
        # eight Gaussians (std 0.3) evenly spaced on a circle of radius 2.5
        angle = rng.randint(8, size=n) * (2.0 * math.pi / 8)
        points = 2.5 * np.stack([np.cos(angle), np.sin(angle)], axis=1) + 0.3 * rng.randn(n, 2)
    elif name == "checkerboard":
        # uniform on the 8 dark unit squares of a 4x4 board on [-2, 2]^2 (exact NLL: log 8 = 2.079)
        col = rng.randint(4, size=n)
        row = 2 * rng.randint(2, size=n) + (col % 2)
        points = np.stack([col, row], axis=1) - 2.0 + rng.rand(n, 2)
    else:
        raise ValueError(f"unknown data set {name!r}")
    return torch.as_tensor(points, dtype=DTYPE)


# ---------------------------------------------------------------------------------------------- model
class TimeConditionedMLP(nn.Module):
    """The velocity field f(t, z): an MLP whose every layer also sees the time t (concatenated)."""

    def __init__(self, dim: int, hidden: int, layers: int, activation: str):
        super().__init__()
        widths = [dim] + [hidden] * layers + [dim]
        self.linears = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = torch.tanh if activation == "tanh" else nn.functional.softplus

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        time_column = t.reshape(1, 1).expand(z.shape[0], 1)
        h = z
        for i, linear in enumerate(self.linears):
            h = linear(torch.cat([h, time_column], dim=1))
            if i < len(self.linears) - 1:
                h = self.activation(h)
        return h


def exact_trace(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """tr(d dz / dz) per sample, ``(batch,)``: one backward pass per dimension."""
    trace = torch.zeros(z.shape[0], dtype=z.dtype)
    for i in range(z.shape[1]):
        (row,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        trace = trace + row[:, i]
    return trace


def hutchinson_trace(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """eps^T (d dz / dz) eps per sample, ``(batch,)``: an unbiased estimate of the trace when
    E[eps eps^T] = I (Rademacher or standard normal eps)."""
    (eps_jacobian,) = torch.autograd.grad(dz, z, grad_outputs=noise, create_graph=create_graph, retain_graph=True)
    return (eps_jacobian * noise).sum(dim=1)


class CNFDynamics(nn.Module):
    """The right-hand side pnode integrates: ``(z, delta) -> (f(t, z), -tr(df/dz))``.

    ``noise`` is None for the exact trace, or a ``(batch, dim)`` tensor of Hutchinson probes; set it
    before a solve and leave it until that solve's backward pass is done.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.noise: Optional[torch.Tensor] = None

    def forward(self, t: torch.Tensor, state):
        z = state[0]
        # pnode evaluates f without a graph in forward solves and with one when TSAdjoint needs
        # vector-Jacobian products; only then must the trace itself be differentiable.
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            if self.noise is None:
                trace = exact_trace(dz, z, differentiable)
            else:
                trace = hutchinson_trace(dz, z, self.noise, differentiable)
        if not differentiable:
            dz, trace = dz.detach(), trace.detach()
        return dz, -trace.unsqueeze(1)


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z ** 2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2.0 * math.pi)


class CNF(nn.Module):
    """Data (t = 0) <-> base N(0, I) (t = 1) along the ODE of ``dynamics``."""

    def __init__(self, dynamics: CNFDynamics, method: str, rtol: float, atol: float):
        super().__init__()
        self.flow = pnode.ODEBlock(dynamics, t=(0.0, 1.0), method=method, rtol=rtol, atol=atol)

    @property
    def dynamics(self) -> CNFDynamics:
        return self.flow.func

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_model(x), ``(batch,)``, differentiable (through TSAdjoint) when grad is enabled."""
        z, delta = self.flow((x, torch.zeros(x.shape[0], 1, dtype=x.dtype)))
        return standard_normal_logprob(z) - delta[:, 0]

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Push base samples ``z`` (t = 1) back to data space (t = 0); only f is needed, not the trace."""
        flow = self.flow
        t = torch.tensor([1.0, 0.0], dtype=z.dtype)
        return pnode.odeint(self.dynamics.net, z, t, method=flow.method, rtol=flow.rtol, atol=flow.atol)[-1]


def draw_probes(kind: str, shape, dtype=DTYPE) -> torch.Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, shape).to(dtype) * 2.0 - 1.0
    return torch.randn(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_nll(model: CNF, x: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of ``x`` with the exact trace."""
    model.dynamics.noise = None
    return float(-model.log_prob(x).mean())


@torch.no_grad()
def save_figure(model: CNF, args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.dynamics.noise = None
    lim = PLOT_RANGE
    data = sample_data(args.data, args.plot_samples, np.random.RandomState(args.seed + 7))
    axis = torch.linspace(-lim, lim, args.grid, dtype=DTYPE)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    density = model.log_prob(grid).exp().reshape(args.grid, args.grid)
    generator = torch.Generator().manual_seed(args.seed + 7)
    samples = model.sample(torch.randn(args.plot_samples, 2, generator=generator, dtype=DTYPE))

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
    hist = dict(bins=100, range=[[-lim, lim], [-lim, lim]], cmap="viridis")
    axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), **hist)
    axes[0].set_title(f"data ({args.data})")
    axes[1].imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    axes[1].set_title("learned density")
    axes[2].hist2d(samples[:, 0].numpy(), samples[:, 1].numpy(), **hist)
    axes[2].set_title("samples (base pushed through the flow)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- training
def main(argv=None) -> Dict[str, object]:
    args = parse_args(build_parser(), argv)
    logger = setup_run(args, f"cnf_{args.data}")

    x_test = sample_data(args.data, args.test_size, np.random.RandomState(args.seed + 1))
    net = TimeConditionedMLP(2, args.hidden, args.layers, args.activation).to(DTYPE)
    model = CNF(CNFDynamics(net), args.method, args.rtol, args.atol)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    logger.info("CNF on %s: %d parameters, trace %s, solver %s rtol=%g atol=%g (gradients: PETSc TSAdjoint)",
                args.data, sum(p.numel() for p in model.parameters()), args.trace, args.method, args.rtol, args.atol)

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
        record = {"iteration": 0, "test_nll": evaluate_nll(model, x_test)}
        history.append(record)
        append_jsonl(metrics_path, record)
        logger.info("iter 0 | test NLL %.4f nats", record["test_nll"])

    data_rng = np.random  # the global NumPy stream, part of the checkpointed RNG state
    window = {"loss": 0.0, "nfe_f": 0, "nfe_b": 0, "n": 0}
    tick = time.perf_counter()
    for itr in progress(range(start + 1, args.niters + 1), desc="cnf", enabled=not args.no_progress,
                        total=args.niters - start):
        x = sample_data(args.data, args.batch_size, data_rng)
        model.dynamics.noise = draw_probes(args.noise, x.shape) if args.trace == "hutchinson" else None
        model.flow.reset_nfe()
        loss = -model.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.dynamics.noise = None
        window["loss"] += loss.item()
        window["nfe_f"] += model.flow.nfe_forward
        window["nfe_b"] += model.flow.nfe_backward
        window["n"] += 1

        if itr % args.log_every == 0 or itr == args.niters:
            n = window["n"]
            now = time.perf_counter()
            elapsed += now - tick
            record = {"iteration": itr, "train_nll": window["loss"] / n, "test_nll": evaluate_nll(model, x_test),
                      "nfe_forward": window["nfe_f"] / n, "nfe_backward": window["nfe_b"] / n,
                      "seconds_per_iter": (now - tick) / n, "elapsed": elapsed}
            history.append(record)
            append_jsonl(metrics_path, record)
            logger.info("iter %d | train NLL %.4f | test NLL %.4f nats | NFE-F %.1f NFE-B %.1f | %.3f s/iter",
                        itr, record["train_nll"], record["test_nll"], record["nfe_forward"],
                        record["nfe_backward"], record["seconds_per_iter"])
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "iteration": itr, "rng": rng_state(), "history": history,
                                              "elapsed": elapsed, "args": vars(args)})
            window = {"loss": 0.0, "nfe_f": 0, "nfe_b": 0, "n": 0}
            tick = time.perf_counter()

    figure = os.path.join(args.out, f"cnf_{args.data}.png")
    if args.plot_samples > 0:
        save_figure(model, args, figure)
        logger.info("figure: %s", figure)
    final = history[-1]
    logger.info("done: test NLL %.4f -> %.4f nats (log-likelihood %.4f) in %.0f s of training",
                history[0]["test_nll"], final["test_nll"], -final["test_nll"], elapsed)
    return {"history": history, "test_nll": final["test_nll"], "figure": figure, "out": args.out}


if __name__ == "__main__":
    main()
