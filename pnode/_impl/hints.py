"""Hints from the steps a solve takes about the method it was given (each warns once per method and process).

**Stiffness.** An explicit method on a stiff problem takes steps far below the scale the solution changes on:
its step-size controller keeps ``h |lambda|`` at the edge of the method's stability region
(about 2 to 4 for explicit Runge-Kutta methods) for the largest eigenvalue ``lambda`` of ``df/dy``,
whatever the tolerances. :class:`StiffnessWatch` counts the accepted steps of each output interval;
after :data:`STEPS_BEFORE_CHECK` of them, all below :data:`SMALL_FRACTION` of the interval, it
estimates ``|lambda|`` at the current state by power iteration with Jacobian-vector products, and
when ``h |lambda| >= STABILITY_LIMITED`` it warns (a :class:`StiffnessWarning`) that the problem looks
stiff and names the implicit method to try. The check runs at most once per solve (a few dozen
JVPs).

**First order.** A first-order method (``beuler``) under error control keeps each step's local
error within the tolerances, but its global error is about their sum over the steps taken: on
solutions that decay slowly or oscillate it exceeds the tolerance by orders of magnitude (van der
Pol with mu = 1000 at rtol 1e-6: 10 % after 40 000 steps; ``benchmarks/stiff.py``). After
:data:`FIRST_ORDER_STEPS` accepted steps :class:`FirstOrderWatch` says so (a
:class:`FirstOrderWarning`) and names the higher-order method to use.
"""

import warnings
from typing import Optional, Set

import numpy as np
import torch

from .bridge import petsc_dtype, vec_view
from .methods import stiff_method
from .rhs import RHS

# Accepted steps in one output interval before the watch looks closer, and how far below the
# interval the largest of them must lie.
STEPS_BEFORE_CHECK = 500
SMALL_FRACTION = 1e-3
# h |lambda| from which a step is held by stability rather than by accuracy (explicit RK methods'
# real stability boundaries lie between 2 and 4; accuracy-limited steps keep h |lambda| far below 1).
STABILITY_LIMITED = 1.0
POWER_ITERATIONS = 30
# Accepted steps of a first-order method after which its global error is worth a word.
FIRST_ORDER_STEPS = 1000

_warned: Set[str] = set()


class MethodHint(UserWarning):
    """A hint from the steps a solve took: another method would serve this problem better."""


class StiffnessWarning(MethodHint):
    """An explicit method's steps are held by stability: the problem looks stiff."""


class FirstOrderWarning(MethodHint):
    """A first-order method took many error-controlled steps: its global error is their sum."""


def watch_steps(schedule, rhs: RHS, config, explicit: bool):
    """``schedule`` with the watch of :mod:`pnode._impl.hints` that applies to the method around it: the
    stiffness watch for an adaptive explicit method, the first-order watch for an adaptive implicit
    method of order one; else ``schedule`` itself."""
    method = config.method
    if not config.adaptive or method.name in _warned:
        return schedule
    if explicit:
        return StiffnessWatch(schedule, rhs, method.name)
    if method.implicit and method.order == 1:
        return FirstOrderWatch(schedule, method.name)
    return schedule


class FirstOrderWatch:
    """A step schedule that runs ``schedule`` and counts the accepted steps of a first-order method."""

    def __init__(self, schedule, method: str):
        self.schedule = schedule
        self.method = method
        self.steps = 0

    def before_step(self, ts) -> None:
        self.schedule.before_step(ts)

    def after_step(self, ts) -> None:
        self.schedule.after_step(ts)
        self.steps += 1
        if self.steps == FIRST_ORDER_STEPS and self.method not in _warned:
            _warned.add(self.method)
            warnings.warn(
                f"method {self.method!r} is first order: error control keeps each step's local error within "
                f"rtol/atol, but its global error is about their sum over the steps ({self.steps} so far), which on "
                "slowly decaying or oscillating solutions exceeds the tolerance by orders of magnitude (van der Pol, "
                f"mu = 1000, rtol 1e-6: 10 % after 40 000 steps). For accuracy use method={stiff_method()!r} "
                "(higher order, L-stable) with the same tolerances", FirstOrderWarning, stacklevel=2)


class StiffnessWatch:
    """A step schedule that runs ``schedule`` and watches the accepted step sizes (see the module)."""

    def __init__(self, schedule, rhs: RHS, method: str):
        self.schedule = schedule
        self.rhs = rhs
        self.method = method
        self.interval = -1  # the output interval the counts are for
        self.steps = 0
        self.largest = 0.0
        self.checked = False

    def before_step(self, ts) -> None:
        self.schedule.before_step(ts)

    def after_step(self, ts) -> None:
        self.schedule.after_step(ts)
        if self.checked:
            return
        record = self.schedule.record
        interval = len(record.step_of_output)
        if interval >= len(record.taus):
            return
        if interval != self.interval:
            self.interval, self.steps, self.largest = interval, 0, 0.0
            return
        self.steps += 1
        self.largest = max(self.largest, ts.getTime() - ts.getPrevTime())
        if self.steps >= STEPS_BEFORE_CHECK:
            self.checked = True
            length = record.taus[interval] - record.taus[interval - 1]
            if self.largest < SMALL_FRACTION * length:
                self._check(ts, length)

    def _check(self, ts, length: float) -> None:
        tau = ts.getTime()
        u = vec_view(ts.getSolution()).clone()
        radius = spectral_radius(self.rhs, tau, u)
        h = self.largest
        if h * radius < STABILITY_LIMITED:
            return
        _warned.add(self.method)
        t_user = self.rhs.direction * tau
        warnings.warn(
            f"the problem looks stiff: {self.method} took {self.steps} steps of at most {h:.3g} in an output interval "
            f"of {length:.3g} (at t={t_user:.6g}), held there by stability, not accuracy: the largest eigenvalue "
            f"of df/dy has |lambda| ~ {radius:.3g}, so h |lambda| ~ {h * radius:.2g}. An implicit method steps with "
            f"the solution instead: try method={stiff_method()!r} (L-stable, error-controlled) with the same "
            "tolerances", StiffnessWarning, stacklevel=2)


def spectral_radius(rhs: RHS, tau: float, u: torch.Tensor, iterations: int = POWER_ITERATIONS) -> float:
    """An estimate of the largest ``|lambda|`` of ``df/du`` at ``(tau, u)`` (``u`` flat, PETSc dtype,
    on the PETSc vectors' device): power iteration with Jacobian-vector products from a fixed pseudo-random start."""
    lin = rhs.linearize(tau, u)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(u.numel(), generator=generator, dtype=petsc_dtype()).to(u.device)
    v /= v.norm()
    radius = 0.0
    for _ in range(iterations):
        w = lin.jvp(v).to(dtype=petsc_dtype())
        norm = float(w.norm())
        if not np.isfinite(norm) or norm == 0.0:
            return radius if np.isfinite(norm) else float("inf")
        radius, v = norm, w / norm
    return radius


def forget_warnings(method: Optional[str] = None) -> None:
    """Warn again about ``method`` (every method: None); for tests."""
    if method is None:
        _warned.clear()
    else:
        _warned.discard(method)
