"""The classic ODE-Net MNIST experiment (torchdiffeq's odenet_mnist flags), integrated and differentiated by PETSc.

    python examples/mnist_odenet.py --network odenet --data-dir data --download       # MNIST, 160 epochs
    python examples/mnist_odenet.py --dataset digits --nepochs 30                     # offline, ~1.5 min, ~99 %
    python examples/mnist_odenet.py --network resnet --downsampling-method res --dataset digits --nepochs 30

Network: downsampling to 64 channels (``conv`` or ``res``), then one ODE block (``--network
odenet``, PETSc options prefix ``ode_``) or 6 residual blocks (``--network resnet``), then
GroupNorm, ReLU, average pool and a linear layer. Training: SGD momentum 0.9, lr ``--lr`` x
batch/128, decayed x0.1 at 60, 100 and 140 of 160 epochs (the same fractions of ``--nepochs``).
Torch runs one thread per process unless ``--threads`` says otherwise.
"""

import argparse
import sys
import time

import torch
from classification import (
    DatasetMissing,
    SolverSettings,
    add_training_args,
    build_mnist_style_net,
    fit,
    load_data,
    make_optimizer,
)
from common import add_common_args, parse_args, setup_run

from pnode import distributed

# The classic schedule: decay at epochs 60, 100, 140 of 160, kept proportional for other lengths.
DECAY_FRACTIONS = (60 / 160, 100 / 160, 140 / 160)


def str2bool(text: str) -> bool:
    """torchdiffeq's example takes ``--adjoint True`` / ``--data_aug False``; accept those spellings."""
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=["resnet", "odenet"], default="odenet")
    parser.add_argument("--downsampling-method", choices=["conv", "res"], default="conv")
    parser.add_argument("--method", default="dopri5",
                        help="pnode method of the ODE block (default: dopri5, adaptive)")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the adaptive solver (default: 1e-3)")
    parser.add_argument("--adjoint", type=str2bool, nargs="?", const=True, default=True,
                        help="accepted for compatibility and ignored: pnode always differentiates with PETSc's "
                             "discrete adjoint (TSAdjoint), which retraces the forward steps, so gradients are "
                             "those of the computed solution (as with backprop through the solver steps) and "
                             "only the solver's states are stored, not the network's activations at each step")
    parser.add_argument("--nepochs", type=int, default=160)
    parser.add_argument("--data_aug", type=str2bool, nargs="?", const=True, default=True,
                        help="random crop (pad 4; pad 1 for digits) of the training images (default: True)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate for batch 128 (scaled by batch/128)")
    parser.add_argument("--batch_size", type=int, default=128, help="global batch, sharded over MPI ranks")
    parser.add_argument("--test_batch_size", type=int, default=1000)
    parser.add_argument("--dataset", choices=["mnist", "digits"], default="mnist",
                        help="mnist (from --data-dir) or digits (scikit-learn's bundled 8x8 digits, offline)")
    parser.add_argument("--save", dest="out", default=None, help="same as --out (torchdiffeq's name)")
    add_training_args(parser)
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(build_parser(), argv)
    args.epochs = args.nepochs
    logger = setup_run(args, f"mnist_odenet_{args.dataset}_{args.network}")
    try:
        data = load_data(args.dataset, args.data_dir, args.download)
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.data_aug:
        data.crop_padding = 0
    comm = distributed.world() if distributed.size() > 1 else None
    solver = SolverSettings(args.method, None, args.tol, comm)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_mnist_style_net(args.network, args.downsampling_method, data.in_channels, data.num_classes,
                                  data.image_size, solver)
    logger.info("model: %s with %s downsampling; ODE solver asked for: %s (gradients: PETSc discrete adjoint)",
                args.network, args.downsampling_method, solver.describe() if args.network == "odenet" else "-")
    optimizer = make_optimizer("sgd", model.parameters(), args.lr * args.batch_size / 128)
    milestones = sorted({max(1, round(f * args.nepochs)) for f in DECAY_FRACTIONS})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    fit(args, model, optimizer, scheduler, data, logger, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
