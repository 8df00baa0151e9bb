"""The classification examples: models learn, data loads from the real on-disk formats, runs resume
exactly, MPI ranks reproduce the single-process update, and the scripts' command lines work.

Script runs are subprocesses with one torch thread and a few batches (``--limit-batches``).
"""

import importlib
import itertools
import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)
cls = importlib.import_module("classification")

CIFAR = os.path.join(EXAMPLES, "cifar_odenet.py")
MNIST = os.path.join(EXAMPLES, "mnist_odenet.py")
COMPARE = os.path.join(ROOT, "scripts", "compare_architectures.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: two threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _work_in_tmp(tmp_path_factory):
    """Run in a temporary directory: what solvers leave in the working directory stays out of the
    checkout. One directory for the module, since pooled solvers may keep paths relative to it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


def run_script(*args, timeout=120, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def digits():
    return cls.load_digits()


# ---------------------------------------------------------------------------------------------- models
def build(kind, data):
    solver = cls.SolverSettings("euler", 0.25)
    if kind == "mnist-style":
        return cls.build_mnist_style_net("odenet", "conv", 1, 10, data.image_size, cls.SolverSettings("dopri5"))
    return cls.build_thesis_net(kind, 1, 10, data.image_size, blocks=2, solver=solver)


@pytest.mark.parametrize("kind", ["resnet", "odenet", "hybrid", "mnist-style"])
def test_loss_decreases_on_a_fixed_batch(kind, digits):
    torch.manual_seed(0)
    model = build(kind, digits)
    x, y = next(cls.eval_batches(digits, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # Small Adam steps on one batch: the loss falls at every step, and by well over a quarter
    # (the ODE-Net of the MNIST experiment is the slowest, about 2.3 -> 1.6).
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_ode_blocks_count_euler_steps(digits):
    model = build("odenet", digits)
    blocks = cls.ode_blocks(model)
    assert [b.prefix for b in blocks] == ["ode32_", "ode64_"]
    x, y = next(cls.eval_batches(digits, 16))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    # step 0.25 over [0, 1]: 4 Euler steps, one evaluation each forward, one VJP each backward.
    assert [(b.nfe_forward, b.nfe_backward) for b in blocks] == [(4, 4), (4, 4)]
    grads = [p.grad for b in blocks for p in b.parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_small_and_cifar_inputs_end_in_256_features():
    for size, channels in ((8, 1), (32, 3)):
        model = cls.build_thesis_net("resnet", channels, 10, size)
        assert model[-1].in_features == 256
        assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    pools = [m for m in cls.build_thesis_net("resnet", 3, 10, 32) if isinstance(m, torch.nn.AvgPool2d)]
    assert len(pools) == 3  # 32 -> 16 -> 8 -> 4, then the adaptive pool to 2x2: the thesis network


def test_adaptive_method_without_step_adapts(digits):
    block = cls.SolverSettings("dopri5", None, 1e-3).block(cls.ThesisODEFunc(8, "group"), "t_")
    assert block.options == {} and block.rtol == 1e-3
    fixed = cls.SolverSettings("euler").block(cls.ThesisODEFunc(8, "group"), "t_")
    assert fixed.options == {"step_size": cls.DEFAULT_STEP}


# ---------------------------------------------------------------------------------------------- data
def test_epoch_batches_depend_only_on_seed_and_epoch(digits):
    def first_batch(seed, epoch):
        return next(cls.train_batches(digits, 16, cls.epoch_generator(seed, epoch)))

    assert torch.equal(first_batch(0, 3)[0], first_batch(0, 3)[0])
    assert not torch.equal(first_batch(0, 3)[1], first_batch(0, 4)[1])
    assert not torch.equal(first_batch(1, 3)[1], first_batch(0, 3)[1])


def test_random_crop_is_a_shifted_window():
    ones = torch.ones(64, 1, 8, 8)
    out = cls.augment(ones, 2, False, torch.Generator().manual_seed(0))
    assert out.shape == ones.shape
    for image in out[:, 0]:
        rows, cols = image.sum(1) > 0, image.sum(0) > 0
        # the ones form one rectangle of at least (8 - 2) x (8 - 2) pixels, zeros elsewhere
        assert int(rows.sum()) >= 6 and int(cols.sum()) >= 6
        assert torch.equal(image, (rows[:, None] & cols[None, :]).float())
    assert len({tuple(im.nonzero()[0].tolist()) for im in out[:, 0]}) > 1  # offsets differ


def test_test_batches_cover_the_test_set_once(digits):
    labels = torch.cat([y for _, y in cls.eval_batches(digits, 100)])
    assert torch.equal(labels, digits.test_labels)
    assert len(digits.train_labels) == 1437 and len(labels) == 360
    assert torch.equal(torch.bincount(labels), torch.bincount(digits.test_labels))


def write_fake_cifar(root, per_batch=10, n_test=10):
    """A tiny CIFAR-10 in the release's on-disk format: cifar-10-batches-py with pickled dicts."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(batch, fh)
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072,
                     b"num_cases_per_batch": per_batch}, fh)
    with open(os.path.join(folder, "data_batch_1"), "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def test_cifar10_reads_the_release_format(tmp_path):
    first = write_fake_cifar(str(tmp_path))
    data = cls.load_cifar10(str(tmp_path))
    assert data.train_images.shape == (50, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    assert data.train_labels[:10].tolist() == first[b"labels"]
    row = first[b"data"][0]
    # each row holds 1024 red, then 1024 green, then 1024 blue values, row-major over 32 x 32
    assert int(data.train_images[0, 0, 0, 0]) == row[0]
    assert int(data.train_images[0, 1, 0, 0]) == row[1024]
    assert int(data.train_images[0, 2, 1, 3]) == row[2048 + 32 + 3]
    assert data.flip and data.crop_padding == 4


def test_cifar10_script_trains_on_disk_data(tmp_path):
    write_fake_cifar(str(tmp_path / "data"))
    out = tmp_path / "run"
    proc = run_script(CIFAR, "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--arch", "hybrid",
                      "--step-size", "0.5", "--epochs", "1", "--batch-size", "10", "--limit-batches", "3",
                      "--out", out, "--no-progress")
    assert "cifar10: 50 train / 10 test images of 3x32x32" in proc.stdout
    assert "freed memory: keep (pnode.allocator)" in proc.stdout  # the examples' default policy, logged
    (record,) = read_metrics(out)
    assert np.isfinite(record["train_loss"]) and record["nfe_forward"] == 2


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(cls.DatasetMissing, match="--download") as info:
        cls.load_cifar10(str(tmp_path))
    assert cls.CIFAR10_URL in str(info.value) and "--dataset digits" in str(info.value)
    proc = run_script(CIFAR, "--dataset", "cifar10", "--data-dir", tmp_path, "--out", tmp_path / "run",
                      check=False)
    assert proc.returncode == 1
    assert "error: CIFAR-10 not found" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script, flags", [(CIFAR, ["--arch", "--step-size", "--resume", "--limit-batches"]),
                                           (MNIST, ["--downsampling-method", "--adjoint", "--data_aug", "--nepochs"]),
                                           (COMPARE, ["--quick", "--markdown", "--lrs"])])
def test_help(script, flags):
    proc = run_script(script, "--help")
    for flag in flags:
        assert flag in proc.stdout


def test_cifar_odenet_smoke_run(tmp_path):
    out = tmp_path / "run"
    proc = run_script(CIFAR, "--dataset", "digits", "--arch", "odenet", "--epochs", "2", "--limit-batches", "3",
                      "--batch-size", "32", "--out", out, "--no-progress")
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["nfe_forward"] == 4 and r["nfe_backward"] == 4 for r in records)
    assert "done: best test accuracy" in proc.stdout and proc.stdout.count("epoch   ") == 2
    with open(out / "curves.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_test_acc"] == max(r["test_acc"] for r in records)


def test_mnist_odenet_smoke_run(tmp_path):
    out = tmp_path / "run"
    proc = run_script(MNIST, "--dataset", "digits", "--nepochs", "1", "--limit-batches", "2", "--batch_size", "32",
                      "--adjoint", "True", "--save", out, "--no-progress")
    (record,) = read_metrics(out)
    assert record["nfe_forward"] > 6 and record["nfe_backward"] > 0  # dopri5: >= 1 step of 6 stages + f(t0)
    assert "ODE solver asked for: dopri5, adaptive" in proc.stdout
    assert "ODE block ode_: TS rk 5dp, steps adaptive, adapt basic" in proc.stdout  # read back from PETSc


def _final_state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)


def _comparable(history):
    keys = ("epoch", "train_loss", "train_acc", "test_acc", "lr", "nfe_forward", "nfe_backward")
    return [{k: r[k] for k in keys} for r in history]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = ["--dataset", "digits", "--arch", "odenet", "--limit-batches", "3", "--batch-size", "32",
              "--milestones", "1", "--no-progress"]
    run_script(CIFAR, *common, "--epochs", "2", "--out", tmp_path / "straight")
    run_script(CIFAR, *common, "--epochs", "1", "--out", tmp_path / "resumed")
    proc = run_script(CIFAR, *common, "--epochs", "2", "--resume", "--out", tmp_path / "resumed")
    assert "resumed from" in proc.stdout and "epoch   1/2" not in proc.stdout
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert _comparable(straight["history"]) == _comparable(resumed["history"])
    assert straight["scheduler"] == resumed["scheduler"]
    assert _comparable(read_metrics(tmp_path / "resumed")) == _comparable(straight["history"])


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not available")
def test_two_mpi_ranks_take_the_single_process_step(tmp_path):
    # SGD, so that the comparison sees the update itself (Adam would turn round-off in a
    # near-zero gradient into a full-size step).
    common = ["--dataset", "digits", "--arch", "odenet", "--epochs", "1", "--limit-batches", "2",
              "--batch-size", "33", "--optimizer", "sgd", "--lr", "0.1", "--threads", "1", "--no-progress"]
    mpi = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, CIFAR,
                          *common, "--out", str(tmp_path / "mpi")], check=False, capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert mpi.returncode == 0, mpi.stdout[-3000:] + mpi.stderr[-3000:]
    assert mpi.stdout.count("epoch   1/1") == 1 and mpi.stdout.count("command:") == 1  # rank 0 logs alone
    assert "ranks: 2" in mpi.stdout
    run_script(CIFAR, *common, "--out", tmp_path / "single")
    two, one = _final_state(tmp_path / "mpi"), _final_state(tmp_path / "single")
    # Same global batches, gradients of the global mean loss: equal up to summation order.
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    (a,), (b,) = two["history"], one["history"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["test_acc"] == b["test_acc"] and a["nfe_forward"] == b["nfe_forward"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not available")
def test_the_design_cards_command_on_four_ranks_matches_one_rank(tmp_path):
    # The command the project is known by, exactly as written, shortened by --epochs/--limit-batches.
    card = [CIFAR, "-ts_type", "cn", "-ts_trajectory_type", "memory"]
    short = ["--epochs", "1", "--limit-batches", "2", "--no-progress"]
    mpi = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "4", sys.executable, *card, *short,
                          "--out", str(tmp_path / "four")], check=False, capture_output=True, text=True, timeout=600,
                         env=ENV)
    assert mpi.returncode == 0, mpi.stdout[-3000:] + mpi.stderr[-3000:]
    assert "ranks: 4" in mpi.stdout and "epoch   1/1" in mpi.stdout
    # the log says what PETSc ran, read back from the TS, not the script's --method default
    assert "ODE block ode32_: TS cn" in mpi.stdout and "trajectory memory" in mpi.stdout
    run_script(*card, *short, "--threads", "1", "--out", tmp_path / "one", timeout=600)
    (four,), (one,) = read_metrics(tmp_path / "four"), read_metrics(tmp_path / "one")
    # Newton and GMRES iterate over the whole distributed state, and their reductions sum in another
    # order on four ranks: the solves agree to their tolerance (1.2e-5 relative), not to round-off
    assert four["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)


@pytest.mark.parametrize("ts_type", ["beuler", "theta"])
def test_implicit_ts_types_from_the_command_line_train(tmp_path, ts_type):
    proc = run_script(CIFAR, "-ts_type", ts_type, "--epochs", "1", "--limit-batches", "2", "--no-progress",
                      "--threads", "1", "--out", tmp_path / ts_type, timeout=600)
    assert f"ODE block ode32_: TS {ts_type}" in proc.stdout
    (record,) = read_metrics(tmp_path / ts_type)
    assert math.isfinite(record["train_loss"]) and record["nfe_forward"] > 0  # the Newton solves converged


def test_compare_architectures_quick(tmp_path):
    out = tmp_path / "cmp"
    proc = run_script(COMPARE, "--quick", "--archs", "resnet", "odenet", "--out", out, timeout=180)
    table = (out / "comparison.md").read_text()
    assert table.count("| ResNet, 1 block | 0.01 |") == 1 and table.count("| ODE-Net, step 0.5 | 0.01 |") == 1
    assert "ResidualODE" not in table
    assert "FAILED" not in proc.stderr
    assert (out / "comparison.png").stat().st_size > 1000
