"""torchdiffeq's step callbacks, called as PETSc steps: ``func.callback_step`` and its siblings.

A ``func`` (usually an ``nn.Module``) may define any of these methods, with torchdiffeq's names
and signature ``callback(t0, y0, dt)``:

* ``callback_step``: before every step attempt of the forward solve, from time ``t0`` and state
  ``y0`` with a step of size ``dt``;
* ``callback_accept_step`` / ``callback_reject_step``: after that attempt was accepted / rejected
  by the adaptive controller (adaptive methods only; with fixed steps every step is accepted and,
  as in torchdiffeq, only ``callback_step`` is called);
* ``callback_step_adjoint``, ``callback_accept_step_adjoint``: before / after every step of the
  backward pass. pnode's discrete adjoint reverses each accepted forward step once, from its end
  ``t0`` back to its start, so there ``y0`` is the adjoint state ``dL/dy(t0)`` (shaped like the
  state) and ``callback_reject_step_adjoint`` is never called.

``t0`` and ``dt`` are 0-dim tensors of ``t``'s dtype on the state's device; ``t0`` is in the
caller's time (decreasing ``t`` included) and ``dt > 0`` is the step's length; ``y0`` is a copy,
shaped like ``y0`` (a tuple for a tuple state). Recomputations (checkpointing, a second backward
pass through a retained graph) call no forward callback.

PETSc has no Python hook per step attempt (a rejected step is retried inside ``TSStep``), so the
callbacks hang on ``TSSetPreStage`` and ``TSAdjointMonitorSet`` through the C API: an attempt
starts at the first stage with a new (step number, step size), and it was accepted when the step
number moved on by the next one (or the solve ended).
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from .._compat import PETSC_ERR_PYTHON, adjoint_monitor_type, pre_stage_type, set_adjoint_monitor, set_pre_stage
from .bridge import StateLayout, vec_to_tensor

_NAMES = {"step": "callback_step", "accept": "callback_accept_step", "reject": "callback_reject_step"}


@dataclass(frozen=True)
class StepCallbacks:
    """The step callbacks of one ``func``, and how to hand them PETSc's steps.

    Attributes:
        forward: ``'step'``/``'accept'``/``'reject'`` -> the callable, for the forward solve.
        adjoint: ``'step'``/``'accept'`` -> the callable, for the backward pass.
        layout: the state's layout (``y0`` is handed over shaped like it).
        direction: +1.0 or -1.0: user time is ``direction * `` PETSc time.
        time_dtype: the dtype of ``t0`` and ``dt`` (``t``'s).
    """

    forward: Dict[str, Callable]
    adjoint: Dict[str, Callable]
    layout: StateLayout
    direction: float
    time_dtype: torch.dtype

    def time(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=self.time_dtype, device=self.layout.device)

    def state(self, vec) -> object:
        """A copy of the local part of ``vec``, shaped like the state, in the state's dtype and device."""
        return self.layout.unflatten(vec_to_tensor(vec, self.layout.dtype, self.layout.device))


def find_step_callbacks(func, layout: StateLayout, direction: float, time_dtype: torch.dtype,
                        adaptive: bool, method: str) -> Optional[StepCallbacks]:
    """The torchdiffeq step callbacks ``func`` defines, or None when it defines none.

    With fixed steps only ``callback_step`` (and ``callback_step_adjoint``) are called, as in
    torchdiffeq; defining the accept/reject ones then warns instead of being silently ignored.
    """
    forward = {kind: getattr(func, name) for kind, name in _NAMES.items() if callable(getattr(func, name, None))}
    adjoint = {kind: getattr(func, name + "_adjoint") for kind, name in _NAMES.items()
               if callable(getattr(func, name + "_adjoint", None))}
    if not adaptive:
        dropped = [_NAMES[kind] for kind in ("accept", "reject") if forward.pop(kind, None)]
        dropped += [_NAMES[kind] + "_adjoint" for kind in ("accept", "reject") if adjoint.pop(kind, None)]
        if dropped:
            warnings.warn(f"method {method!r} takes fixed steps and accepts every one: {', '.join(dropped)} will "
                          "not be called (callback_step and callback_step_adjoint are, as in torchdiffeq)",
                          stacklevel=4)
    if adjoint.pop("reject", None):
        warnings.warn("callback_reject_step_adjoint will not be called: pnode's discrete adjoint reverses the "
                      "accepted steps, it rejects none", stacklevel=4)
    if not forward and not adjoint:
        return None
    return StepCallbacks(forward, adjoint, layout, direction, time_dtype)


class _Attempts:
    """Turns "an attempt started" / "it was accepted or rejected" into the user's calls."""

    def __init__(self, calls: Dict[str, Callable], trap):
        self.calls = calls
        self.trap = trap
        self.pending: Optional[Tuple[object, torch.Tensor, object, torch.Tensor]] = None  # (key, t0, y0, dt)

    def begin(self, key, t0: torch.Tensor, y0, dt: torch.Tensor) -> None:
        self.pending = (key, t0, y0, dt)
        self._call("step", t0, y0, dt)

    def end(self, accepted: bool) -> None:
        if self.pending is not None:
            _, t0, y0, dt = self.pending
            self.pending = None
            self._call("accept" if accepted else "reject", t0, y0, dt)

    def _call(self, kind: str, t0, y0, dt) -> None:
        if kind in self.calls:
            self.calls[kind](t0, y0, dt)

    def guarded(self, body) -> int:
        """Run ``body`` for a C callback: an exception goes to the solver's trap (re-raised after PETSc unwinds)."""
        try:
            body()
            return 0
        except BaseException as exc:  # handed to the solver's trap, re-raised once PETSc unwinds
            if self.trap.error is None:
                self.trap.error = exc
            return PETSC_ERR_PYTHON


@contextmanager
def forward_step_callbacks(callbacks: Optional[StepCallbacks], solver) -> Iterator[None]:
    """Call the forward step callbacks during the solves of ``solver`` inside the block."""
    if callbacks is None or not callbacks.forward:
        yield
        return
    ts = solver.ts
    attempts = _Attempts(callbacks.forward, solver.trap)

    def attempt():
        key = (ts.getStepNumber(), ts.getTimeStep())
        if attempts.pending is not None and attempts.pending[0] == key:
            return  # a later stage of the same attempt
        if attempts.pending is not None:
            attempts.end(accepted=key[0] != attempts.pending[0][0])
        attempts.begin(key, callbacks.time(callbacks.direction * ts.getTime()), callbacks.state(ts.getSolution()),
                       callbacks.time(abs(ts.getTimeStep())))

    hook = pre_stage_type()(lambda ts_handle, stage_time: attempts.guarded(attempt))
    set_pre_stage(ts, hook)
    try:
        yield
        attempts.end(accepted=True)  # the solve completed: its last attempt was accepted
    finally:
        set_pre_stage(ts, None)


@contextmanager
def adjoint_step_callbacks(callbacks: Optional[StepCallbacks], solver) -> Iterator[None]:
    """Call the adjoint step callbacks during the adjoint solves of ``solver`` inside the block.

    PETSc calls its adjoint monitor before every adjoint step, with the step number about to be
    reversed and its end time, and once more at step 0 when the adjoint reaches the initial time.
    """
    if callbacks is None or not callbacks.adjoint:
        yield
        return
    ts = solver.ts
    attempts = _Attempts(callbacks.adjoint, solver.trap)

    def monitor(step: int, time: float):
        attempts.end(accepted=True)
        if step > 0:
            attempts.begin(None, callbacks.time(callbacks.direction * time), callbacks.state(solver.adjoint_state),
                           callbacks.time(abs(ts.getTimeStep())))

    hook = adjoint_monitor_type()(lambda ts_handle, step, time, *rest: attempts.guarded(lambda: monitor(step, time)))
    set_adjoint_monitor(ts, hook)
    try:
        yield
        attempts.end(accepted=True)
    finally:
        set_adjoint_monitor(ts, None)
