"""Image classification with ODE blocks: data, models and the training loop shared by the examples.

``cifar_odenet.py`` (the thesis' ResNet / ODE-Net / hybrid comparison) and ``mnist_odenet.py`` (the
classic ODE-Net) are thin scripts over this module:

* data: CIFAR-10, MNIST and scikit-learn's bundled 8x8 digits, held in memory as uint8 tensors and
  batched, augmented (random crop, flip) and normalised as tensors. Each epoch's order and
  augmentation come from a generator seeded by ``(seed, epoch)``, so an epoch is the same whether
  the run was resumed or not, and the same on every MPI rank.
* models: :func:`build_thesis_net` and :func:`build_mnist_style_net`.
* training: :func:`fit` runs the epochs with MPI batch sharding, atomic per-epoch checkpoints,
  ``--resume``, per-epoch log lines, ``metrics.jsonl``, ``curves.png`` and ``summary.json``.

Under ``mpirun -n N`` every rank builds the same global batch and keeps its shard of it
(:func:`pnode.distributed.shard`); ODE blocks integrate one distributed ODE over all ranks
(``comm=PETSc.COMM_WORLD``). Each rank's loss is its shard's summed loss divided by the global batch
size, so the sum of the ranks' gradients is the gradient of the global mean loss, for every layer
alike (the ODE blocks' parameter gradients are local contributions too): N ranks take the step one
process would take on the whole batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    Timer,
    append_jsonl,
    load_checkpoint,
    peak_rss_mb,
    progress,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from torch import nn

import pnode
from pnode import distributed

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# ---------------------------------------------------------------------------------------------- data
class DatasetMissing(FileNotFoundError):
    """The dataset is not in ``--data-dir``; the message says how to get it."""


@dataclass
class ImageData:
    """A labelled image dataset held in memory.

    Attributes:
        name: ``'cifar10'``, ``'mnist'`` or ``'digits'``.
        train_images, test_images: uint8 tensors ``(N, C, H, W)``; pixel value = uint8 / ``scale``.
        train_labels, test_labels: int64 tensors ``(N,)``.
        scale: divisor that maps the stored integers to [0, 1] (255, or 16 for the digits).
        mean, std: normalisation after scaling, ``(x - mean) / std``.
        crop_padding: zero padding of the random-crop augmentation (0: no crop).
        flip: whether training images are flipped horizontally with probability 1/2.
        num_classes: number of labels.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    scale: float
    mean: float = 0.5
    std: float = 0.5
    crop_padding: int = 0
    flip: bool = False
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.train_images.shape[1:])
        return (f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images of "
                f"{shape}, {self.num_classes} classes")


def load_data(name: str, data_dir: str = "data", download: bool = False) -> ImageData:
    """Load ``name`` (``cifar10``, ``mnist`` or ``digits``); raise :class:`DatasetMissing` if absent."""
    loaders = {"cifar10": load_cifar10, "mnist": load_mnist, "digits": lambda data_dir, download: load_digits()}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name](data_dir, download)


def load_digits(test_size: int = 360) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, offline), fixed stratified split.

    The split does not depend on ``--seed`` (random_state 0), so every run tests on the same images.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = digits.images.astype(np.uint8)[:, None]  # values 0..16
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=test_size,
                                                        stratify=digits.target, random_state=0)
    return ImageData("digits", torch.from_numpy(train_x), torch.from_numpy(train_y).long(),
                     torch.from_numpy(test_x), torch.from_numpy(test_y).long(), scale=16.0, crop_padding=1)


def load_cifar10(data_dir: str, download: bool = False) -> ImageData:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the python-pickle release).

    The batch files are read directly (each a pickled dict with ``b'data'``, uint8 ``(N, 3072)``
    rows of 1024 red, 1024 green, 1024 blue values, and ``b'labels'``) into one uint8 tensor, so
    batches are cut and augmented as tensors instead of one PIL image at a time. torchvision
    downloads and verifies the archive with ``download=True``.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [f for f in train_files + ["test_batch"] if not os.path.exists(os.path.join(folder, f))]
    if missing and download:
        import torchvision

        torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        missing = [f for f in train_files + ["test_batch"] if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise DatasetMissing(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Run once with --download on a "
            f"machine with internet (torchvision fetches it into --data-dir {data_dir}), or download "
            f"{CIFAR10_URL} yourself and extract it into {data_dir}. Offline, --dataset digits trains on "
            "scikit-learn's bundled handwritten digits.")
    train_x, train_y = _read_cifar_batches([os.path.join(folder, f) for f in train_files])
    test_x, test_y = _read_cifar_batches([os.path.join(folder, "test_batch")])
    return ImageData("cifar10", train_x, train_y, test_x, test_y, scale=255.0, crop_padding=4, flip=True)


def _read_cifar_batches(paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_mnist(data_dir: str, download: bool = False) -> ImageData:
    """MNIST through torchvision (``<data_dir>/MNIST/raw``), as uint8 tensors."""
    import torchvision

    try:
        train = torchvision.datasets.MNIST(data_dir, train=True, download=download)
        test = torchvision.datasets.MNIST(data_dir, train=False, download=download)
    except RuntimeError as exc:
        raise DatasetMissing(
            f"MNIST not found in {os.path.join(data_dir, 'MNIST', 'raw')} ({exc}). Run once with --download "
            "on a machine with internet, or copy the four *-ubyte files there. Offline, --dataset digits "
            "trains on scikit-learn's bundled handwritten digits.") from None
    return ImageData("mnist", train.data[:, None].contiguous(), train.targets.long(),
                     test.data[:, None].contiguous(), test.targets.long(), scale=255.0, crop_padding=4)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s order and augmentation: a function of (seed, epoch) only."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def train_batches(data: ImageData, batch_size: int, generator: torch.Generator,
                  limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented, normalised global training batches ``(x float32 (B, C, H, W), y (B,))``.

    A last batch with fewer images than MPI ranks is dropped (a rank would get none).
    """
    order = torch.randperm(len(data.train_labels), generator=generator)
    chunks = [c for c in order.split(batch_size) if len(c) >= distributed.size()]
    for index in chunks[:limit]:
        images = data.train_images[index].float() / data.scale
        images = augment(images, data.crop_padding, data.flip, generator)
        yield (images - data.mean) / data.std, data.train_labels[index]


def eval_batches(data: ImageData, batch_size: int,
                 limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order, normalised, in near-equal batches of at most ``batch_size``."""
    n = len(data.test_labels)
    count = max(1, math.ceil(n / batch_size))
    for index in torch.arange(n).tensor_split(count)[:limit]:
        yield (data.test_images[index].float() / data.scale - data.mean) / data.std, data.test_labels[index]


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded images (per image offsets) and random horizontal flips."""
    n, _, height, width = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4)
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(height))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width))[:, None, None, :]
        images = padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None],
                        rows, cols]
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images


# ---------------------------------------------------------------------------------------------- models
def norm_layer(kind: str, channels: int) -> nn.Module:
    """``'group'``: GroupNorm with min(32, channels) groups (per sample, so MPI sharding is exact);
    ``'batch'``: BatchNorm2d (the thesis' choice; statistics are then per rank under MPI)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


@dataclass(frozen=True)
class SolverSettings:
    """How every ODE block integrates over [0, 1].

    Attributes:
        method: a pnode method name (``euler``, ``rk4``, ``dopri5``, ...).
        step_size: fixed step size; ``None`` lets an adaptive method adapt to ``tol`` (a fixed-step
            method then takes :data:`DEFAULT_STEP`).
        tol: rtol = atol of adaptive methods.
        comm: PETSc communicator of the distributed ODE (``None``: this process alone).
    """

    method: str = "euler"
    step_size: float | None = None
    tol: float = 1e-3
    comm: object = None

    def block(self, func: nn.Module, prefix: str) -> pnode.ODEBlock:
        adaptive = self.method in pnode.available_methods(adaptive=True)
        step = self.step_size if self.step_size is not None or adaptive else DEFAULT_STEP
        options = {} if step is None else {"step_size": step}
        return pnode.ODEBlock(func, t=(0.0, 1.0), method=self.method, options=options, prefix=prefix,
                              rtol=self.tol, atol=self.tol, comm=self.comm)

    def describe(self) -> str:
        """The arguments' choice; PETSc options on the command line can override it (see log_solvers)."""
        adaptive = self.method in pnode.available_methods(adaptive=True)
        if self.step_size is None and adaptive:
            return f"{self.method}, adaptive, rtol = atol = {self.tol:g} (before PETSc options)"
        return f"{self.method}, step {self.step_size or DEFAULT_STEP:g} (before PETSc options)"


DEFAULT_STEP = 0.25


class ConcatConv2d(nn.Module):
    """A 3x3 convolution of ``[t, x]``: the time enters as one extra constant input channel."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, 3, padding=1, bias=bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        time_channel = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([time_channel, x], dim=1))


class ThesisODEFunc(nn.Module):
    """``f(t, x) = relu(norm(conv([t, relu(norm(conv([t, x])))])))`` (the thesis' ODE-Net stage)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.conv1 = ConcatConv2d(channels, channels, bias=False)
        self.norm1 = norm_layer(norm, channels)
        self.conv2 = ConcatConv2d(channels, channels, bias=False)
        self.norm2 = norm_layer(norm, channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(t, x)))
        return F.relu(self.norm2(self.conv2(t, x)))


class ThesisResidualBlock(nn.Module):
    """``relu(x + relu(norm(conv(relu(norm(conv(x)))))))`` (the thesis' ResNet block)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(conv_norm_relu(channels, channels, norm), conv_norm_relu(channels, channels, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """conv3x3 -> norm -> ReLU. The conv has no bias: the norm right after it would cancel it (and
    Adam would still move such a bias with the round-off of its zero gradient)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), norm_layer(norm, out_channels),
                         nn.ReLU())


ARCHITECTURES = {
    # arch -> (stage at 32 channels, stage at 64 channels)
    "resnet": ("residual", "residual"),
    "odenet": ("ode", "ode"),
    "hybrid": ("residual", "ode"),
}


def build_thesis_net(arch: str, in_channels: int, num_classes: int, image_size: int, blocks: int = 1,
                     norm: str = "group", solver: SolverSettings = SolverSettings()) -> nn.Module:
    """The thesis' CIFAR-10 network; ``arch`` picks the stages (see :data:`ARCHITECTURES`).

    stem conv 3x3 -> norm -> ReLU -> pool; conv -> norm -> ReLU -> pool; stage at 32 channels;
    conv -> norm -> ReLU -> pool; stage at 64 channels; AdaptiveAvgPool2d(2); flatten; linear 256 -> classes.

    A residual stage is ``blocks`` residual blocks; an ODE stage is one :class:`pnode.ODEBlock`
    (prefix ``ode32_`` or ``ode64_``, so ``-ode64_ts_type rk -ode64_ts_rk_type 4`` tunes one block).
    Small inputs: a 2x2 average pool is skipped where the map is already 4x4 or smaller, and the
    final pool is adaptive, so 32x32 CIFAR images go 32 -> 16 -> 8 -> 4 -> 2 exactly as in the
    thesis, while 8x8 digits go 8 -> 4 and keep 4x4 maps in both stages; both end in 64 x 2 x 2 features.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    kinds = ARCHITECTURES[arch]
    size = image_size
    layers: list[nn.Module] = []
    for stage, (c_in, c_out) in enumerate(((in_channels, 16), (16, 32), (32, 64))):
        layers.append(conv_norm_relu(c_in, c_out, norm))
        if size > 4:
            layers.append(nn.AvgPool2d(2))
            size //= 2
        if stage >= 1:
            if kinds[stage - 1] == "ode":
                layers.append(solver.block(ThesisODEFunc(c_out, norm), prefix=f"ode{c_out}_"))
            else:
                layers.extend(ThesisResidualBlock(c_out, norm) for _ in range(blocks))
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 2 * 2, num_classes)]
    return nn.Sequential(*layers)


class MnistODEFunc(nn.Module):
    """The classic ODE-Net function: norm -> ReLU -> concat-conv -> norm -> ReLU -> concat-conv -> norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = norm_layer("group", channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = norm_layer("group", channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = norm_layer("group", channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(t, F.relu(self.norm1(x)))
        x = self.conv2(t, F.relu(self.norm2(x)))
        return self.norm3(x)


class PreActResBlock(nn.Module):
    """Pre-activation residual block of the classic MNIST ResNet (GroupNorm, ReLU, conv3x3, twice)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.norm1 = norm_layer("group", in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm_layer("group", channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.norm2(self.conv1(out))))
        return out + shortcut


def build_mnist_style_net(network: str = "odenet", downsampling: str = "conv", in_channels: int = 1,
                          num_classes: int = 10, image_size: int = 28,
                          solver: SolverSettings = SolverSettings("dopri5")) -> nn.Module:
    """The classic ODE-Net (or its 6-block ResNet) of the MNIST experiment.

    Downsampling to 64 channels at 1/4 resolution (``'conv'``: conv3x3, GroupNorm, ReLU, two 4x4
    stride-2 convs with GroupNorm/ReLU between; ``'res'``: conv3x3 and two stride-2 residual blocks),
    then one ODE block (prefix ``ode_``) or 6 residual blocks, then GroupNorm, ReLU, adaptive
    average pool, linear 64 -> classes. The first conv is unpadded as in the classic model
    (28 -> 26 -> 13 -> 6); for inputs under 16 pixels it pads by 1, so 8x8 digits reach 2x2 maps.
    """
    pad = 1 if image_size < 16 else 0
    stem = nn.Conv2d(in_channels, 64, 3, padding=pad)
    if downsampling == "conv":
        down = [stem, norm_layer("group", 64), nn.ReLU(), nn.Conv2d(64, 64, 4, 2, 1), norm_layer("group", 64),
                nn.ReLU(), nn.Conv2d(64, 64, 4, 2, 1)]
    elif downsampling == "res":
        down = [stem, PreActResBlock(64, 64, stride=2), PreActResBlock(64, 64, stride=2)]
    else:
        raise ValueError(f"downsampling must be 'conv' or 'res', got {downsampling!r}")
    if network == "odenet":
        features = [solver.block(MnistODEFunc(64), prefix="ode_")]
    elif network == "resnet":
        features = [PreActResBlock(64, 64) for _ in range(6)]
    else:
        raise ValueError(f"network must be 'odenet' or 'resnet', got {network!r}")
    head = [norm_layer("group", 64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*down, *features, *head)


def ode_blocks(model: nn.Module) -> list[pnode.ODEBlock]:
    return [m for m in model.modules() if isinstance(m, pnode.ODEBlock)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- training
def peak_rss_over_ranks() -> float:
    """The largest peak resident memory (MB) of any rank."""
    return distributed.gather_metrics({"peak_rss_mb": peak_rss_mb()}, op="max")["peak_rss_mb"]


def local_shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    part = distributed.shard(len(y))
    return x[part.start:part.stop], y[part.start:part.stop]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches, show_progress: bool = True,
                total: int | None = None) -> dict[str, float]:
    """One pass over ``batches`` (global batches; each rank trains on its shard).

    Returns the global mean loss and accuracy, and the ODE blocks' NFE per batch (mean over blocks).
    """
    model.train()
    blocks = ode_blocks(model)
    ranks = distributed.size()
    device = next(model.parameters()).device
    loss_sum = correct = seen = nfe_f = nfe_b = 0.0
    n_batches = 0
    for x, y in progress(batches, "train", show_progress, total):
        global_size = len(y)
        x, y = (part.to(device) for part in local_shard(x, y))
        for block in blocks:
            block.reset_nfe()
        logits = model(x)
        summed = F.cross_entropy(logits, y, reduction="sum")
        # Scaled so that averaging gradients over the ranks yields d(global mean loss)/d(params).
        loss = summed * (ranks / global_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(model.parameters())
        optimizer.step()
        loss_sum += float(summed.detach())
        correct += float((logits.argmax(1) == y).sum())
        seen += len(y)
        if blocks:
            nfe_f += sum(b.nfe_forward for b in blocks) / len(blocks)
            nfe_b += sum(b.nfe_backward for b in blocks) / len(blocks)
        n_batches += 1
    totals = distributed.gather_metrics({"loss_sum": loss_sum, "correct": correct, "seen": seen})
    loss_sum, correct, seen = totals["loss_sum"], totals["correct"], totals["seen"]
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "nfe_forward": nfe_f / max(n_batches, 1), "nfe_backward": nfe_b / max(n_batches, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    """Accuracy over ``batches`` (global batches; each rank evaluates its shard)."""
    model.eval()
    device = next(model.parameters()).device
    correct = seen = 0.0
    for x, y in batches:
        x, y = (part.to(device) for part in local_shard(x, y))
        correct += float((model(x).argmax(1) == y).sum())
        seen += len(y)
    totals = distributed.gather_metrics({"correct": correct, "seen": seen})
    return totals["correct"] / max(totals["seen"], 1)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """``--limit-batches`` (smoke runs) and ``--data-dir``/``--download``, shared by both scripts."""
    parser.add_argument("--data-dir", default="data", help="where CIFAR-10 / MNIST live (default: data)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download CIFAR-10 / MNIST into --data-dir (needs internet)")
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="train and test on at most this many batches per epoch (smoke tests)")


def fit(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
        data: ImageData, logger: logging.Logger, started: float | None = None) -> dict[str, float]:
    """Train for ``args.epochs`` epochs with per-epoch checkpoints; returns the run summary.

    ``args`` needs: out, resume, seed, epochs, batch_size, test_batch_size, limit_batches, no_progress.
    ``started``: ``time.perf_counter()`` at the start of the run, for the total wall time.
    Writes ``<out>/checkpoint.pt`` (atomic, every epoch), ``<out>/metrics.jsonl`` (one record per
    epoch), ``<out>/curves.png`` and ``<out>/summary.json``, all on rank 0.
    """
    started = time.perf_counter() if started is None else started
    rss_start = peak_rss_over_ranks()
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    history = restore(checkpoint_path, model, optimizer, scheduler, logger) if args.resume else []
    _rewrite_metrics(os.path.join(args.out, "metrics.jsonl"), history)
    params = count_parameters(model)
    logger.info("%s; model: %d parameters; ODE blocks: %s", data.describe(), params,
                ", ".join(b.prefix or "(no prefix)" for b in ode_blocks(model)) or "none")
    for epoch in range(len(history) + 1, args.epochs + 1):
        history.append(run_epoch(args, epoch, model, optimizer, scheduler, data))
        if epoch == len(history):  # the first epoch of this run: say what PETSc ran, read back from it
            log_solvers(logger, model)
        save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": rng_state(),
                                          "history": history, "args": vars(args)})
        append_jsonl(os.path.join(args.out, "metrics.jsonl"), history[-1])
        log_epoch(logger, history[-1], args.epochs, bool(ode_blocks(model)))
        if distributed.rank() == 0:
            plot_curves(history, os.path.join(args.out, "curves.png"))
    summary = summarize(history, params, rss_start, time.perf_counter() - started)
    if distributed.rank() == 0:
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    logger.info("done: best test accuracy %.4f (epoch %d), final %.4f, %d epochs, training %.1f s, "
                "total wall time %.1f s; curves in %s", summary["best_test_acc"], summary["best_epoch"],
                summary["final_test_acc"], summary["epochs"], summary["train_time"], summary["wall_time"],
                os.path.join(args.out, "curves.png"))
    return summary


def restore(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            logger: logging.Logger) -> list[dict[str, float]]:
    """Load the checkpoint at ``path`` into the training state; returns its metrics history."""
    state = load_checkpoint(path)
    if state is None:
        logger.info("--resume: no checkpoint at %s, starting from scratch", path)
        return []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s after epoch %d", path, state["epoch"])
    return state["history"]


def run_epoch(args: argparse.Namespace, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
              data: ImageData) -> dict[str, float]:
    """Train one epoch (order and augmentation from ``(seed, epoch)``), step the lr, test; returns the record."""
    lr = optimizer.param_groups[0]["lr"]
    batches = train_batches(data, args.batch_size, epoch_generator(args.seed, epoch), args.limit_batches)
    total = min(math.ceil(len(data.train_labels) / args.batch_size), args.limit_batches or math.inf)
    with Timer() as train_timer:
        stats = train_epoch(model, optimizer, batches, not args.no_progress, total)
    scheduler.step()
    with Timer() as test_timer:
        test_acc = evaluate(model, eval_batches(data, args.test_batch_size, args.limit_batches))
    return {"epoch": epoch, **stats, "test_acc": test_acc, "lr": lr, "train_time": train_timer.seconds,
            "test_time": test_timer.seconds, "peak_rss_mb": peak_rss_over_ranks()}


def log_solvers(logger: logging.Logger, model: nn.Module) -> None:
    """One line per ODE block: the configuration PETSc ran in its latest call and what its adjoint held."""
    for block in ode_blocks(model):
        logger.info("ODE block %s: %s", block.prefix or "(no prefix)", block.stats.summary())


def log_epoch(logger: logging.Logger, record: dict[str, float], epochs: int, has_ode: bool) -> None:
    nfe = f"NFE-F {record['nfe_forward']:.1f} NFE-B {record['nfe_backward']:.1f}" if has_ode else "no ODE"
    logger.info("epoch %3d/%d | train loss %.4f acc %.4f | test acc %.4f | time %.1f s (test %.1f s) | "
                "peak mem %.0f MB | %s | lr %.3g", record["epoch"], epochs, record["train_loss"], record["train_acc"],
                record["test_acc"], record["train_time"] + record["test_time"], record["test_time"],
                record["peak_rss_mb"], nfe, record["lr"])


def summarize(history: list[dict[str, float]], params: int, rss_start: float, wall_time: float) -> dict[str, float]:
    best = max(history, key=lambda r: r["test_acc"]) if history else {"test_acc": float("nan"), "epoch": 0}
    return {"best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
            "final_test_acc": history[-1]["test_acc"] if history else float("nan"), "epochs": len(history),
            "train_time": sum(r["train_time"] for r in history), "test_time": sum(r["test_time"] for r in history),
            "wall_time": wall_time, "params": params,
            "peak_rss_mb": max((r["peak_rss_mb"] for r in history), default=rss_start), "start_rss_mb": rss_start,
            "nfe_forward": history[-1]["nfe_forward"] if history else 0.0,
            "nfe_backward": history[-1]["nfe_backward"] if history else 0.0}


def _rewrite_metrics(path: str, history: list[dict[str, float]]) -> None:
    """Make metrics.jsonl match the checkpoint (drops records of an epoch that was not checkpointed)."""
    if distributed.rank() != 0:
        return
    with open(path, "w") as fh:
        fh.writelines(json.dumps(record) + "\n" for record in history)


def plot_curves(history: list[dict[str, float]], path: str) -> None:
    """Train and test accuracy (and train loss) per epoch, as a PNG."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.5))
    acc_ax, loss_ax = fig.subplots(1, 2)
    acc_ax.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    acc_ax.plot(epochs, [r["test_acc"] for r in history], "s-", label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    acc_ax.legend()
    acc_ax.grid(alpha=0.3)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="train loss", yscale="log")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
