"""Data for the continuous normalizing flow example (``cnf.py``): densities to learn, held in memory.

Three kinds, one interface (:class:`Density`): ``dim``, a fixed ``test`` set, ``batch(n)`` for a
training batch, the training data's first two moments for Gaussian baselines, and ``describe()``.

* **2-D toy densities** (``moons``, ``8gaussians``, ``checkerboard``), sampled by formula.
* **digits**: scikit-learn's bundled 8x8 handwritten digits as 64-dimensional vectors (offline).
  The pixels are integers 0..16; they are *dequantised* (uniform noise on [0, 1) added to every
  pixel, fresh in every training batch, fixed for the test set) and *standardised* with the mean
  and standard deviation of the dequantised training pixels (computed exactly: the pixels' mean
  plus 1/2, their variance plus 1/12). Same split as the classification examples (1437 training,
  360 test images, stratified, fixed).
* **the five tabular sets** of MAF (Papamakarios et al., 2017), as FFJORD (Grathwohl et al., 2019)
  and PNODE read them: the preprocessed release (``data.tar.gz`` of https://zenodo.org/record/1161203)
  extracted into ``--data-dir``. Each loader keeps the preprocessing of that release's own loaders:

  ========= =============================== ===========================================================
  set       file (under ``--data-dir``)     preprocessing (in this order)
  ========= =============================== ===========================================================
  power     ``power/data.npy``              rows shuffled (``RandomState(42)``); columns 1 and 3 of 8
                                            dropped; uniform noise added per column (0.001, 0.01, 1,
                                            1, 1, 0 times U[0, 1), from the same generator, the second
                                            column's drawn first); split; standardised with the mean
                                            and std (ddof 0) of training + validation rows. 6 dims.
  gas       ``gas/ethylene_CO.pickle``      a pickled pandas DataFrame; columns Meth, Eth and Time
                                            dropped; while a column has a correlation above 0.98 with
                                            another, the first such column is dropped; standardised
                                            over all rows (pandas std, ddof 1); split. 8 dims.
  hepmass   ``hepmass/1000_train.csv``,     rows of label 1 (first column) only, label dropped; the
            ``hepmass/1000_test.csv``       test file's last column dropped; standardised with the
                                            training file's mean and std (ddof 1), by position;
                                            columns whose smallest training value occurs more than 5
                                            times dropped; validation = last 10 % of the training
                                            rows. 21 dims.
  miniboone ``miniboone/data.npy``          split; standardised with the mean and std (ddof 0) of
                                            training + validation rows. 43 dims.
  bsds300   ``BSDS300/BSDS300.hdf5``        datasets ``train``, ``validation``, ``test`` as stored
                                            (8x8 patches less one pixel). 63 dims.
  ========= =============================== ===========================================================

  "split": the last 10 % of the rows are the test set, the last 10 % of the rest the validation
  set, the remainder the training set (no shuffling beyond POWER's). gas and hepmass need
  ``pandas``, bsds300 needs ``h5py`` (``pip install -e '.[examples]'``).

Training batches are drawn with the global torch and NumPy generators, so that every MPI rank,
seeded alike, draws the same global batch and keeps its shard of it.
"""

import math
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from classification import DatasetMissing, load_digits

DTYPE = torch.float64
TOY_SETS = ("moons", "8gaussians", "checkerboard")
TABULAR_SETS = ("power", "gas", "hepmass", "miniboone", "bsds300")
DATA_SETS = ("digits",) + TOY_SETS + TABULAR_SETS
RELEASE_URL = "https://zenodo.org/record/1161203"


# ---------------------------------------------------------------------------------------------- the interface
class Density:
    """A density-estimation data set. Attributes: ``name``, ``dim``, ``test`` (``(M, dim)`` float64)."""

    name: str
    dim: int
    test: torch.Tensor

    def batch(self, n: int) -> torch.Tensor:
        """A training batch ``(n, dim)`` float64, from the global torch/NumPy generators."""
        raise NotImplementedError

    def moments(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Mean ``(dim,)`` and covariance ``(dim, dim)`` of the training distribution (None: not known)."""
        return None

    def describe(self) -> str:
        raise NotImplementedError


def gaussian_baselines(data: Density) -> Dict[str, float]:
    """Test NLL (nats, mean over ``data.test``) of a diagonal and of a full-covariance Gaussian whose
    moments are those of the training data (their maximum-likelihood fits); {} when unknown."""
    moments = data.moments()
    if moments is None:
        return {}
    mean, cov = moments
    diagonal = torch.distributions.Normal(mean, cov.diagonal().sqrt())
    full = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return {"diagonal_gaussian": float(-diagonal.log_prob(data.test).sum(1).mean()),
            "full_gaussian": float(-full.log_prob(data.test).mean())}


def load_density(name: str, data_dir: str = "data", test_size: int = 0, seed: int = 0) -> Density:
    """The data set ``name`` (see :data:`DATA_SETS`).

    ``test_size``: toy sets draw that many test points (from ``seed + 1``); the others keep the
    first ``test_size`` rows of their test set (0: all of it). Raises :class:`DatasetMissing` (a
    ``FileNotFoundError``) naming the expected file when a tabular set is not in ``data_dir``.
    """
    if name in TOY_SETS:
        return ToyDensity(name, test_size or 4096, seed)
    if name == "digits":
        return DigitsDensity(test_size)
    if name in TABULAR_SETS:
        train, validation, test = TABULAR_LOADERS[name](data_dir)
        return TabularDensity(name, train, validation, test[:test_size] if test_size else test)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATA_SETS)}")


# ---------------------------------------------------------------------------------------------- 2-D toys
def sample_toy(name: str, n: int, rng) -> torch.Tensor:
    """``n`` points of a 2-D toy density, shape ``(n, 2)`` float64, spread over roughly [-3, 3]^2.

    ``rng``: a ``numpy.random.RandomState`` (or the module ``numpy.random``).
    """
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
        raise ValueError(f"unknown toy density {name!r}")
    return torch.as_tensor(points, dtype=DTYPE)


class ToyDensity(Density):
    """A 2-D toy density; training batches are fresh samples from the global NumPy generator."""

    def __init__(self, name: str, test_size: int, seed: int):
        self.name, self.dim = name, 2
        self.test = sample_toy(name, test_size, np.random.RandomState(seed + 1))

    def batch(self, n: int) -> torch.Tensor:
        return sample_toy(self.name, n, np.random)

    def describe(self) -> str:
        return f"{self.name}: 2-D toy density, fresh samples every batch, {len(self.test)} test points"


# ---------------------------------------------------------------------------------------------- digits
class DigitsDensity(Density):
    """scikit-learn's 8x8 digits as dequantised, standardised 64-d vectors (see the module docstring).

    Attributes:
        train_pixels, test_pixels: float64 ``(N, 64)``, integers 0..16.
        mean, std: ``(64,)``, of the dequantised training pixels.
    """

    LEVELS = 17  # pixel values 0..16; dequantised values lie in [0, 17)

    def __init__(self, test_size: int = 0):
        digits = load_digits()
        self.name, self.dim = "digits", 64
        self.train_pixels = digits.train_images.reshape(len(digits.train_images), -1).to(DTYPE)
        self.test_pixels = digits.test_images.reshape(len(digits.test_images), -1).to(DTYPE)
        if test_size:
            self.test_pixels = self.test_pixels[:test_size]
        self.mean = self.train_pixels.mean(0) + 0.5
        self.std = (self.train_pixels.var(0, unbiased=False) + 1.0 / 12.0).sqrt()
        noise = torch.rand(self.test_pixels.shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        self.test = self.standardise(self.test_pixels + noise)

    def standardise(self, dequantised: torch.Tensor) -> torch.Tensor:
        return (dequantised - self.mean) / self.std

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised vectors ``(N, 64)`` back to 8x8 images ``(N, 8, 8)`` with values in [0, 1]."""
        return ((x * self.std + self.mean) / self.LEVELS).clamp(0.0, 1.0).reshape(-1, 8, 8)

    def batch(self, n: int) -> torch.Tensor:
        rows = torch.randperm(len(self.train_pixels))[:n]
        pixels = self.train_pixels[rows]
        return self.standardise(pixels + torch.rand(pixels.shape, dtype=DTYPE))

    def moments(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # dequantised pixels: covariance of the pixels plus 1/12 on the diagonal; then standardised
        centred = self.train_pixels - self.train_pixels.mean(0)
        cov = centred.T @ centred / len(centred) + torch.eye(self.dim, dtype=DTYPE) / 12.0
        return torch.zeros(self.dim, dtype=DTYPE), cov / torch.outer(self.std, self.std)

    def describe(self) -> str:
        return (f"digits: {len(self.train_pixels)} training / {len(self.test)} test images of 8x8 = 64 dims, "
                "dequantised (uniform noise) and standardised")


# ---------------------------------------------------------------------------------------------- tabular sets
class TabularDensity(Density):
    """A preprocessed tabular set: ``train``, ``validation``, ``test`` float64 ``(N, dim)``."""

    def __init__(self, name: str, train: np.ndarray, validation: np.ndarray, test: np.ndarray):
        self.name, self.dim = name, train.shape[1]
        self.train, self.validation, self.test = (torch.as_tensor(np.asarray(a, dtype=np.float64))
                                                  for a in (train, validation, test))

    def batch(self, n: int) -> torch.Tensor:
        return self.train[torch.randperm(len(self.train))[:n]]

    def moments(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.train.mean(0), torch.cov(self.train.T, correction=0).reshape(self.dim, self.dim)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} training / {len(self.validation)} validation / {len(self.test)} "
                f"test rows of {self.dim} dims")


def release_file(data_dir: str, set_name: str, *parts: str) -> str:
    """The path of one file of the MAF release, or :class:`DatasetMissing` naming it."""
    path = os.path.join(data_dir, *parts)
    if not os.path.exists(path):
        raise DatasetMissing(
            f"{set_name} not found: expected the file {path} (the preprocessed release of MAF/FFJORD). "
            f"Download data.tar.gz from {RELEASE_URL}, extract it and pass --data-dir <the folder holding "
            "power/, gas/, hepmass/, miniboone/ and BSDS300/>. Offline, --data digits trains on scikit-learn's "
            "bundled handwritten digits.")
    return path


def split_rows(data: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test = the last 10 % of the rows, validation = the last 10 % of the rest, training = the remainder."""
    n_test = int(0.1 * len(data))
    n_validation = int(0.1 * (len(data) - n_test))
    if n_test == 0 or n_validation == 0:
        raise ValueError(f"{len(data)} rows are too few to split off 10 % test and 10 % validation rows")
    rest, test = data[:-n_test], data[-n_test:]
    return rest[:-n_validation], rest[-n_validation:], test


def standardise_by(reference: np.ndarray, *arrays: np.ndarray, ddof: int = 0) -> Tuple[np.ndarray, ...]:
    """``arrays`` standardised column by column with the mean and std of ``reference``."""
    mean, std = reference.mean(axis=0), reference.std(axis=0, ddof=ddof)
    return tuple((a - mean) / std for a in arrays)


def load_power(data_dir: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """POWER (household electric power consumption): ``power/data.npy``, ``(N, 8)`` -> 6 dims."""
    data = np.load(release_file(data_dir, "POWER", "power", "data.npy"))
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    data = np.delete(data, [1, 3], axis=1)  # the reactive power and the global intensity
    n = len(data)
    voltage = 0.01 * rng.rand(n, 1)  # drawn in this order: voltage, active power, sub-meterings
    active_power = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    data = data + np.hstack([active_power, voltage, sub_metering, np.zeros((n, 1))])
    train, validation, test = split_rows(data)
    return standardise_by(np.vstack([train, validation]), train, validation, test)


def load_miniboone(data_dir: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MINIBOONE (particle identification): ``miniboone/data.npy``, ``(N, 43)``."""
    train, validation, test = split_rows(np.load(release_file(data_dir, "MINIBOONE", "miniboone", "data.npy")))
    return standardise_by(np.vstack([train, validation]), train, validation, test)


def _pandas(set_name: str):
    try:
        import pandas
    except ImportError:
        raise ModuleNotFoundError(f"reading {set_name} needs pandas: pip install pandas (or pip install -e "
                                  "'.[examples]')") from None
    return pandas


def load_gas(data_dir: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GAS (ethylene and CO sensor array): ``gas/ethylene_CO.pickle``, a pandas DataFrame -> 8 dims."""
    path = release_file(data_dir, "GAS", "gas", "ethylene_CO.pickle")
    frame = _pandas("GAS").read_pickle(path).drop(columns=["Meth", "Eth", "Time"])
    while True:
        correlated = (frame.corr() > 0.98).to_numpy().sum(axis=1) > 1  # more than itself
        if not correlated.any():
            break
        frame = frame.drop(columns=frame.columns[int(np.flatnonzero(correlated)[0])])
    frame = (frame - frame.mean()) / frame.std()
    return split_rows(frame.to_numpy(dtype=np.float64))


def load_hepmass(data_dir: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HEPMASS (particle collisions): ``hepmass/1000_train.csv`` and ``1000_test.csv`` -> 21 dims."""
    pandas = _pandas("HEPMASS")
    train, test = (pandas.read_csv(release_file(data_dir, "HEPMASS", "hepmass", f"1000_{part}.csv"),
                                   index_col=False).to_numpy(dtype=np.float64) for part in ("train", "test"))
    train, test = train[train[:, 0] == 1, 1:], test[test[:, 0] == 1, 1:-1]
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"HEPMASS: 1000_train.csv has {train.shape[1] + 1} columns, 1000_test.csv "
                         f"{test.shape[1] + 2}; the release's test file has one column more than its training file")
    train, test = standardise_by(train, train, test, ddof=1)
    keep = np.array([np.count_nonzero(column == column.min()) <= 5 for column in train.T])
    train, test = train[:, keep], test[:, keep]
    n_validation = int(0.1 * len(train))
    return train[:-n_validation], train[-n_validation:], test


def load_bsds300(data_dir: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BSDS300 (natural image patches): ``BSDS300/BSDS300.hdf5`` with datasets train/validation/test -> 63 dims."""
    path = release_file(data_dir, "BSDS300", "BSDS300", "BSDS300.hdf5")
    try:
        import h5py
    except ImportError:
        raise ModuleNotFoundError("reading BSDS300 needs h5py: pip install h5py (or pip install -e "
                                  "'.[examples]')") from None
    with h5py.File(path, "r") as fh:
        return tuple(np.asarray(fh[part][:], dtype=np.float64) for part in ("train", "validation", "test"))


TABULAR_LOADERS: Dict[str, Callable[[str], Tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "power": load_power, "gas": load_gas, "hepmass": load_hepmass, "miniboone": load_miniboone,
    "bsds300": load_bsds300}
