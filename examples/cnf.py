"""A continuous normalizing flow (FFJORD), integrated and differentiated by PETSc, data-parallel under MPI.

The flow carries a data point x (time 0) to a point z of the base density N(0, I) (time T) along
dz/dt = f(t, z). By the instantaneous change of variables, the log-density along the path changes
at the rate -tr(df/dz), so with the running change delta(t) = -int_0^t tr(df/dz) ds,

    log p_model(x) = log N(z(T); 0, I) - delta(T).

``(z, delta)`` is ONE tuple state, integrated by PETSc TS with ``pnode.ODEBlock`` and differentiated
by TSAdjoint. As in FFJORD, ``--blocks K`` stacks K such flows (each its own ODE block and network,
PETSc options prefix ``cnf0_``, ``cnf1_``, ...) and f is an MLP of concat-squash layers
(``layer(h) * sigmoid(gate(t)) + shift(t)``; ``--layer concat`` concatenates t instead). Sampling runs
the blocks backwards, from base samples at t = T to data space at t = 0.

The trace is exact (``--trace exact``: one autograd pass per dimension) or Hutchinson's unbiased
estimate eps^T (df/dz) eps (``--trace hutchinson``: one pass whatever the dimension). The probes are
drawn once per training step and held by the dynamics, so the forward solve and the adjoint solve
(which evaluates f again) see the same function. Test log-likelihoods always use the exact trace.

Regularisation as in "How to train your neural ODE" (Finlay et al., 2020), each a flag with its
weight: ``--kinetic L`` adds L times the kinetic energy int_0^T |f|^2 dt, ``--jacobian L`` adds L
times int_0^T |df/dz|_F^2 dt (exact with the exact trace, else Hutchinson's |eps^T df/dz|^2); both
are integrated as extra state components of the same solve, averaged over the batch.

Data (``--data``): ``digits`` (default; scikit-learn's 8x8 digits, 64 dims, offline), the 2-D toys
``moons``, ``8gaussians``, ``checkerboard``, and the tabular sets ``power``, ``gas``, ``hepmass``,
``miniboone``, ``bsds300`` from the MAF/FFJORD release in ``--data-dir`` (see ``density_data.py``).
Defaults depend on the kind of data (:data:`DEFAULTS`).

    python examples/cnf.py                                      # digits, < 9 minutes on one core
    python examples/cnf.py --data moons                         # a 2-D density, ~3.5 minutes
    python examples/cnf.py --data 8gaussians --trace hutchinson --kinetic 0.01 --jacobian 0.01
    python examples/cnf.py --data miniboone --data-dir data     # a tabular set of the MAF release
    mpirun -n 2 python examples/cnf.py                          # the batch sharded over 2 ranks
    python examples/cnf.py --data moons -cnf0_ts_adapt_monitor  # PETSc options pass through

Under ``mpirun -n N`` every rank draws the same global batch (and probes) and keeps its shard; each
rank's loss is its rows' sum over the global batch size times N, and ``average_gradients`` makes the
step one process would take on the whole batch. ``--mpi-mode distributed`` (default) integrates one
PETSc system over all ranks (``comm=COMM_WORLD``: one step-size sequence, the same steps as one
process); ``independent`` lets every rank integrate its own rows (``comm=None``). Rank 0 alone logs
and writes. Writes ``<out>/log.txt``, ``<out>/metrics.jsonl``, ``<out>/checkpoint.pt`` (every
``--log-every`` iterations; ``--resume`` continues from it) and ``<out>/cnf_<data>.png``.
"""

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from classification import log_solvers, peak_rss_over_ranks  # noqa: E402
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
from density_data import (  # noqa: E402
    DATA_SETS,
    TABULAR_SETS,
    TOY_SETS,
    DatasetMissing,
    Density,
    DigitsDensity,
    gaussian_baselines,
    load_density,
    sample_toy,
)
from torch import nn  # noqa: E402

import pnode  # noqa: E402
from pnode import distributed  # noqa: E402

DTYPE = torch.float64  # PETSc integrates in float64; a float64 model avoids casts at every evaluation
PLOT_RANGE = 4.0  # the 2-D figures show [-4, 4]^2

# Defaults of the options left unset on the command line, per kind of data. The toys keep the
# settings their documented runs used; digits was tuned to train within 10 minutes on one core.
DEFAULTS: Dict[str, Dict[str, object]] = {
    "toy": {"layer": "concat", "blocks": 1, "hidden": 64, "layers": 3, "activation": "tanh", "trace": "exact",
            "rtol": 1e-5, "atol": 1e-5, "niters": 400, "batch_size": 512, "lr": 5e-3, "test_size": 4096,
            "log_every": 25},
    "digits": {"layer": "concatsquash", "blocks": 1, "hidden": 256, "layers": 2, "activation": "softplus",
               "trace": "hutchinson", "rtol": 1e-4, "atol": 1e-4, "niters": 800, "batch_size": 256, "lr": 2e-3,
               "test_size": 0, "log_every": 200},
    "tabular": {"layer": "concatsquash", "blocks": 5, "hidden": None, "layers": 2, "activation": "softplus",
                "trace": "hutchinson", "rtol": 1e-5, "atol": 1e-5, "niters": 10000, "batch_size": 1000,
                "lr": 1e-3, "test_size": 10000, "log_every": 250},
}
HIDDEN_PER_DIM = 10  # tabular sets: hidden width 10 x data dimension unless --hidden is given


def data_kind(name: str) -> str:
    return "toy" if name in TOY_SETS else "tabular" if name in TABULAR_SETS else "digits"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATA_SETS, default="digits")
    data.add_argument("--data-dir", default="data", help="where the tabular sets' release lies (power/, gas/, ...)")
    data.add_argument("--test-size", type=int, help="test points (toys: drawn; others: the first N, 0: all)")
    model = parser.add_argument_group("model (defaults per kind of data: see DEFAULTS)")
    model.add_argument("--blocks", type=int, help="CNF blocks stacked in sequence, each its own ODE")
    model.add_argument("--layer", choices=["concatsquash", "concat"], help="how f's layers see the time")
    model.add_argument("--hidden", type=int, help="width of f's hidden layers (tabular: 10 x dims)")
    model.add_argument("--layers", type=int, help="hidden layers of f")
    model.add_argument("--activation", choices=["tanh", "softplus"])
    model.add_argument("--time-length", type=float, default=1.0, help="each block integrates over [0, T]")
    model.add_argument("--trace", choices=["exact", "hutchinson"], help="how training computes tr(df/dz)")
    model.add_argument("--noise", choices=["rademacher", "gaussian"], default="rademacher",
                       help="distribution of Hutchinson's probe vectors")
    model.add_argument("--kinetic", type=float, default=0.0, help="weight of the kinetic-energy term (0: off)")
    model.add_argument("--jacobian", type=float, default=0.0, help="weight of the Jacobian-Frobenius term (0: off)")
    solver = parser.add_argument_group("ODE solver")
    solver.add_argument("--method", default="dopri5", help="pnode method (default: dopri5, adaptive)")
    solver.add_argument("--rtol", type=float)
    solver.add_argument("--atol", type=float)
    solver.add_argument("--step-size", type=float, help="fixed step size (fixed-step methods; default: one step)")
    solver.add_argument("--mpi-mode", choices=["distributed", "independent"], default="distributed",
                        help="under mpirun: one PETSc system over all ranks, or one per rank")
    train = parser.add_argument_group("training")
    train.add_argument("--niters", type=int, help="training iterations (one global batch each)")
    train.add_argument("--batch-size", type=int, help="global batch size, sharded over MPI ranks")
    train.add_argument("--lr", type=float)
    train.add_argument("--eval-batch-size", type=int, default=1000, help="test points per evaluation solve")
    train.add_argument("--log-every", type=int, help="iterations between test evaluations, logs and checkpoints")
    train.add_argument("--grid", type=int, default=120, help="grid points per side of the 2-D density panel")
    train.add_argument("--plot-samples", type=int, default=20000,
                       help="samples in the figure (digits: at most 64 images; 0: no figure)")
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Options left unset take the defaults of the data's kind (tabular sets: ``hidden`` stays None until
    the data's dimension is known); returns ``args``."""
    for key, value in DEFAULTS[data_kind(args.data)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------- model
class ConcatSquashLinear(nn.Module):
    """FFJORD's concat-squash layer: ``linear(h) * sigmoid(gate(t)) + shift(t)``, ``(B, n_in) -> (B, n_out)``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(1, n_out)
        self.shift = nn.Linear(1, n_out, bias=False)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        time = t.reshape(1, 1).to(h.dtype)
        return self.linear(h) * torch.sigmoid(self.gate(time)) + self.shift(time)


class ConcatLinear(nn.Module):
    """A linear layer of ``[h, t]``: the time as one more input, ``(B, n_in) -> (B, n_out)``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in + 1, n_out)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([h, t.reshape(1, 1).to(h.dtype).expand(h.shape[0], 1)], dim=1))


class VelocityField(nn.Module):
    """f(t, z): ``(B, dim) -> (B, dim)``, time-conditioned layers of width ``hidden`` with ``activation``."""

    def __init__(self, dim: int, hidden: int, layers: int, activation: str = "tanh", layer: str = "concat"):
        super().__init__()
        kind = {"concat": ConcatLinear, "concatsquash": ConcatSquashLinear}[layer]
        widths = [dim] + [hidden] * layers + [dim]
        self.layers = nn.ModuleList(kind(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = torch.tanh if activation == "tanh" else nn.functional.softplus

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


def exact_divergence(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tr J, |J|_F^2)`` per sample, each ``(B,)``, with J = d dz / dz: one backward pass per row of J."""
    trace = torch.zeros(z.shape[0], dtype=z.dtype)
    frobenius = torch.zeros(z.shape[0], dtype=z.dtype)
    for i in range(z.shape[1]):
        (row,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        trace = trace + row[:, i]
        frobenius = frobenius + (row * row).sum(dim=1)
    return trace, frobenius


def hutchinson_divergence(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor,
                          create_graph: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(eps^T J eps, |eps^T J|^2)`` per sample, ``(B,)`` each: unbiased estimates of tr J and |J|_F^2
    when E[eps eps^T] = I (Rademacher or standard normal ``noise`` eps, ``(B, dim)``)."""
    (eps_jacobian,) = torch.autograd.grad(dz, z, grad_outputs=noise, create_graph=create_graph, retain_graph=True)
    return (eps_jacobian * noise).sum(dim=1), (eps_jacobian * eps_jacobian).sum(dim=1)


class CNFDynamics(nn.Module):
    """The right-hand side pnode integrates: ``(z, delta[, kinetic, frobenius]) -> (f, -tr J[, |f|^2, |J|_F^2])``.

    Shapes: z ``(B, dim)``, every other component ``(B, 1)``. Given a 4-tuple, the regularisation
    integrands are computed too (given 2, not). ``noise`` is None for the exact trace, or a
    ``(B, dim)`` tensor of Hutchinson probes; set it before a solve and leave it until that solve's
    backward pass is done.
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
                trace, frobenius = exact_divergence(dz, z, differentiable)
            else:
                trace, frobenius = hutchinson_divergence(dz, z, self.noise, differentiable)
        rates = [dz, -trace.unsqueeze(1)]
        if len(state) > 2:
            rates += [(dz * dz).sum(dim=1, keepdim=True), frobenius.unsqueeze(1)]
        return tuple(rates) if differentiable else tuple(r.detach() for r in rates)


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row, ``(B,)``."""
    return -0.5 * (z ** 2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2.0 * math.pi)


class CNF(nn.Module):
    """K stacked flows: data (t = 0 of block 0) -> base N(0, I) (t = T of block K-1).

    ``options``: pnode's options of every block (``{'step_size': h}``, an adjoint strategy); ``comm``:
    the communicator of every block's solve (``None``: this process alone).
    """

    def __init__(self, dynamics: Sequence[CNFDynamics], method: str, rtol: float, atol: float,
                 time_length: float = 1.0, options: Optional[dict] = None, comm=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            pnode.ODEBlock(d, t=(0.0, time_length), method=method, rtol=rtol, atol=atol, options=options,
                           prefix=f"cnf{i}_", comm=comm)
            for i, d in enumerate(dynamics))

    @property
    def dynamics(self) -> List[CNFDynamics]:
        return [block.func for block in self.blocks]

    def set_noise(self, noise: Optional[torch.Tensor]) -> None:
        """Hutchinson probes ``(B, dim)`` for every block's next solve (None: the exact trace)."""
        for dynamics in self.dynamics:
            dynamics.noise = noise

    def forward(self, x: torch.Tensor, regularize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(log p_model(x) (B,), regularisers (B, 2))``: the kinetic energy and the Jacobian term summed
        over the blocks (zeros unless ``regularize``). Differentiable through TSAdjoint when grad is enabled."""
        zeros = torch.zeros(x.shape[0], 1, dtype=x.dtype)
        state = (x, zeros, zeros, zeros) if regularize else (x, zeros)
        for block in self.blocks:
            state = block(state)
        regularisers = torch.cat(state[2:], dim=1) if regularize else torch.zeros(x.shape[0], 2, dtype=x.dtype)
        return standard_normal_logprob(state[0]) - state[1][:, 0], regularisers

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_model(x), ``(B,)``."""
        return self(x)[0]

    def local(self) -> "CNF":
        """The same flow (shared parameters) solved by this process alone (``comm=None``)."""
        first = self.blocks[0]
        return CNF(self.dynamics, first.method, first.rtol, first.atol, float(first.t[-1]), first.options, comm=None)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Push base samples ``z`` ``(B, dim)`` back to data space; only f is needed, not the trace."""
        for block in reversed(self.blocks):
            t = torch.tensor([float(block.t[-1]), 0.0], dtype=z.dtype)
            z = pnode.odeint(block.func.net, z, t, method=block.method, rtol=block.rtol, atol=block.atol,
                             options={k: v for k, v in block.options.items() if k == "step_size"})[-1]
        return z


def build_model(args: argparse.Namespace, dim: int, comm=None) -> CNF:
    """The CNF of ``args`` on ``dim`` dimensions, float64, weights from the current torch generator."""
    nets = [VelocityField(dim, args.hidden, args.layers, args.activation, args.layer).to(DTYPE)
            for _ in range(args.blocks)]
    options = {} if args.step_size is None else {"step_size": args.step_size}
    return CNF([CNFDynamics(net) for net in nets], args.method, args.rtol, args.atol, args.time_length, options, comm)


def draw_probes(kind: str, shape, dtype=DTYPE) -> torch.Tensor:
    """Hutchinson probes from the global torch generator: Rademacher (+-1) or standard normal."""
    if kind == "rademacher":
        return torch.randint(0, 2, shape).to(dtype) * 2.0 - 1.0
    return torch.randn(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------- one step
def local_rows(n: int) -> slice:
    """This rank's rows of a global batch of ``n`` (:func:`pnode.distributed.shard`)."""
    rows = distributed.shard(n)
    return slice(rows.start, rows.stop)


def local_loss(model: CNF, x: torch.Tensor, probes: Optional[torch.Tensor], kinetic: float = 0.0,
               jacobian: float = 0.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """This rank's loss for the global batch ``x`` ``(B, dim)`` (and probes, ``(B, dim)`` or None).

    The rank solves its rows; its loss is their summed NLL (plus the weighted regularisers) over B,
    times the number of ranks, so that :func:`pnode.distributed.average_gradients` yields the gradient
    of the global mean loss. Returns the loss and the rank's sums (``nll``, ``kinetic``, ``jacobian``,
    ``rows``) for :func:`pnode.distributed.gather_metrics`.
    """
    rows = local_rows(len(x))
    model.set_noise(None if probes is None else probes[rows])
    log_p, regularisers = model(x[rows], regularize=bool(kinetic or jacobian))
    sums = regularisers.sum(dim=0)
    total = -log_p.sum() + kinetic * sums[0] + jacobian * sums[1]
    loss = total * (distributed.size() / len(x))
    sums = sums.detach()
    return loss, {"nll": float(-log_p.sum().detach()), "kinetic": float(sums[0]), "jacobian": float(sums[1]),
                  "rows": float(len(log_p))}


def train_step(model: CNF, optimizer: torch.optim.Optimizer, data: Density, args: argparse.Namespace
               ) -> Dict[str, float]:
    """One iteration on one global batch: every rank draws it, solves its shard, averages gradients.

    Returns the global means (``train_nll``, ``kinetic``, ``jacobian``) and the NFE summed over blocks.
    """
    x = data.batch(args.batch_size)
    probes = draw_probes(args.noise, x.shape) if args.trace == "hutchinson" else None
    for block in model.blocks:
        block.reset_nfe()
    loss, sums = local_loss(model, x, probes, args.kinetic, args.jacobian)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(model.parameters())
    optimizer.step()
    model.set_noise(None)
    sums["nfe_forward"] = sum(b.nfe_forward for b in model.blocks) / distributed.size()
    sums["nfe_backward"] = sum(b.nfe_backward for b in model.blocks) / distributed.size()
    totals = distributed.gather_metrics(sums)
    n = totals.pop("rows")
    return {"train_nll": totals["nll"] / n, "kinetic": totals["kinetic"] / n, "jacobian": totals["jacobian"] / n,
            "nfe_forward": totals["nfe_forward"], "nfe_backward": totals["nfe_backward"]}


@torch.no_grad()
def evaluate_nll(model: CNF, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean negative log-likelihood (nats) of ``x`` ``(N, dim)``, exact trace, in near-equal chunks of at
    most ``batch_size`` points, each sharded over the ranks (collective under MPI)."""
    model.set_noise(None)
    total = 0.0
    for chunk in x.tensor_split(max(1, math.ceil(len(x) / batch_size))):
        total += float(-model.log_prob(chunk[local_rows(len(chunk))]).sum())
    return distributed.gather_metrics({"nll": total})["nll"] / len(x)


# ---------------------------------------------------------------------------------------------- figures
@torch.no_grad()
def save_figure(model: CNF, data: Density, args: argparse.Namespace, path: str) -> None:
    """Data next to samples of the flow (rank 0 alone, with :meth:`CNF.local`); 2-D toys also show the density."""
    from matplotlib.figure import Figure

    model = model.local()
    model.set_noise(None)
    generator = torch.Generator().manual_seed(args.seed + 7)
    if isinstance(data, DigitsDensity):
        fig = Figure(figsize=(9, 4.6))
        samples = model.sample(torch.randn(min(args.plot_samples, 64), 64, generator=generator, dtype=DTYPE))
        images = (data.test_pixels[:len(samples)].reshape(-1, 8, 8) / (data.LEVELS - 1), data.to_pixels(samples))
        titles = ("test images", "samples (base pushed through the flow)")
        for ax, tiles, title in zip(fig.subplots(1, 2), images, titles):
            ax.imshow(tile_images(tiles), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_title(title)
            ax.set_axis_off()
    else:
        fig = Figure(figsize=(10.5 if data.dim == 2 else 7.2, 3.6))
        points = data.test if data.dim > 2 else sample_toy(args.data, args.plot_samples,
                                                           np.random.RandomState(args.seed + 7))
        samples = model.sample(torch.randn(args.plot_samples, data.dim, generator=generator, dtype=DTYPE))
        axes = fig.subplots(1, 3 if data.dim == 2 else 2)
        panels = [(axes[0], points, f"data ({args.data}{', dims 1-2' if data.dim > 2 else ''})"),
                  (axes[-1], samples, "samples (base pushed through the flow)")]
        for ax, xy, title in panels:
            ax.hist2d(xy[:, 0].numpy(), xy[:, 1].numpy(), bins=100, range=[[-PLOT_RANGE, PLOT_RANGE]] * 2,
                      cmap="viridis")
            ax.set_title(title)
        if data.dim == 2:
            axes[1].imshow(density_grid(model, args.grid).numpy(), origin="lower", cmap="viridis",
                           extent=(-PLOT_RANGE, PLOT_RANGE, -PLOT_RANGE, PLOT_RANGE))
            axes[1].set_title("learned density")
        for ax in axes:
            ax.set(xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")


def density_grid(model: CNF, grid: int) -> torch.Tensor:
    """exp(log p_model) on a ``grid x grid`` square over [-PLOT_RANGE, PLOT_RANGE]^2 (exact trace)."""
    axis = torch.linspace(-PLOT_RANGE, PLOT_RANGE, grid, dtype=DTYPE)
    points = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    return model.log_prob(points).exp().reshape(grid, grid)


def tile_images(images: torch.Tensor, columns: int = 8, gap: int = 1) -> np.ndarray:
    """``(N, h, w)`` images in [0, 1] -> one array of ``columns`` per row, ``gap`` blank pixels between."""
    n, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (h + gap) - gap, columns * (w + gap) - gap))
    for i, image in enumerate(images.numpy()):
        r, c = divmod(i, columns)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
    return canvas


# ---------------------------------------------------------------------------------------------- training
def describe_run(logger, args: argparse.Namespace, model: CNF, data: Density, comm) -> None:
    """Log the data, the model, the regularisation and the parallel layout (PETSc's own log follows)."""
    params = sum(p.numel() for p in model.parameters())
    logger.info("data: %s", data.describe())
    logger.info("model: %d CNF block(s) (PETSc prefixes %s), f = %d x %d %s layers with %s, T = %g, %d parameters, "
                "float64", args.blocks, ", ".join(b.prefix for b in model.blocks), args.layers, args.hidden,
                args.layer, args.activation, args.time_length, params)
    steps = f"step {args.step_size:g}" if args.step_size is not None else f"rtol={args.rtol:g} atol={args.atol:g}"
    logger.info("training trace: %s%s; test NLL: exact trace; solver asked for: %s %s; gradients: PETSc TSAdjoint",
                args.trace, f" ({args.noise} probes)" if args.trace == "hutchinson" else "", args.method, steps)
    terms = [f"kinetic energy x {args.kinetic:g}"] if args.kinetic else []
    terms += [f"Jacobian Frobenius norm x {args.jacobian:g} ({'exact' if args.trace == 'exact' else 'Hutchinson'})"
              ] if args.jacobian else []
    logger.info("regularisation: %s", ", ".join(terms) or "none")
    ranks = distributed.size()
    logger.info("data parallel: %d rank(s), global batch %d%s", ranks, args.batch_size,
                f", {args.mpi_mode} ({'one PETSc system, comm=COMM_WORLD' if comm is not None else 'comm=None'})"
                if ranks > 1 else "")


def restore(path: str, model: CNF, optimizer: torch.optim.Optimizer, logger) -> Tuple[int, list, float]:
    """Load the checkpoint at ``path``; returns ``(iteration, history, elapsed)`` (zeros when there is none)."""
    state = load_checkpoint(path)
    if state is None:
        logger.info("--resume: no checkpoint at %s, starting from scratch", path)
        return 0, [], 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s at iteration %d", path, state["iteration"])
    return state["iteration"], state["history"], state["elapsed"]


def log_record(logger, record: Dict[str, float], regularised: bool) -> None:
    regs = f" | kinetic {record['kinetic']:.3g} jacobian {record['jacobian']:.3g}" if regularised else ""
    logger.info("iter %d | train NLL %.4f | test NLL %.4f nats | NFE-F %.1f NFE-B %.1f (all blocks) | %.3f s/iter | "
                "peak mem %.0f MB%s", record["iteration"], record["train_nll"], record["test_nll"],
                record["nfe_forward"], record["nfe_backward"], record["seconds_per_iter"], record["peak_rss_mb"], regs)


def interval_record(itr: int, window: List[Dict[str, float]], seconds: float, elapsed: float,
                    test_nll: float) -> Dict[str, float]:
    """The metrics of one log interval: means over its iterations, then the test NLL and times."""
    means = {key: sum(step[key] for step in window) / len(window) for key in window[0]}
    return {"iteration": itr, **means, "test_nll": test_nll, "seconds_per_iter": seconds / len(window),
            "elapsed": elapsed, "peak_rss_mb": peak_rss_over_ranks()}


def main(argv=None) -> Dict[str, object]:
    args = parse_args(build_parser(), argv)
    logger = setup_run(args, f"cnf_{args.data}")
    distributed.seed_everything(args.seed, per_rank=False)  # every rank draws the same batches and probes
    fill_defaults(args)
    data = load_density(args.data, args.data_dir, args.test_size, args.seed)
    args.hidden = args.hidden or HIDDEN_PER_DIM * data.dim
    comm = distributed.world() if distributed.size() > 1 and args.mpi_mode == "distributed" else None
    model = build_model(args, data.dim, comm)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    describe_run(logger, args, model, data, comm)
    baselines = gaussian_baselines(data)
    for name, value in baselines.items():
        logger.info("baseline: %s fitted to the training data: test NLL %.4f nats", name.replace("_", " "), value)

    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start, history, elapsed = restore(checkpoint_path, model, optimizer, logger) if args.resume else (0, [], 0.0)
    if start == 0:
        history = [{"iteration": 0, "test_nll": evaluate_nll(model, data.test, args.eval_batch_size)}]
        append_jsonl(metrics_path, history[0])
        logger.info("iter 0 | test NLL %.4f nats", history[0]["test_nll"])
    window, tick = [], time.perf_counter()
    for itr in progress(range(start + 1, args.niters + 1), desc="cnf", enabled=not args.no_progress,
                        total=args.niters - start):
        window.append(train_step(model, optimizer, data, args))
        if itr == start + 1:
            log_solvers(logger, model)  # what PETSc ran, read back from it, once per run
        if itr % args.log_every == 0 or itr == args.niters:
            seconds = time.perf_counter() - tick
            elapsed += seconds
            record = interval_record(itr, window, seconds, elapsed,
                                     evaluate_nll(model, data.test, args.eval_batch_size))
            history.append(record)
            append_jsonl(metrics_path, record)
            log_record(logger, record, bool(args.kinetic or args.jacobian))
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "iteration": itr, "rng": rng_state(), "history": history,
                                              "elapsed": elapsed, "args": vars(args)})
            window, tick = [], time.perf_counter()
    return finish(logger, args, model, data, history, baselines, elapsed)


def finish(logger, args: argparse.Namespace, model: CNF, data: Density, history: list, baselines: Dict[str, float],
           elapsed: float) -> Dict[str, object]:
    """The figure (rank 0), the closing log line against the baselines; returns the run's summary."""
    figure = os.path.join(args.out, f"cnf_{args.data}.png")
    if args.plot_samples > 0 and distributed.rank() == 0:
        save_figure(model, data, args, figure)
        logger.info("figure: %s", figure)
    final = history[-1]["test_nll"]
    logger.info("done: test NLL %.4f -> %.4f nats (log-likelihood %.4f) in %.0f s of training", history[0]["test_nll"],
                final, -final, elapsed)
    if "diagonal_gaussian" in baselines:
        logger.info("test NLL %.4f nats: %.2f nats below the diagonal Gaussian (%.4f), %.2f below the full-covariance "
                    "Gaussian (%.4f)", final, baselines["diagonal_gaussian"] - final, baselines["diagonal_gaussian"],
                    baselines["full_gaussian"] - final, baselines["full_gaussian"])
    return {"history": history, "test_nll": final, "baselines": baselines, "figure": figure, "out": args.out}


if __name__ == "__main__":
    try:
        main()
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
