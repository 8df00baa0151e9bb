"""The CNF example's data: the five tabular loaders on small files written in the release's formats
(``.npy``, a pickled pandas DataFrame, CSV, HDF5), the errors for missing files, and the digits set.

Each expected array is built here step by step from the array that was written, so a loader that
reads the wrong column, splits at the wrong row or standardises with the wrong statistics fails.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import density_data  # noqa: E402
from density_data import DatasetMissing  # noqa: E402


def _write(root, *parts):
    path = os.path.join(str(root), *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _assert_splits(got, expected_rows, sizes):
    """``got`` = (train, validation, test) equal to ``expected_rows`` cut into ``sizes``, to round-off."""
    assert [len(part) for part in got] == list(sizes)
    np.testing.assert_allclose(np.vstack(got), expected_rows, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- POWER
def test_power_shuffles_drops_two_columns_adds_noise_and_standardises(tmp_path):
    raw = np.arange(50 * 8, dtype=np.float64).reshape(50, 8) ** 1.5  # every entry different
    np.save(_write(tmp_path, "power", "data.npy"), raw)
    got = density_data.load_power(str(tmp_path))

    rng = np.random.RandomState(42)
    rows = raw[rng.permutation(50)]  # the same draws as shuffling the rows in place
    kept = rows[:, [0, 2, 4, 5, 6, 7]]
    voltage, active = 0.01 * rng.rand(50), 0.001 * rng.rand(50)
    noise = np.column_stack([active, voltage, rng.rand(50, 3), np.zeros(50)])
    noisy = kept + noise
    fit = noisy[:45]  # 5 test rows, then 4 validation rows: training + validation fit the statistics
    expected = (noisy - fit.mean(axis=0)) / fit.std(axis=0)
    _assert_splits(got, expected, (41, 4, 5))
    assert got[0].shape[1] == 6


# ---------------------------------------------------------------------------------------------- MINIBOONE
def test_miniboone_splits_and_standardises_with_training_and_validation_rows(tmp_path):
    raw = np.random.RandomState(0).randn(40, 5) * [1, 2, 3, 4, 5] + [10, 0, -10, 3, 7]
    np.save(_write(tmp_path, "miniboone", "data.npy"), raw)
    got = density_data.load_miniboone(str(tmp_path))
    fit = raw[:36]  # 4 test rows, 3 validation rows
    _assert_splits(got, (raw - fit.mean(axis=0)) / fit.std(axis=0), (33, 3, 4))
    np.testing.assert_allclose(np.vstack(got[:2]).std(axis=0), 1.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- GAS
def test_gas_drops_labels_and_correlated_columns_then_standardises(tmp_path):
    pandas = pytest.importorskip("pandas")
    rng = np.random.RandomState(1)
    base = rng.randn(60, 5)
    frame = pandas.DataFrame({
        "Time": np.arange(60.0), "Meth": rng.rand(60), "Eth": rng.rand(60),
        "s1": base[:, 0], "s2": 2.0 * base[:, 0] + 0.15 * base[:, 1],  # correlation in (0.98, 0.999): s1 goes
        "s3": base[:, 2], "s4": -base[:, 2],  # correlation -1: both stay
        "s5": base[:, 3], "s6": base[:, 3] + 0.3 * base[:, 4]})  # correlation in (0.95, 0.98): both stay
    correlation = frame.corr()
    assert 0.98 < correlation.loc["s1", "s2"] < 0.999 and 0.95 < correlation.loc["s5", "s6"] < 0.98
    frame.to_pickle(_write(tmp_path, "gas", "ethylene_CO.pickle"))
    got = density_data.load_gas(str(tmp_path))
    kept = frame[["s2", "s3", "s4", "s5", "s6"]].to_numpy()
    expected = (kept - kept.mean(axis=0)) / kept.std(axis=0, ddof=1)  # over all rows, before the split
    _assert_splits(got, expected, (49, 5, 6))


def test_gas_drops_correlated_columns_one_at_a_time(tmp_path):
    # s1, s2, s3 all correlated: dropping s1 leaves s2 ~ s3, so s2 goes too and s3 alone stays
    pandas = pytest.importorskip("pandas")
    rng = np.random.RandomState(2)
    a, b = rng.randn(30), rng.randn(30)
    frame = pandas.DataFrame({"Time": a, "Meth": a, "Eth": a, "s1": a, "s2": a + 1e-3 * b, "s3": a - 1e-3 * b,
                              "s4": b})
    frame.to_pickle(_write(tmp_path, "gas", "ethylene_CO.pickle"))
    train, validation, test = density_data.load_gas(str(tmp_path))
    kept = frame[["s3", "s4"]].to_numpy()
    _assert_splits((train, validation, test), (kept - kept.mean(axis=0)) / kept.std(axis=0, ddof=1), (25, 2, 3))


# ---------------------------------------------------------------------------------------------- HEPMASS
def _hepmass_csv(path, table, columns):
    with open(path, "w") as fh:
        fh.write(",".join(columns) + "\n")
        for row in table:
            fh.write(",".join(f"{v:.17g}" for v in row) + "\n")


def test_hepmass_keeps_label_one_drops_repeated_feature_and_the_test_files_last_column(tmp_path):
    pytest.importorskip("pandas")
    rng = np.random.RandomState(3)
    features = ["f0", "f1", "f2", "f3"]
    train = np.column_stack([rng.randint(0, 2, 80), rng.randn(80, 4)])
    train[:, 0][:50] = 1
    repeated = np.flatnonzero(train[:, 0] == 1)[:6]
    train[repeated, 2] = -9.0  # f1's smallest value occurs 6 times among label-1 rows: f1 goes
    test = np.column_stack([rng.randint(0, 2, 30), rng.randn(30, 4), np.full(30, 1000.0)])
    _hepmass_csv(_write(tmp_path, "hepmass", "1000_train.csv"), train, ["# label"] + features)
    _hepmass_csv(_write(tmp_path, "hepmass", "1000_test.csv"), test, ["# label"] + features + ["mass"])
    got = density_data.load_hepmass(str(tmp_path))

    signal = train[train[:, 0] == 1, 1:]
    mean, std = signal.mean(axis=0), signal.std(axis=0, ddof=1)
    keep = [0, 2, 3]
    expected_train = ((signal - mean) / std)[:, keep]
    expected_test = ((test[test[:, 0] == 1, 1:5] - mean) / std)[:, keep]
    n_validation = int(0.1 * len(signal))
    _assert_splits(got, np.vstack([expected_train, expected_test]),
                   (len(signal) - n_validation, n_validation, len(expected_test)))


def test_hepmass_files_of_mismatched_width_are_refused(tmp_path):
    pytest.importorskip("pandas")
    table = np.column_stack([np.ones(20), np.random.RandomState(4).randn(20, 3)])
    for part in ("train", "test"):  # the test file lacks the extra column the release's test file has
        _hepmass_csv(_write(tmp_path, "hepmass", f"1000_{part}.csv"), table, ["# label", "f0", "f1", "f2"])
    with pytest.raises(ValueError, match="one column more"):
        density_data.load_hepmass(str(tmp_path))


# ---------------------------------------------------------------------------------------------- BSDS300
def test_bsds300_reads_the_three_datasets_as_stored(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.RandomState(5)
    parts = {"train": rng.rand(20, 63), "validation": rng.rand(5, 63), "test": rng.rand(7, 63)}
    with h5py.File(_write(tmp_path, "BSDS300", "BSDS300.hdf5"), "w") as fh:
        for name, array in parts.items():
            fh.create_dataset(name, data=array.astype(np.float32))
    got = density_data.load_bsds300(str(tmp_path))
    for array, name in zip(got, parts):
        assert array.dtype == np.float64
        np.testing.assert_array_equal(array, parts[name].astype(np.float32))


# ---------------------------------------------------------------------------------------------- missing files
@pytest.mark.parametrize("name,expected", [("power", "power/data.npy"), ("gas", "gas/ethylene_CO.pickle"),
                                           ("hepmass", "hepmass/1000_train.csv"),
                                           ("miniboone", "miniboone/data.npy"),
                                           ("bsds300", "BSDS300/BSDS300.hdf5")])
def test_a_missing_set_names_the_expected_file(tmp_path, name, expected):
    with pytest.raises(DatasetMissing) as info:
        density_data.load_density(name, str(tmp_path))
    message = str(info.value)
    assert os.path.join(str(tmp_path), expected) in message
    assert density_data.RELEASE_URL in message and "--data-dir" in message


def test_the_example_exits_with_the_expected_file_when_a_set_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "cnf.py"), "--data", "miniboone", "--data-dir",
                           str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert os.path.join(str(tmp_path), "miniboone", "data.npy") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tabular_density_batches_are_training_rows(tmp_path):
    raw = np.random.RandomState(6).randn(40, 3)
    np.save(_write(tmp_path, "miniboone", "data.npy"), raw)
    data = density_data.load_density("miniboone", str(tmp_path), test_size=2)
    assert data.dim == 3 and data.test.shape == (2, 3) and data.test.dtype == torch.float64
    batch = data.batch(10)
    assert all(any(torch.equal(row, train_row) for train_row in data.train) for row in batch)
    assert len({tuple(row.tolist()) for row in batch}) == 10  # drawn without replacement


# ---------------------------------------------------------------------------------------------- digits
def test_digits_are_dequantised_and_standardised_exactly():
    data = density_data.load_density("digits")
    assert data.dim == 64 and data.test.shape == (360, 64) and len(data.train_pixels) == 1437
    # the test set's noise is fixed and lies in [0, 1) on top of the integer pixels
    noise = data.test * data.std + data.mean - data.test_pixels
    assert float(noise.min()) >= 0.0 and float(noise.max()) < 1.0
    assert torch.equal(data.test, density_data.DigitsDensity().test)
    # the standardisation is that of the dequantised training pixels: many fresh batches agree
    torch.manual_seed(0)
    batches = torch.cat([data.batch(1437) for _ in range(40)])
    assert float(batches.mean(0).abs().max()) < 0.02
    assert float((batches.std(0) - 1).abs().max()) < 0.02
    mean, cov = data.moments()
    assert torch.equal(mean, torch.zeros(64, dtype=torch.float64))
    assert torch.allclose(cov.diagonal(), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
    # back to pixels: the midpoint of each dequantisation interval maps to (pixel + 1/2) / 17
    images = data.to_pixels(data.standardise(data.test_pixels + 0.5))
    assert torch.allclose(images.reshape(-1, 64) * 17, data.test_pixels + 0.5, rtol=0, atol=1e-12)


def test_digits_gaussian_baselines():
    data = density_data.load_density("digits")
    baselines = density_data.gaussian_baselines(data)
    # the diagonal fit of standardised data is N(0, I)
    diagonal = float((0.5 * data.test ** 2).sum(1).mean()) + 32 * math.log(2 * math.pi)
    assert abs(baselines["diagonal_gaussian"] - diagonal) < 1e-9
    assert baselines["full_gaussian"] < baselines["diagonal_gaussian"] - 10  # the pixels are correlated
