"""What a solve ran and held, read back from PETSc: :class:`SolveStats` (``ODEBlock.stats``).

The configuration is read from the TS and its SNES/KSP after PETSc applied every option layer
(command line, ``options``, pnode's derived defaults), so a log line says what really ran.
"""

import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional

from .methods import THETA_TS_TYPES
from .rhs import EvaluationCounter


@dataclass
class SolveStats:
    """Counters, solver configuration and adjoint choice of the latest call(s) of one block.

    Attributes:
        counter: evaluations of f, JVPs and VJPs (:class:`pnode._impl.rhs.EvaluationCounter`).
        solver: the configuration PETSc ran in the latest forward pass (:func:`describe_solver`).
        adjoint: what the adjoint strategy chose and held in the latest differentiated call
            (:class:`pnode._impl.strategies.AdjointStats`), None before one.
        newton_iterations, krylov_iterations: PETSc's counts in the latest forward pass (implicit
            methods; 0 for explicit ones).
        next_step: the step size PETSc's controller proposed at the end of the latest forward pass
            (PETSc time): an integration split at a jump goes on with it.
        steps: steps the latest forward pass accepted.
        rejected_steps: step attempts it rejected and retried smaller: for the error estimate, or
            because a Newton solve failed (those are also in ``newton_failures``).
        newton_failures: Newton solves that did not converge in the latest forward pass (each
            rejected its step attempt, which PETSc retried with a quarter of the step).
    """

    counter: EvaluationCounter = field(default_factory=EvaluationCounter)
    solver: Dict[str, object] = field(default_factory=dict)
    adjoint: object = None
    newton_iterations: int = 0
    krylov_iterations: int = 0
    next_step: Optional[float] = None
    steps: int = 0
    rejected_steps: int = 0
    newton_failures: int = 0

    def record_forward(self, solver, adjoint_stats=None) -> None:
        self.solver = _descriptions.get(solver)
        if self.solver is None:  # a solver's configuration does not change: read it once
            self.solver = _descriptions[solver] = describe_solver(solver)
        ts = solver.ts
        self.newton_iterations = ts.getSNESIterations()
        self.krylov_iterations = ts.getKSPIterations()
        self.next_step = ts.getTimeStep()
        self.steps, self.rejected_steps, self.newton_failures = (ts.getStepNumber(), ts.getStepRejections(),
                                                                 ts.getSNESFailures())
        if adjoint_stats is not None:
            self.adjoint = adjoint_stats

    def summary(self) -> str:
        """One line: what PETSc ran (and, after a backward pass, what the adjoint held)."""
        text = format_solver(self.solver)
        if self.solver:
            text += f"; {self.steps} steps, {self.rejected_steps} rejected"
            if self.newton_iterations:
                text += (f" ({self.newton_failures} by failed Newton solves), {self.newton_iterations} Newton and "
                         f"{self.krylov_iterations} Krylov iterations")
        if self.adjoint is not None:
            a = self.adjoint
            text += (f"; adjoint: {a.strategy}, {a.steps} steps, {a.graphs_kept} graphs "
                     f"({a.graph_bytes / 1e6:.1f} MB), {a.states_stored} states ({a.stored_bytes / 1e6:.1f} MB)")
            if a.checkpoints is not None:
                text += f", K = {a.checkpoints}, {a.recomputed_steps} steps recomputed"
            if a.budget_bytes is not None:
                text += f", budget {a.budget_bytes / 1e6:.0f} MB"
        return text


# The configuration of each solver, read once (solvers are pooled and reused across calls).
_descriptions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def describe_solver(solver) -> Dict[str, object]:
    """The configuration of ``solver``'s TS as PETSc holds it (type, tableau, steps, Newton/Krylov)."""
    ts, config = solver.ts, solver.config
    info: Dict[str, object] = {"ts_type": ts.getType()}
    if info["ts_type"] == "rk":
        info["rk_type"] = ts.getRKType()
    if info["ts_type"] in THETA_TS_TYPES:
        info["theta"] = ts.getTheta()
    if info["ts_type"] == "arkimex":
        info["arkimex_type"] = ts.getARKIMEXType()
    info["steps"] = "adaptive" if config.adaptive else (
        f"fixed {config.step_size:g}" if config.step_size is not None else "one per output interval")
    info.update(solver.resolved_options)
    if not solver.explicit:
        snes = ts.getSNES()
        ksp = snes.getKSP()
        rtol, atol, stol, max_it = snes.getTolerances()
        info.update({"snes_type": snes.getType(), "snes_rtol": rtol, "snes_stol": stol, "snes_max_it": max_it,
                     "ksp_type": ksp.getType(), "pc_type": _pc_name(ksp.getPC()),
                     # Eisenstat-Walker sets the rtol of every linear solve from Newton's progress
                     "ksp_rtol": "Eisenstat-Walker" if snes.getUseEW() else ksp.getTolerances()[0],
                     "adjoint_ksp_rtol": config.adjoint_ksp_rtol, "jvp": config.jvp})
    return info


def _pc_name(pc) -> str:
    """The preconditioner's type, ``'blocks'`` for pnode's block-Jacobian preconditioner."""
    kind = pc.getType()
    if kind == "python" and type(pc.getPythonContext()).__name__ == "BlockJacobianPC":
        return "blocks"
    return kind


def format_solver(info: Dict[str, object]) -> str:
    """``describe_solver``'s dict as one readable line."""
    if not info:
        return "not run yet"
    method = info["ts_type"] + (f" {info['rk_type']}" if "rk_type" in info else "") + (
        f" {info['arkimex_type']}" if "arkimex_type" in info else "")
    if "theta" in info and info["ts_type"] == "theta":
        method += f" (theta {info['theta']:g})"
    parts = [f"TS {method}", f"steps {info['steps']}"]
    if info.get("ts_adapt_type") and info["steps"] == "adaptive":
        parts.append(f"adapt {info['ts_adapt_type']}")
    if "snes_type" in info:
        if info["snes_type"] != "ksponly":
            parts.append(f"SNES {info['snes_type']} rtol {info['snes_rtol']:.1e} stol {info['snes_stol']:.1e} "
                         f"max_it {info['snes_max_it']}")
        else:
            parts.append("SNES ksponly (one Newton step)")
        rtol = info["ksp_rtol"]
        shown = rtol if isinstance(rtol, str) else f"{rtol:.1e}"
        parts.append(f"KSP {info['ksp_type']}/{info['pc_type']} rtol {shown} "
                     f"(adjoint {info['adjoint_ksp_rtol']:.1e}), JVP by {info['jvp']}")
    if info.get("ts_trajectory_type"):
        parts.append(f"trajectory {info['ts_trajectory_type']}")
    return ", ".join(parts)

