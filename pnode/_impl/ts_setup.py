"""Setting a TS up: its callbacks and options, a new trajectory per recording solve, the first step."""

from contextlib import contextmanager
from typing import Dict, Tuple

import numpy as np
import torch

from .._compat import PETSc, has_revolve, save_trajectory, set_always_accept, trajectory_from_options, trajectory_type
from .config import SolverConfig
from .errors import InputError
from .formulation import formulation_for
from .methods import steps_explicitly, takes_implicit_form
from .options import scoped_options
from .rhs import RHS


def configure_ts(solver, config: SolverConfig, record: bool) -> Tuple[object, Dict[str, str], object]:
    """A TS for ``solver`` (a :class:`pnode._impl.solver.Solver` whose vectors and shells exist), the
    options PETSc objects do not report back through petsc4py, as the layers resolved them, and the
    form it takes f in (:mod:`pnode._impl.formulation`, chosen by the TS type the options resolved to)."""
    ts = PETSc.TS().create(comm=solver.comm)
    ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    if solver.tolerance_vectors is not None:
        ts.setTolerances(rtol=solver.tolerance_vectors[0], atol=solver.tolerance_vectors[1])
    else:
        ts.setTolerances(rtol=config.rtol, atol=config.atol)
    ts.setMaxSteps(config.max_num_steps)
    ts.setErrorIfStepFails(False)
    ts.setPreStep(solver.pre_step)
    ts.setPostStep(solver.post_step)
    if config.adaptive and (config.min_step is not None or config.max_step is not None):
        ts.setStepLimits(config.min_step or 0.0, config.max_step or PETSc.INFINITY)
    if config.prefix:
        ts.setOptionsPrefix(config.prefix)
    if record:
        save_trajectory(ts)
    with scoped_options(config.prefix, dict(config.petsc_options), config.derived_options()) as user_names:
        if record:
            _check_revolve(config.prefix)
        ts.setFromOptions()
        _check_used(user_names)
        _check_solution_only(ts, config.prefix)
        resolved = _resolved(ts, config.prefix)
    if not steps_explicitly(ts.getType()):
        ts.getSNES().setConvergenceHistory(reset=True)  # for the report when Newton fails
    form = formulation_for(solver, config, ts.getType())
    form.attach(ts)
    return ts, resolved, form


def _resolved(ts, prefix: str) -> dict:
    """Options PETSc objects do not report back through petsc4py, as the layers resolved them: the
    adaptor's type, and the trajectory's type as the trajectory holds it (a solver that records none
    reports the type its options give a recording solve)."""
    db = PETSc.Options()
    resolved = {name: db.getString(prefix + name) for name in ("ts_adapt_type", "ts_trajectory_type")
                if db.hasName(prefix + name)}
    kind = trajectory_type(ts)
    if kind is not None:
        resolved["ts_trajectory_type"] = kind
    return resolved


def renew_trajectory(ts, config: SolverConfig, solution_only: bool = False) -> None:
    """Give the TS a new trajectory, set up by the recording solve that follows.

    PETSc's memory trajectory sizes itself for the first solve it records (with fixed steps:
    from that solve's span and first step) and keeps its stack from one solve to the next. A
    later, longer solve on the same pooled TS (a longer span, or a checkpointing TS that recorded
    one step before) overran it, and reusing it after an adjoint run output interval by output
    interval left its stack inconsistent: PETSc crashed, at the latest when the TS was destroyed.
    A new trajectory costs its options (read by the trajectory alone, not the whole TS) and the
    allocation of its vectors. ``solution_only``: store states, not stages (PETSc re-takes a
    step to recover them), unless the options say otherwise.
    """
    ts.removeTrajectory()
    save_trajectory(ts)
    derived = dict(config.derived_options())
    if solution_only:
        derived["ts_trajectory_solution_only"] = "true"
    with scoped_options(config.prefix, dict(config.petsc_options), derived):
        trajectory_from_options(ts)


@contextmanager
def accepting_every_step(ts, accept: bool = True):
    """Within the block PETSc's controller accepts every step (if ``accept``): a step whose size is
    chosen (the step to an event), or a re-taken implicit step. A re-taken implicit step solves its
    stages again to Newton's tolerance (ARKIMEX also recomputes its first stage's derivative after
    the restart instead of taking the previous step's), so its error estimate can differ from the
    original's by as much and flip a close decision: kencarp4 re-took 9 recorded steps in 10."""
    if not accept:
        yield
        return
    set_always_accept(ts, True)
    try:
        yield
    finally:
        set_always_accept(ts, False)


def starting_step(config: SolverConfig, rhs: RHS, taus: np.ndarray, y0: torch.Tensor, comm,
                  tolerances=None) -> float:
    """The first step's size: ``step_size``, the output interval, ``first_step``, or an estimate
    (with the call's per-entry ``(rtol, atol)`` when it has them)."""
    if config.step_size is not None:
        return config.step_size
    if not config.adaptive:
        return float(taus[1] - taus[0])
    step = config.first_step
    if step is None:
        rtol, atol = tolerances if tolerances is not None else (config.rtol, config.atol)
        step = initial_step(rhs, rtol, atol, config.method.order, float(taus[0]), y0, comm,
                            span=float(taus[-1] - taus[0]))
    # TSAdapt bounds the steps it chooses, not the one it is given: bound the first as torchdiffeq does
    return min(max(step, config.min_step or 0.0), config.max_step or float("inf"))


def initial_step(rhs: RHS, rtol, atol, order: int, tau0: float, y0: torch.Tensor, comm,
                 span: float = float("inf")) -> float:
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4), in PETSc's weighted RMS norm,
    at most ``span`` (``y0``: the initial state, flat, PETSc dtype, on the solver's device; ``order``:
    the method's; ``rtol``, ``atol``: numbers or per-entry tensors like ``y0``)."""
    scale = atol + rtol * y0.abs()
    f0 = rhs.evaluate(tau0, y0).to(y0)
    d0, d1 = _rms(y0 / scale, comm), _rms(f0 / scale, comm)
    h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, span)
    f1 = rhs.evaluate(tau0 + h0, y0 + h0 * f0).to(y0)
    d2 = _rms((f1 - f0) / scale, comm) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, span)


def _rms(x: torch.Tensor, comm) -> float:
    local = np.array([float(torch.sum(x * x)), float(x.numel())])
    if comm.getSize() > 1:
        local = comm.tompi4py().allreduce(local)
    return float(np.sqrt(local[0] / max(local[1], 1.0)))


def _check_used(names) -> None:
    db = PETSc.Options()
    used = getattr(db, "used", None)
    if used is None:
        return
    unused = [n for n in names if not used(n)]
    if unused:
        raise InputError(f"options {unused} were not used by PETSc: they are neither pnode options "
                         "(step_size, first_step, min_step, max_step, max_num_steps, theta, adjoint, checkpoints, "
                         "checkpoint_graphs, memory_budget, implicit_solve, jvp, jacobian) nor PETSc options this "
                         "solver reads; "
                         "check the spelling (PETSc names are e.g. 'ts_trajectory_type', 'ksp_rtol', 'snes_max_it')")


def _check_solution_only(ts, prefix: str) -> None:
    """Refuse a solution-only trajectory for ARKIMEX: PETSc's re-take of its steps in the adjoint gave
    gradients 65 % off (kencarp4 on a small MLP field; cn's were right to 1e-20)."""
    db = PETSc.Options()
    name = prefix + "ts_trajectory_solution_only"
    if takes_implicit_form(ts.getType()) and db.hasName(name) and db.getBool(name, False):
        raise InputError(f"-{name} is not supported with TS {ts.getType()} (kencarp*): PETSc's adjoint re-takes its "
                         "steps from a solution-only trajectory wrongly (gradients far off); leave the stages in the "
                         "trajectory (the default), or use checkpoints=K to bound memory")


def _check_revolve(prefix: str) -> None:
    """Refuse PETSc's limited-memory trajectory up front on a build without Revolve (it fails mid-solve)."""
    db = PETSc.Options()
    asked = [prefix + name for name in ("ts_trajectory_max_cps_ram", "ts_trajectory_max_cps_disk")
             if db.hasName(prefix + name)]
    if asked and not has_revolve():
        raise InputError(f"-{asked[0]} needs PETSc configured with Revolve, which this PETSc lacks; use pnode's "
                         "own checkpointing instead: options={'checkpoints': K} or -pnode_checkpoints K "
                         "(at most K states held, binomial schedule, same gradients)")
