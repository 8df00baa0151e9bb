"""The classic stiff test set (Hairer & Wanner, Solving ODEs II, and the IVP test set of Mazzia et
al.), written from their published definitions: Robertson's kinetics, van der Pol with mu = 1000,
HIRES and OREGO.

Each :class:`StiffProblem` has its right-hand side twice, once in torch (``f(t, y, p)``, batched
over leading dimensions, differentiable in the parameters ``p``) and once in NumPy with its exact
Jacobian for SciPy's implicit solvers (the reference, and the baseline), plus the initial state,
the output times and the tolerances' absolute part. Nothing here imports pnode.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class StiffProblem:
    """A stiff initial value problem with parameters.

    Attributes:
        name: short name (``'robertson'``, ``'vdpol'``, ``'hires'``, ``'orego'``).
        f: ``f(t, y, p) -> dy/dt`` in torch: ``y`` of shape ``(..., n)``, ``p`` a 1-D tensor.
        f_np: the same in NumPy, ``f_np(t, y, p)`` with ``y`` of shape ``(n,)``.
        jac_np: ``df/dy`` in NumPy, ``(n, n)``.
        y0: initial state ``(n,)``.
        params: the parameters' published values ``(m,)`` (rate constants, mu, ...).
        param_names: their names.
        times: output times, the first the initial time.
        atol_per_rtol: the absolute tolerance as a multiple of the relative one (the components' scale).
    """

    name: str
    f: Callable
    f_np: Callable
    jac_np: Callable
    y0: Sequence[float]
    params: Sequence[float]
    param_names: Sequence[str]
    times: Sequence[float]
    atol_per_rtol: float

    def atol(self, rtol: float) -> float:
        return self.atol_per_rtol * rtol


# ---------------------------------------------------------------------------------------------- Robertson
def _robertson(t, y, k):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    r1, r2, r3 = k[0] * y1, k[1] * y2 * y2, k[2] * y2 * y3
    return torch.stack([-r1 + r3, r1 - r2 - r3, r2], dim=-1)


def _robertson_np(t, y, k):
    r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
    return np.array([-r1 + r3, r1 - r2 - r3, r2])


def _robertson_jac(t, y, k):
    return np.array([[-k[0], k[2] * y[2], k[2] * y[1]],
                     [k[0], -2 * k[1] * y[1] - k[2] * y[2], -k[2] * y[1]],
                     [0.0, 2 * k[1] * y[1], 0.0]])


ROBERTSON = StiffProblem(
    "robertson", _robertson, _robertson_np, _robertson_jac, (1.0, 0.0, 0.0), (0.04, 3e7, 1e4), ("k1", "k2", "k3"),
    tuple([0.0] + [float(x) for x in np.logspace(-5, 5, 21)]), 1e-4)


# ---------------------------------------------------------------------------------------------- van der Pol
def _vdpol(t, y, p):
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2, p[0] * (1 - y1 * y1) * y2 - y1], dim=-1)


def _vdpol_np(t, y, p):
    return np.array([y[1], p[0] * (1 - y[0] ** 2) * y[1] - y[0]])


def _vdpol_jac(t, y, p):
    return np.array([[0.0, 1.0], [-2 * p[0] * y[0] * y[1] - 1, p[0] * (1 - y[0] ** 2)]])


VDPOL = StiffProblem("vdpol", _vdpol, _vdpol_np, _vdpol_jac, (2.0, 0.0), (1000.0,), ("mu",),
                     tuple(float(x) for x in np.linspace(0.0, 3000.0, 31)), 1.0)


# ---------------------------------------------------------------------------------------------- HIRES
# rate constants k1..k12 as in the test set: 1.71, 0.43, 8.32, 0.0007, 8.75, 10.03, 0.035, 1.12, 1.745, 280,
# 0.69, 1.81
def _hires(t, y, k):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[..., i] for i in range(8))
    r = k[9] * y6 * y8
    return torch.stack([
        -k[0] * y1 + k[1] * y2 + k[2] * y3 + k[3],
        k[0] * y1 - k[4] * y2,
        -k[5] * y3 + k[1] * y4 + k[6] * y5,
        k[2] * y2 + k[0] * y3 - k[7] * y4,
        -k[8] * y5 + k[1] * y6 + k[1] * y7,
        -r + k[10] * y4 + k[0] * y5 - k[1] * y6 + k[10] * y7,
        r - k[11] * y7,
        -r + k[11] * y7], dim=-1)


def _hires_np(t, y, k):
    return _hires(t, torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(k, dtype=torch.float64)).numpy()


def _hires_jac(t, y, k):
    jac = np.zeros((8, 8))
    jac[0, [0, 1, 2]] = [-k[0], k[1], k[2]]
    jac[1, [0, 1]] = [k[0], -k[4]]
    jac[2, [2, 3, 4]] = [-k[5], k[1], k[6]]
    jac[3, [1, 2, 3]] = [k[2], k[0], -k[7]]
    jac[4, [4, 5, 6]] = [-k[8], k[1], k[1]]
    jac[5, [3, 4, 5, 6, 7]] = [k[10], k[0], -k[1] - k[9] * y[7], k[10], -k[9] * y[5]]
    jac[6, [5, 6, 7]] = [k[9] * y[7], -k[11], k[9] * y[5]]
    jac[7, [5, 6, 7]] = [-k[9] * y[7], k[11], -k[9] * y[5]]
    return jac


HIRES = StiffProblem(
    "hires", _hires, _hires_np, _hires_jac, (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057),
    (1.71, 0.43, 8.32, 0.0007, 8.75, 10.03, 0.035, 1.12, 1.745, 280.0, 0.69, 1.81),
    tuple(f"k{i}" for i in range(1, 13)), (0.0, 5.0, 20.0, 321.8122), 1e-4)


# ---------------------------------------------------------------------------------------------- OREGO
def _orego(t, y, p):
    s, q, w = p[0], p[1], p[2]
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([s * (y2 + y1 * (1 - q * y1 - y2)), (y3 - (1 + y1) * y2) / s, w * (y1 - y3)], dim=-1)


def _orego_np(t, y, p):
    s, q, w = p
    return np.array([s * (y[1] + y[0] * (1 - q * y[0] - y[1])), (y[2] - (1 + y[0]) * y[1]) / s, w * (y[0] - y[2])])


def _orego_jac(t, y, p):
    s, q, w = p
    return np.array([[s * (1 - 2 * q * y[0] - y[1]), s * (1 - y[0]), 0.0],
                     [-y[1] / s, -(1 + y[0]) / s, 1 / s],
                     [w, 0.0, -w]])


OREGO = StiffProblem("orego", _orego, _orego_np, _orego_jac, (1.0, 2.0, 3.0), (77.27, 8.375e-6, 0.161),
                     ("s", "q", "w"), tuple(float(x) for x in np.linspace(0.0, 360.0, 13)), 1.0)

PROBLEMS: Dict[str, StiffProblem] = {p.name: p for p in (ROBERTSON, VDPOL, HIRES, OREGO)}

# Published values at the end of the interval (IVP test set), to check the definitions above.
PUBLISHED_FINAL = {
    "hires": (0.7371312573325668e-3, 0.1442485726316185e-3, 0.5888729740967575e-4, 0.1175651343283149e-2,
              0.2386356198831331e-2, 0.6238968252742796e-2, 0.2849998395185769e-2, 0.2850001604814231e-2),
    "orego": (0.1000814870318523e1, 0.1228178521549917e4, 0.1320554942846706e3),
}


def reference_solution(problem: StiffProblem, params=None, rtol: float = 1e-12) -> np.ndarray:
    """SciPy's Radau at ``rtol`` (absolute ``rtol * atol_per_rtol * 1e-2``) with the exact Jacobian, at
    every output time: ``(len(times), n)``."""
    from scipy.integrate import solve_ivp

    p = np.asarray(problem.params if params is None else params, dtype=np.float64)
    times = np.asarray(problem.times)
    sol = solve_ivp(problem.f_np, (times[0], times[-1]), np.asarray(problem.y0, dtype=np.float64), method="Radau",
                    t_eval=times, rtol=rtol, atol=problem.atol(rtol) * 1e-2, args=(p,), jac=problem.jac_np)
    if not sol.success:
        raise RuntimeError(f"reference solve of {problem.name} failed: {sol.message}")
    return sol.y.T


def scaled_error(y: np.ndarray, reference: np.ndarray) -> float:
    """``max |y - ref| / range_i`` over output times (the first excluded) and components, ``range_i`` the
    largest ``|ref_i|`` over the output times: each component's error relative to its own scale."""
    scale = np.maximum(np.abs(reference[1:]).max(axis=0), 1e-300)
    return float((np.abs(np.asarray(y)[1:] - reference[1:]) / scale).max())


def relative_error(y: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pointwise ``|y - ref| / |ref|`` (the first output time excluded): ``(len(times) - 1, n)``."""
    return np.abs(np.asarray(y)[1:] - reference[1:]) / np.maximum(np.abs(reference[1:]), 1e-300)


def log10_or_nan(x: float) -> float:
    return math.log10(x) if x > 0 else float("nan")
