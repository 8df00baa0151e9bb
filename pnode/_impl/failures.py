"""What a failed solve tells the user: where it stopped, what PETSc tried, and what to change."""

from .._compat import PETSc, converged_reason_name
from .errors import SolverError
from .methods import stiff_method


def check_forward(solver, record, nonfinite_at) -> None:
    """Raise a :class:`SolverError` if the forward solve of ``solver`` did not reach every output time."""
    if len(record.step_of_output) == len(record.taus):
        return
    if nonfinite_at is not None:
        raise nonfinite_error(solver, nonfinite_at)
    ts = solver.ts
    t_user = solver.rhs.direction * ts.getTime()
    reason = ts.getConvergedReason()
    name = converged_reason_name(reason)
    where = f"the solve stopped at t={t_user:.6g} after {ts.getStepNumber()} steps ({name})"
    if reason >= 0:
        stiff = (f"; an explicit method that needs this many steps is often held by stability: if the problem is "
                 f"stiff, an implicit method steps with the solution (method={stiff_method()!r})"
                 if solver.explicit and solver.config.adaptive else "")
        raise SolverError(f"{where} before reaching the last output time "
                          f"{solver.rhs.direction * record.taus[-1]:.6g}: raise options['max_num_steps'] "
                          f"(or -ts_max_steps), or loosen rtol/atol{stiff}", t_reached=t_user, reason=name)
    if name == "DIVERGED_NONLINEAR_SOLVE":
        hint = newton_report(ts.getSNES())
    elif name == "DIVERGED_STEP_REJECTED" and ts.getSNESFailures():
        hint = (f"{ts.getSNESFailures()} Newton solves failed and the step attempts were retried smaller (a quarter "
                f"each time) until -ts_max_reject was reached; the last: {newton_report(ts.getSNES())}")
    elif name == "DIVERGED_STEP_REJECTED":
        hint = ("the step size fell below what the tolerances allow; the problem may be stiff (try "
                f"method={stiff_method()!r}, L-stable with error control), or loosen rtol/atol")
    else:
        hint = "see PETSc's -ts_monitor/-ts_adapt_monitor output for details"
    raise SolverError(f"{where}: {hint}", t_reached=t_user, reason=name)


def newton_report(snes) -> str:
    """What the last Newton solve tried and reached, and what to change."""
    rtol, atol, stol, max_it = snes.getTolerances()
    history, _ = snes.getConvergenceHistory()
    first = float(history[0]) if len(history) else float("nan")
    last = float(history[-1]) if len(history) else snes.getFunctionNorm()
    reason = _snes_reason_name(snes.getConvergedReason())
    ratio = last / first if first else float("nan")
    return (f"Newton failed to converge ({reason}) after {snes.getIterationNumber()} iterations and "
            f"{snes.getLinearSolveIterations()} Krylov iterations: residual {last:.3e} from {first:.3e} "
            f"(ratio {ratio:.2e}) against snes_rtol={rtol:g}, snes_atol={atol:g}, snes_stol={stol:g}, "
            f"snes_max_it={max_it}. Take smaller steps (options['step_size'], or error control: a "
            "method with an error estimate and no step_size retries a failed Newton solve with a smaller "
            "step), precondition with the per-sample Jacobian blocks (options={'jacobian': 'blocks'}), "
            "loosen the tolerance (options={'snes_rtol': 1e-4}) if the residual stalled at round-off, raise "
            "snes_max_it if it was still falling, or take one Newton step per stage "
            "(options={'implicit_solve': 'linear'}); -snes_monitor -ksp_converged_reason show each iteration")


def _snes_reason_name(reason: int) -> str:
    for name in dir(PETSc.SNES.ConvergedReason):
        if not name.startswith("_") and getattr(PETSc.SNES.ConvergedReason, name) == reason:
            return name
    return str(reason)


def nonfinite_error(solver, tau: float) -> SolverError:
    t_user = solver.rhs.direction * tau
    return SolverError(
        f"the solution became non-finite (NaN/inf) after t={t_user:.6g} (step {solver.ts.getStepNumber()}); "
        "the ODE may blow up in finite time, or the steps are too large for it: try smaller "
        f"options['step_size'], an adaptive method ('dopri5'), or an implicit one ({stiff_method()!r}, 'beuler')",
        t_reached=t_user, reason="NONFINITE_STATE")


def petsc_failure(solver, exc, phase: str) -> SolverError:
    """A PETSc error raised by ``solver``'s TS in ``phase`` ('forward', 'recomputation', 'adjoint')."""
    tau = solver.ts.getTime()
    t_user = solver.rhs.direction * tau if solver.rhs is not None else tau
    if "not-a-number" in str(exc):
        return nonfinite_error(solver, tau)
    hint = ("Run with -ts_monitor -ts_adapt_monitor -snes_converged_reason to see where."
            if phase != "adjoint" or solver.explicit else
            "The adjoint's transposed linear solve (GMRES, no preconditioner) did not converge: "
            "loosen ksp_rtol, raise ksp_max_it/ksp_gmres_restart, or take smaller steps; "
            "-ksp_converged_reason shows each solve.")
    return SolverError(f"PETSc failed in the {phase} solve at t={t_user:.6g}: {exc}. {hint}",
                       t_reached=t_user, reason=f"PETSC_ERROR_{exc.ierr}")
