"""Locating an event inside the step that crossed it: the first sign change, refined to round-off.

The event search (:mod:`pnode._impl.event_search`) only sees the event functions at step ends. When a step
ends with a sign other than the one it started with (a zero counts as a change), the event is the
*first* point of that step where some event function leaves its starting sign, whatever the
functions do at the step's end (a second crossing, a plateau at zero, a terminal-time branch that
returns exactly zero). :func:`locate` finds it in two stages:

1. **On a cheap stand-in**, ``cheap(h)``: the event functions along the cubic Hermite interpolant of
   the step (its end states and derivatives). Sampling brackets the first sign change, and the
   Illinois method converges on it. No evaluation of ``f``.
2. **On the computed solution**, ``exact(h)``: the event functions at the end of one step of the
   method of length ``h`` from the step's start. A safeguarded secant iteration started at the
   stand-in's root (and its slope) moves to a root of the computed solution's event function to
   round-off, in a few steps.

A root where the function jumps (from a value outside ``zero_tol`` on one side) is a *jump*: its
time does not depend smoothly on anything, and the event's time is then taken as it is, without
a gradient (as torchdiffeq's ``odeint_event`` gives it no gradient there either).

Both stages work on callables, so the schedule is tested on plain functions (``tests/test_events.py``).
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

Values = Callable[[float], np.ndarray]
"""``values(h)``: every event function's value (float64, ``(count,)``) at ``h`` into the step."""

# Points at which the stand-in is sampled for the first sign change in a step.
SAMPLES = 16
# Iterations of either stage before it gives up converging (bisection halves the bracket each time).
_MAX_ITERATIONS = 100
# Secant steps on the computed solution before bisection takes over (a root of the stand-in is
# within its interpolation error of the computed one: two or three steps reach round-off).
_SECANT_STEPS = 8


@dataclass(frozen=True)
class Crossing:
    """Where the first event lies in the step.

    Attributes:
        length: from the step's start to the event (PETSc time, > 0).
        index: which event function crossed.
        jump: the function jumps there instead of crossing zero continuously; the event's time
            has no derivative.
    """

    length: float
    index: int
    jump: bool


def crossed(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Which event functions have left their starting ``signs`` (0: undetermined, never crosses);
    an exact zero counts as leaving."""
    return (signs != 0) & (np.sign(values) != signs)


def locate(cheap: Values, exact: Values, signs: np.ndarray, length: float, start: np.ndarray,
           end: np.ndarray, resolution: float, zero_tol: float, lower: Optional[np.ndarray] = None) -> Crossing:
    """The first event in a step of ``length`` whose event values were ``start`` at 0 and ``end`` at
    ``length`` (exact); ``signs``: the starting signs; ``resolution``: the smallest meaningful
    difference of two times; ``zero_tol``: values within it are zeros (see the module docstring);
    ``lower``: per function, where in the step its sign starts to count (0, or a sample point where
    it first left zero), None for 0."""
    lower = np.zeros(len(signs)) if lower is None else lower
    lo, hi, index = _first_bracket(cheap, signs, length, start, end, lower)
    lo, hi, jump = _illinois(lambda h: cheap(h)[index], signs[index], lo, hi, cheap(lo)[index] if lo else start[index],
                             cheap(hi)[index] if hi < length else end[index], resolution, zero_tol)
    if jump:
        found = _confirm_jump(exact, signs, index, lo, hi, zero_tol)
        if found is not None:
            return found
    guess = hi if jump else lo if abs(cheap(lo)[index]) < abs(cheap(hi)[index]) else hi
    slope = _slope(lambda h: cheap(h)[index], guess, length)
    floor = (lower[index], exact(lower[index])) if lower[index] > 0 else (0.0, start)
    return _refine(exact, signs, index, guess, slope, length, floor, end, resolution, zero_tol)


def _first_bracket(cheap: Values, signs: np.ndarray, length: float, start: np.ndarray,
                   end: np.ndarray, lower: np.ndarray) -> Tuple[float, float, int]:
    """``(lo, hi, index)``: the first sample interval in which an event function leaves its sign
    (after its ``lower`` point), and the function that does so first (by linear interpolation between
    the two samples)."""
    lo, before = 0.0, start
    for k in range(1, SAMPLES + 1):
        hi = length * k / SAMPLES if k < SAMPLES else length
        after = cheap(hi) if k < SAMPLES else end
        mask = crossed(after, signs) & (hi > lower)
        if mask.any():
            candidates = np.flatnonzero(mask)
            fractions = [abs(before[i]) / max(abs(before[i]) + abs(after[i]), 1e-300) for i in candidates]
            return lo, hi, int(candidates[int(np.argmin(fractions))])
        lo, before = hi, after
    raise AssertionError("the step's end values cross, so some sample interval does")


def _illinois(value: Callable[[float], float], sign: float, lo: float, hi: float, f_lo: float, f_hi: float,
              resolution: float, zero_tol: float) -> Tuple[float, float, bool]:
    """Shrink ``[lo, hi]`` (``value`` keeps ``sign`` at ``lo``, leaves it at ``hi``) around the sign
    change; returns it and whether the change is a jump (a value beyond ``zero_tol`` at both ends).

    Illinois steps, with a bisection whenever two steps have not halved the bracket (a multiple root
    or a jump stalls the secant), so it converges in at most twice bisection's iterations."""
    side, widths = 0, [hi - lo, hi - lo]
    for _ in range(_MAX_ITERATIONS):
        if hi - lo <= resolution:
            break
        mid = 0.5 * (lo + hi)
        if f_hi != 0.0 and f_lo != f_hi and hi - lo <= 0.5 * widths[-2]:
            secant = hi - f_hi * (hi - lo) / (f_hi - f_lo)
            mid = secant if lo < secant < hi else mid
        widths.append(hi - lo)
        f_mid = value(mid)
        if np.sign(f_mid) == sign:
            lo, f_lo = mid, f_mid
            f_hi = f_hi * 0.5 if side == -1 else f_hi
            side = -1
        else:
            hi, f_hi = mid, f_mid
            f_lo = f_lo * 0.5 if side == 1 else f_lo
            side = 1
    return lo, hi, _is_jump(value(lo), value(hi), zero_tol)


def _is_jump(f_lo: float, f_hi: float, zero_tol: float) -> bool:
    return max(abs(f_lo), abs(f_hi)) > zero_tol


def _confirm_jump(exact: Values, signs: np.ndarray, index: int, lo: float, hi: float,
                  zero_tol: float) -> Optional[Crossing]:
    """A jump of the stand-in at ``[lo, hi]`` is the computed solution's when its values there agree
    (a branch on the time, or a state far from a root): then no refinement can move it."""
    at_lo, at_hi = exact(lo) if lo > 0 else None, exact(hi)
    if not crossed(at_hi, signs)[index] or (at_lo is not None and crossed(at_lo, signs).any()):
        return None
    if at_lo is not None and not _is_jump(at_lo[index], at_hi[index], zero_tol):
        return None
    return Crossing(hi, index, jump=True)


def _slope(value: Callable[[float], float], h: float, length: float) -> float:
    """A central difference of ``value`` at ``h`` (steps of ``sqrt(eps)`` of the step's length)."""
    delta = math.sqrt(np.finfo(np.float64).eps) * length
    lo, hi = max(h - delta, 0.0), min(h + delta, length)
    return (value(hi) - value(lo)) / (hi - lo) if hi > lo else 0.0


def _refine(exact: Values, signs: np.ndarray, index: int, guess: float, slope: float, length: float,
            floor: Tuple[float, np.ndarray], end: np.ndarray, resolution: float, zero_tol: float) -> Crossing:
    """Secant steps on the computed solution from the stand-in's root, kept inside a bracket of
    exact values (from ``floor``, a point and its values, to ``length`` at first) and handed to
    bisection when they stall."""
    sign = signs[index]
    lo, f_lo, hi, f_hi = floor[0], floor[1][index], length, end[index]
    x, f_x = guess, exact(guess)[index]
    previous: Optional[Tuple[float, float]] = None
    for iteration in range(_MAX_ITERATIONS):
        if np.sign(f_x) == sign:
            lo, f_lo = x, f_x
        else:
            hi, f_hi = x, f_x
        if f_x == 0.0:
            return Crossing(x, index, jump=False)
        if hi - lo <= resolution:
            break
        if previous is None:
            step = -f_x / slope if slope != 0.0 and math.isfinite(slope) else math.inf
        else:
            step = -f_x * (x - previous[0]) / (f_x - previous[1]) if f_x != previous[1] else math.inf
        if abs(step) <= resolution:
            return Crossing(x, index, jump=False)  # converged: the next correction is below the resolution
        target = x + step
        if iteration >= _SECANT_STEPS or not lo < target < hi:
            target = 0.5 * (lo + hi)
        previous = (x, f_x)
        x, f_x = target, exact(target)[index]
    if _is_jump(f_lo, f_hi, zero_tol):
        return Crossing(hi, index, jump=True)
    return Crossing(lo if abs(f_lo) < abs(f_hi) else hi, index, jump=False)
