"""ResNet vs ODE-Net vs hybrid image classifiers (the thesis' CIFAR-10 comparison), trained with pnode.

    python examples/cifar_odenet.py --dataset digits --arch odenet          # offline, ~1-2 minutes on 2 cores
    python examples/cifar_odenet.py --dataset cifar10 --arch hybrid --download
    mpirun -n 2 python examples/cifar_odenet.py --dataset digits --threads 1  # batch sharded over 2 ranks
    python examples/cifar_odenet.py --arch odenet -ode64_ts_type rk -ode64_ts_rk_type 4   # tune one block

ODE blocks are integrated by PETSc TS and differentiated by its discrete adjoint (TSAdjoint).
Each ODE block has its own PETSc options prefix (``ode32_``, ``ode64_``; ``ode_`` for
``--model odenet-mnist-style``); unprefixed options (``-ts_type cn``) reach every block.
Torch runs one thread per process unless ``--threads`` says otherwise: the networks are small, and
on a shared machine more threads than free cores slow every step down many times over.
"""

import argparse
import sys
import time

import torch
from classification import (
    ARCHITECTURES,
    DatasetMissing,
    SolverSettings,
    add_training_args,
    build_mnist_style_net,
    build_thesis_net,
    fit,
    load_data,
    make_optimizer,
)
from common import add_common_args, parse_args, setup_run

from pnode import distributed

# Per-dataset defaults of the options left unset (None) on the command line. CIFAR-10 follows the
# thesis (Adam, batch 200, 50 epochs, constant lr); the digits defaults were tuned on a 2-core CPU:
# 97.5-98.6 % test accuracy (seeds 0-2) in about a minute.
DATASET_DEFAULTS = {
    "digits": {"epochs": 15, "batch_size": 64, "lr": 3e-3, "milestones": [8, 12]},
    "cifar10": {"epochs": 50, "batch_size": 200, "lr": 1e-3, "milestones": []},
    "mnist": {"epochs": 10, "batch_size": 128, "lr": 1e-3, "milestones": [6, 8]},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=["thesis", "odenet-mnist-style"], default="thesis",
                       help="'thesis': the ResNet/ODE-Net/hybrid network picked by --arch; 'odenet-mnist-style': "
                            "the classic ODE-Net (conv downsampling, one ODE block, GroupNorm head)")
    model.add_argument("--arch", choices=sorted(ARCHITECTURES), default="odenet",
                       help="resnet: residual stages at 32 and 64 channels; odenet: an ODE block per stage; "
                            "hybrid ('ResidualODE'): residual blocks at 32, ODE block at 64 (default: odenet)")
    model.add_argument("--blocks", type=int, choices=[1, 2, 3], default=1,
                       help="residual blocks per residual stage (default: 1)")
    model.add_argument("--norm", choices=["group", "batch"], default="group",
                       help="group (default): GroupNorm, per sample, so N MPI ranks train exactly like one "
                            "process; batch: BatchNorm as in the thesis (statistics per rank under MPI, and "
                            "updated at every ODE function evaluation)")
    solver = parser.add_argument_group("ODE solver (every ODE block integrates over [0, 1])")
    solver.add_argument("--method", default="euler",
                        help="pnode method: euler (default, the thesis setting), midpoint, rk4, bosh3, dopri5, "
                             "adaptive_heun, cn, beuler, rk:<petsc tableau>")
    solver.add_argument("--step-size", type=float, default=None,
                        help="fixed step size (thesis: 0.5, 0.25, 0.1). Default: 0.25 for fixed-step methods "
                             "(4 Euler steps per block, the middle of the thesis' settings: 0.1 costs 2.5x "
                             "more per batch, 0.5 is a coarse 2-step flow); adaptive methods (dopri5, bosh3, "
                             "adaptive_heun) adapt to --tol unless a step size is given")
    solver.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of adaptive methods (default: 1e-3)")
    train = parser.add_argument_group("training (defaults depend on --dataset, see DATASET_DEFAULTS)")
    train.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), default="digits",
                       help="digits (default): scikit-learn's bundled 8x8 handwritten digits, offline; "
                            "cifar10 / mnist: read from --data-dir")
    train.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                       help="adam (default, as in the thesis) or sgd (momentum 0.9)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (digits 3e-3, cifar10 1e-3, mnist 1e-3)")
    train.add_argument("--milestones", type=int, nargs="*", default=None,
                       help="epochs after which the lr is multiplied by --lr-decay "
                            "(digits: 8 12; cifar10: none; mnist: 6 8)")
    train.add_argument("--lr-decay", type=float, default=0.1)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--epochs", type=int, default=None, help="digits 15, cifar10 50, mnist 10")
    train.add_argument("--batch-size", type=int, default=None,
                       help="global batch size, sharded over MPI ranks (digits 64, cifar10 200, mnist 128)")
    train.add_argument("--test-batch-size", type=int, default=500)
    train.add_argument("--device", default="cpu",
                       help="where the model and its ODE states live: cpu (default) or cuda (with a PETSc built "
                            "with CUDA, PETSc's vectors live on the GPU too; see docs/gpu.md)")
    add_training_args(train)
    add_common_args(parser)
    parser.set_defaults(threads=1)
    return parser


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(build_parser(), argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logger = setup_run(args, f"cifar_odenet_{args.dataset}_{args.arch}")
    try:
        data = load_data(args.dataset, args.data_dir, args.download)
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    comm = distributed.world() if distributed.size() > 1 else None
    solver = SolverSettings(args.method, args.step_size, args.tol, comm)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.model == "thesis":
        model = build_thesis_net(args.arch, data.in_channels, data.num_classes, data.image_size, args.blocks,
                                 args.norm, solver)
        logger.info("model: thesis %s, %d block(s) per residual stage, %s norm, ODE solver asked for: %s", args.arch,
                    args.blocks, args.norm, solver.describe())
    else:
        model = build_mnist_style_net("odenet", "conv", data.in_channels, data.num_classes, data.image_size, solver)
        logger.info("model: classic ODE-Net (MNIST style), ODE solver asked for: %s", solver.describe())
    model.to(args.device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=args.lr_decay)
    fit(args, model, optimizer, scheduler, data, logger, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
