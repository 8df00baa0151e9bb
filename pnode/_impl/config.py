"""How one solver is configured: :class:`SolverConfig` and the PETSc options pnode derives from it.

The derived options are the lowest layer of :mod:`pnode._impl.options` (``options={...}`` and the command
line override each of them). For implicit methods they set Newton-Krylov up for a neural
right-hand side; see :meth:`SolverConfig.derived_options` and ``docs/implicit.md``.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .methods import Method
from .options import command_line_names

# Newton's relative tolerance, in units of the round-off of the arithmetic f is evaluated in: a
# float32 network in a float64 PETSc resolves its residual to ~1e-7 of its size, so PETSc's
# default 1e-8 can never be met there and Newton diverges; 100 units stop well above that noise.
NEWTON_RTOL_ULPS = 100.0
# Newton stops when its update is this many round-off units of the state (it only moves in noise).
NEWTON_STOL_ULPS = 10.0
# Under error control, Newton solves to at most this fraction of rtol (stage errors at the level of
# the tolerance made kencarp5 on Robertson at rtol 1e-10 take 4672 steps instead of 832).
NEWTON_PER_RTOL = 1e-2
# The adjoint's transposed linear solves: tighter than Newton (they carry the gradient), but
# above the noise floor of the Jacobian products (which run in the state's dtype), and no
# tighter than unpreconditioned GMRES reaches on stiff systems (it breaks down at 1e-8 on
# Robertson's kinetics, whose I - h J has a condition number of ~1e8). Ten times PETSc's default.
ADJOINT_KSP_RTOL_ULPS = 10.0
ADJOINT_KSP_RTOL_FLOOR = 1e-6
# ... and preconditioned by the exact per-sample blocks (pnode._impl.block_jacobian), GMRES reaches round-off.
BLOCKS_ADJOINT_KSP_RTOL_FLOOR = 1e-12
# Below this resolution (float64 arithmetic) Newton keeps PETSc's accurate linear solves: with
# Eisenstat-Walker's loose early solves, Newton's step test declared badly scaled stiff systems
# (Robertson's, species from 1 to 1e-5) converged too early.
LOW_RESOLUTION = 1e-10
# The preconditioner of ``jacobian='blocks'``, as PETSc's ``-pc_python_type`` names it.
BLOCK_JACOBIAN_PC = "pnode._impl.block_jacobian.BlockJacobianPC"


@dataclass(frozen=True)
class SolverConfig:
    """Everything that fixes how a TS is configured (hashable: it is part of the cache key).

    Times are in PETSc's (increasing) time units, i.e. absolute values of the user's steps.

    Attributes:
        resolution: the relative round-off of the arithmetic f is evaluated in: machine epsilon of
            the coarser of the state's dtype and PETSc's real type (1.2e-7 for a float32 state,
            2.2e-16 for float64 on a default PETSc). Newton and Krylov tolerances scale with it.
        implicit_solve: ``'newton'`` (solve each implicit step to the Newton tolerance) or
            ``'linear'`` (one Newton step from the previous state: a linearly implicit method of
            the same order; PETSc's ``ksponly``).
        jvp: how Newton-Krylov's Jacobian-vector products are taken: ``'autodiff'`` (exact, by
            reverse mode twice: about one evaluation of f each once a linearization's transposed
            graph is built, see :meth:`pnode._impl.rhs.Linearization.jvp`) or ``'difference'`` (one evaluation of f,
            accurate to about the square root of ``resolution``; the Newton residual itself is
            exact, so only the convergence rate feels it). The adjoint's products are VJPs either way.
        vector_tolerances: ``rtol``/``atol`` are given per entry with each call (PETSc's vector
            tolerances); ``rtol``/``atol`` then hold their largest values, for display.
        jacobian: what preconditions GMRES in implicit steps: ``'blocks'`` (the dense per-sample
            Jacobian blocks, factorised by one batched LU: :mod:`pnode._impl.block_jacobian`) or
            ``'matrix_free'`` (no preconditioner: nothing but Jacobian-vector products).
        split: ``func`` is a :class:`pnode.IMEX` split (part of the key: an IMEX method hands PETSc
            its explicit part as the right-hand side, see :mod:`pnode._impl.formulation`).
    """

    method: Method
    rtol: float
    atol: float
    step_size: Optional[float] = None
    first_step: Optional[float] = None
    min_step: Optional[float] = None
    max_step: Optional[float] = None
    max_num_steps: int = 2**31 - 1
    petsc_options: Tuple[Tuple[str, str], ...] = ()
    prefix: str = ""
    resolution: float = 2.220446049250313e-16
    implicit_solve: str = "newton"
    jvp: str = "autodiff"
    vector_tolerances: bool = False
    jacobian: str = "matrix_free"
    split: bool = False

    @property
    def adaptive(self) -> bool:
        return self.method.adaptive and self.step_size is None

    @property
    def adjoint_ksp_rtol(self) -> float:
        """Relative tolerance of an implicit adjoint step's transposed linear solve: the ``ksp_rtol``
        the caller gave, else ``max(1e-6, 10 * resolution)``, or with ``jacobian='blocks'``
        ``max(1e-12, 10 * resolution)``."""
        given = dict(self.petsc_options).get("ksp_rtol")
        if given is not None:
            return float(given)
        if self.jacobian == "blocks":  # preconditioned GMRES reaches round-off in an iteration or two
            return max(BLOCKS_ADJOINT_KSP_RTOL_FLOOR, ADJOINT_KSP_RTOL_ULPS * self.resolution)
        return max(ADJOINT_KSP_RTOL_FLOOR, ADJOINT_KSP_RTOL_ULPS * self.resolution)

    @property
    def adjoint_ksp_type(self) -> str:
        """The Krylov method of an implicit adjoint step's transposed solve: GMRES, iterated to
        :attr:`adjoint_ksp_rtol` (the forward pass's ``preonly`` with ``jacobian='blocks'`` would trust
        the blocks to be the whole Jacobian, which a ``func`` that couples samples breaks)."""
        return "gmres"

    def derived_options(self) -> Dict[str, object]:
        """The PETSc options that express ``method`` and the step settings (lowest precedence)."""
        opts: Dict[str, object] = {"ts_type": self.method.ts_type,
                                   "ts_adapt_type": "basic" if self.adaptive else "none",
                                   "ts_trajectory_type": "memory"}
        if self.method.rk_type is not None:
            opts["ts_rk_type"] = self.method.rk_type
        if self.method.theta is not None:
            opts["ts_theta_theta"] = self.method.theta
        if self.method.arkimex_type is not None:
            opts["ts_arkimex_type"] = self.method.arkimex_type
        if self.method.implicit and self.adaptive:
            # a Newton solve that fails rejects the step, which is retried smaller (TSAdapt's
            # scale_solve_failed, 0.25), up to ts_max_reject times per step, instead of ending the solve
            opts["ts_max_snes_failures"] = -1
        opts.update(self.newton_options())
        return opts

    def newton_options(self) -> Dict[str, object]:
        """Newton-Krylov on matrix-free shell Jacobians, scaled to what f's arithmetic resolves.

        - GMRES without a preconditioner (a shell has no entries to build one from), or with
          ``jacobian='blocks'`` the per-sample Jacobian blocks, LU-factorised, as the linear solve
          (``preonly`` with PETSc's PCPYTHON running :class:`pnode._impl.block_jacobian.BlockJacobianPC`);
        - Newton's relative tolerance ``100 * resolution``, at least PETSc's 1e-8, or under error
          control ``min(1e-8, rtol / 100)``, and a step tolerance of ``10 * resolution`` (at least
          the same): a float32 network cannot get its residual below ~1e-7 of its size, where
          PETSc's defaults would make every solve fail;
        - for float32 arithmetic, Eisenstat-Walker forcing: early Newton iterations solve their
          linear systems loosely (float64 states, and a ``ksp_rtol`` the caller sets, keep that
          tolerance);
        - a full Newton step (no line search): each step starts from the previous state, close to
          the solution, and a backtracking search in round-off noise only fails;
        - with ``implicit_solve='linear'``, one Newton step (``ksponly``) whose linear solve meets
          the same relative tolerance.
        """
        rtol = max(min(1e-8, NEWTON_PER_RTOL * self.rtol) if self.adaptive else 1e-8,
                   NEWTON_RTOL_ULPS * self.resolution)
        opts: Dict[str, object] = {"ksp_type": "gmres", "pc_type": "none"}
        if self.jacobian == "blocks":
            # a Newton iteration with the block Jacobian, LU-solved (exact when f is per-sample), unless
            # the caller tunes the Krylov solve; the adjoint's transposed solves iterate GMRES with it
            # to their tolerance (adjoint_ksp_type)
            opts.update({"pc_type": "python", "pc_python_type": BLOCK_JACOBIAN_PC})
            if not self._ksp_options_given():
                opts["ksp_type"] = "preonly"
        if self.implicit_solve == "linear":
            opts.update({"snes_type": "ksponly", "ksp_rtol": rtol})
            return opts
        opts.update({"snes_type": "newtonls", "snes_linesearch_type": "basic",
                     "snes_rtol": rtol, "snes_stol": max(min(1e-8, rtol), NEWTON_STOL_ULPS * self.resolution),
                     "snes_max_it": 20})
        if self.resolution > LOW_RESOLUTION and not self._ksp_rtol_given():
            opts["snes_ksp_ew"] = "true"
        return opts

    def _given_names(self) -> List[str]:
        """The PETSc options the caller set, in ``options`` or on the command line (unprefixed, or with
        this solver's prefix, which is removed)."""
        prefix = self.prefix
        return [name for name, _ in self.petsc_options] + [
            name[len(prefix):] if name.startswith(prefix) else name for name in command_line_names()]

    def _ksp_rtol_given(self) -> bool:
        """Whether the caller set the linear tolerance, which Eisenstat-Walker would otherwise override."""
        return "ksp_rtol" in self._given_names()

    def _ksp_options_given(self) -> bool:
        """Whether the caller set a Krylov option (``ksp_*``): its linear solves then iterate (GMRES
        preconditioned by the blocks) instead of taking the blocks' LU."""
        return any(name.startswith("ksp_") for name in self._given_names())
