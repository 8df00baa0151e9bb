"""Prescribed step times: torchdiffeq's ``jump_t``, ``step_t`` and ``grid_constructor``.

pnode lands a step on every output time, so prescribed times become output times it does not
return (``step_t``: steps land on them, nothing else changes; ``grid_constructor``: the steps of a
fixed-step method), and the integration is split at every ``jump_t`` into solves chained through
their states: each restarts the adaptive controller and the first-same-as-last derivative, so f
is evaluated again just after the jump, and gradients flow through the whole chain by autograd.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import InputError


@dataclass(frozen=True)
class TimePlan:
    """Times the steps must land on, besides the output times (user time, float64).

    Attributes:
        jumps: times where ``f`` may jump (``jump_t``), strictly inside the span of ``t``.
        stops: times a step must end at (``step_t``, a ``grid_constructor``'s grid), strictly inside
            the span, none of them an output time or a jump.
    """

    jumps: Tuple[float, ...] = ()
    stops: Tuple[float, ...] = ()


@dataclass(frozen=True)
class Segment:
    """One solve of a split integration.

    Attributes:
        t: its output times (user time; the caller's ``t`` entries keep their autograd history).
        rows: for each of its times, the index into the caller's ``t`` it returns, or -1 for a
            prescribed time (not returned).
    """

    t: torch.Tensor
    rows: Tuple[int, ...]


def time_plan(jump_t, step_t, grid_constructor: Optional[Callable], func, y0, t: torch.Tensor,
              adaptive: bool, fixed_step_size: bool, method: str) -> Optional[TimePlan]:
    """Check torchdiffeq's ``jump_t``/``step_t``/``grid_constructor`` options; None when there are none.

    ``grid_constructor(func, y0, t)`` is called once, with the caller's arguments, and must return
    a 1-D grid from ``t[0]`` to ``t[-1]`` (torchdiffeq's contract). Times outside the span of
    ``t`` are ignored, as torchdiffeq does.
    """
    if jump_t is None and step_t is None and grid_constructor is None:
        return None
    values = t.detach().to("cpu", torch.float64).numpy()
    jumps = _inside(_times(jump_t, "jump_t"), values)
    stops = _inside(_times(step_t, "step_t"), values)
    shared = np.intersect1d(jumps, stops)
    if shared.size:
        raise InputError(f"options['step_t'] and options['jump_t'] share the time {shared[0]:.6g}; a time is either "
                         "a step end (step_t) or a jump of f (jump_t), as in torchdiffeq")
    if grid_constructor is not None:
        grid = _grid(grid_constructor, func, y0, t, values, adaptive, fixed_step_size, method)
        stops = np.union1d(stops, _inside(grid, values))
    stops = np.setdiff1d(np.setdiff1d(stops, values), jumps)
    jumps = np.setdiff1d(jumps, values[:1])
    return TimePlan(tuple(float(x) for x in jumps), tuple(float(x) for x in stops))


def _times(value, name: str) -> np.ndarray:
    if value is None:
        return np.zeros(0)
    try:
        times = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"options[{name!r}] must be a 1-D tensor (or sequence) of times, got "
                         f"{type(value).__name__}") from None
    if times.dim() > 1:
        raise InputError(f"options[{name!r}] must be 1-D, got shape {tuple(times.shape)}")
    times = times.reshape(-1).numpy()
    if not np.isfinite(times).all():
        raise InputError(f"options[{name!r}] contains NaN or inf; prescribed times must be finite")
    return np.unique(times)


def _inside(times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The entries of ``times`` inside the span of the output times ``t`` (the last one included)."""
    low, high = min(t[0], t[-1]), max(t[0], t[-1])
    return times[(times >= low) & (times <= high)]


def _grid(grid_constructor, func, y0, t, values, adaptive: bool, fixed_step_size: bool, method: str) -> np.ndarray:
    if not callable(grid_constructor):
        raise InputError(f"options['grid_constructor'] must be callable as grid_constructor(func, y0, t), got "
                         f"{type(grid_constructor).__name__}")
    if fixed_step_size:
        raise InputError("options['step_size'] and options['grid_constructor'] both set the steps: pass one of "
                         "them (as in torchdiffeq)")
    if adaptive:
        raise InputError(f"options['grid_constructor'] sets the steps of a fixed-step method, but {method!r} adapts "
                         "its steps: choose a fixed-step method ('euler', 'rk4', ...), or keep the adaptive method "
                         "and pass options={'step_t': grid} to make its steps land on those times")
    grid = grid_constructor(func, y0, t)
    try:
        grid = torch.as_tensor(grid.detach() if isinstance(grid, torch.Tensor) else grid,
                               dtype=torch.float64).cpu().numpy()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"grid_constructor returned {type(grid).__name__}; it must return a 1-D tensor of "
                         "times") from None
    if grid.ndim != 1 or grid.size < 2 or grid[0] != values[0] or grid[-1] != values[-1]:
        got = f"{grid[0]:.6g} .. {grid[-1]:.6g}" if grid.ndim == 1 and grid.size >= 2 else f"shape {grid.shape}"
        raise InputError(f"grid_constructor must return a 1-D grid from t[0] = {values[0]:.6g} to t[-1] = "
                         f"{values[-1]:.6g} (torchdiffeq's contract), got {got}")
    steps = np.diff(grid) * np.sign(values[-1] - values[0])
    if not (steps > 0).all():
        raise InputError("grid_constructor must return strictly monotonic times, in the direction of t")
    return grid


def segments(plan: TimePlan, t: torch.Tensor) -> List[Segment]:
    """Split the output times ``t`` at the plan's jumps and add its stops, in the direction of ``t``.

    Each segment starts where the previous one ended; its first time is that boundary (for the
    first segment, ``t[0]``). A boundary that is an output time is returned by the segment that
    ends there.
    """
    values = t.detach().to("cpu", torch.float64).numpy()
    direction = 1.0 if len(values) < 2 or values[-1] > values[0] else -1.0
    entries = [(float(v), i) for i, v in enumerate(values)] + [(v, -1) for v in plan.stops]
    entries.sort(key=lambda entry: direction * entry[0])
    jumps = sorted(plan.jumps, key=lambda v: direction * v)
    pieces: List[List[Tuple[float, int]]] = [[]]
    for value, row in entries:
        while jumps and direction * value > direction * jumps[0]:
            boundary = jumps.pop(0)
            pieces[-1].append((boundary, -1))
            pieces.append([(boundary, -1)])
        if jumps and value == jumps[0]:  # an output time (or t[0]) at a jump: a boundary that is returned
            jumps.pop(0)
            pieces[-1].append((value, row))
            if row != 0:
                pieces.append([(value, -1)])
            continue
        pieces[-1].append((value, row))
    return [Segment(_stack_times(piece, t), tuple(row for _, row in piece)) for piece in pieces if len(piece) > 1
            or piece[0][1] == 0]


def _stack_times(piece: Sequence[Tuple[float, int]], t: torch.Tensor) -> torch.Tensor:
    """The segment's times as one tensor: the caller's own entries (with their autograd history) and constants."""
    return torch.stack([t[row] if row >= 0 else torch.tensor(value, dtype=t.dtype, device=t.device)
                        for value, row in piece])
