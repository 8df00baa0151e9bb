"""How f reaches a PETSc TS: as its right-hand side, or in implicit form (siblings, one per TS family).

* :class:`RHSForm`: ``dy/dt = f(t, y)`` as ``TSSetRHSFunction`` with the Jacobian shell as
  ``TSSetRHSJacobian`` (explicit RK, theta, cn, beuler: PETSc forms ``shift I - J`` itself).
* :class:`ImplicitForm`: ``F(t, y, y') = y' - f_I(t, y) = 0`` as ``TSSetIFunction``, with
  ``TSSetIJacobian`` putting ``shift I - J_I`` on the same shell (PETSc's ARKIMEX, whose adjoint
  needs the implicit form with an identity mass matrix). For a :class:`pnode.IMEX` split ``f_I``
  is its implicit part and its explicit part ``f_E`` becomes the right-hand side, stepped
  explicitly; for a plain f, ``f_I = f`` and there is no right-hand side, so ARKIMEX runs its
  implicit (ESDIRK) tableau alone. Its adjoint also reads ``df_E/dy`` and ``df_E/dp``: a plain f
  gets zero operators there.

The interface: ``form = formulation_for(solver, config, ts_type)``; ``form.attach(ts)`` sets the
TS's callbacks (after ``TSSetFromOptions`` chose the type); ``form.detach()`` forgets the last
call; ``form.destroy()`` frees what the form created. Callbacks evaluate and linearise f through
the active call's :class:`pnode._impl.evaluation.Evaluator` and :class:`pnode._impl.evaluation.Linearizer`
(``solver.active_call``), or through per-part copies of them for a split.
"""

from dataclasses import dataclass
from typing import Optional

from .._compat import PETSc
from .bridge import place_operator
from .config import SolverConfig
from .evaluation import Evaluator, Linearizer
from .methods import steps_explicitly, takes_implicit_form
from .operators import ParamJacobianShell, RHSJacobianShell, create_shell
from .rhs import RHS


def formulation_for(solver, config: SolverConfig, ts_type: str):
    """The form ``solver``'s TS of type ``ts_type`` takes f in."""
    return ImplicitForm(solver, config) if takes_implicit_form(ts_type) else RHSForm(solver)


class RHSForm:
    """``dy/dt = f``: the right-hand side and its Jacobian shells, served by the solver's own callbacks."""

    def __init__(self, solver):
        self.solver = solver

    def attach(self, ts) -> None:
        s = self.solver
        ts.setRHSFunction(s.rhs_function, None)  # explicit RK writes its stages; others get one made when needed
        ts.setRHSJacobian(s.rhs_jacobian, s.jacobian, s.jacobian)
        if s.param_jacobian is not None:
            # Explicit RK adjoints read dG/dp of the right-hand side; implicit ones (theta, cn,
            # beuler, ...) read dF/dp of F(udot, u) = udot - G(u), i.e. -dG/dp. Handing implicit
            # types the RHS form would make PETSc zero and AXPY into a copy of the shell.
            if steps_explicitly(ts.getType()):
                ts.setRHSJacobianP(s.param_jacobian_rhs, s.param_jacobian)
            else:
                ts.setIJacobianP(s.param_jacobian_implicit, s.param_jacobian)

    def detach(self) -> None:
        pass

    def destroy(self) -> None:
        pass


@dataclass
class _Part:
    """How one part of f is evaluated and linearised during one call."""

    evaluator: Evaluator
    linearizer: Linearizer


@dataclass
class _Parts:
    """The parts of f during one call (``explicit`` None for a plain f)."""

    call: object
    implicit: _Part
    explicit: Optional[_Part]


class ImplicitForm:
    """``F(t, y, y') = y' - f_I(t, y)``, and ``f_E`` as the right-hand side for a :class:`pnode.IMEX` split.

    The implicit part uses the solver's shells (``shift I - J_I`` on ``solver.jacobian``, ``-df_I/dp``
    on ``solver.param_jacobian``); the explicit part has shells of its own, zero for a plain f.
    """

    def __init__(self, solver, config: SolverConfig):
        self.solver = solver
        self.split = config.split
        self.residual = None
        self.explicit_jacobian = self.explicit_param_jacobian = None
        self._parts: Optional[_Parts] = None

    def attach(self, ts) -> None:
        s = self.solver
        n, comm = s.local_size, s.comm
        ts.setEquationType(PETSc.TS.EquationType.ODE_EXPLICIT)
        self.residual = s.solution.duplicate()
        ts.setIFunction(self.i_function, self.residual)
        ts.setIJacobian(self.i_jacobian, s.jacobian, s.jacobian)
        if self.split:
            ts.setRHSFunction(self.rhs_function, None)
        self.explicit_jacobian = create_shell(RHSJacobianShell(s.trap) if self.split else ZeroOperator(), n, n, comm)
        place_operator(self.explicit_jacobian, s.device)
        ts.setRHSJacobian(self.rhs_jacobian, self.explicit_jacobian, self.explicit_jacobian)
        if s.param_jacobian is not None:
            ts.setIJacobianP(self.i_jacobian_p, s.param_jacobian)
            self.explicit_param_jacobian = create_shell(ParamJacobianShell(s.trap) if self.split else ZeroOperator(),
                                                        n, s.param_size, comm)
            ts.setRHSJacobianP(self.rhs_jacobian_p, self.explicit_param_jacobian)

    def detach(self) -> None:
        self._parts = None
        for shell in (self.explicit_jacobian, self.explicit_param_jacobian):
            if shell is not None and self.split:
                shell.getPythonContext().linearization = None

    def destroy(self) -> None:
        self.detach()
        for obj in (self.residual, self.explicit_jacobian, self.explicit_param_jacobian):
            if obj is not None:
                obj.destroy()

    # ------------------------------------------------------------------ the parts of the active call
    def parts(self) -> _Parts:
        """The implicit (and explicit) part's evaluator and linearizer for the solver's active call."""
        call = self.solver.active_call
        if self._parts is None or self._parts.call is not call:
            if not self.split:
                self._parts = _Parts(call, _Part(call.evaluator, call.linearizer), None)
            else:
                self._parts = _Parts(call, self._part(call, "implicit"), self._part(call, "explicit"))
        return self._parts

    def _part(self, call, name: str) -> _Part:
        """Evaluator and linearizer of one part of the split, made like the call's own (same observer of
        the forward pass's steps, same stage times of the adjoint), counting into the same counter."""
        whole: RHS = call.linearizer.rhs
        rhs = RHS(getattr(whole.func, name), whole.layout, whole.params, whole.direction, whole.counter)
        rhs.difference_jvp = whole.difference_jvp
        observer = call.evaluator.observer if call.evaluator is not None else None
        evaluator = Evaluator(rhs, observer=observer)
        linearizer = Linearizer(rhs, False, stage_times=call.linearizer.stage_times, evaluated=evaluator.value_at)
        if name == "explicit" and self.explicit_param_jacobian is not None:
            self.explicit_param_jacobian.getPythonContext().use(rhs.params)
        return _Part(evaluator, linearizer)

    # ------------------------------------------------------------------ PETSc callbacks
    def i_function(self, ts, tau, u, udot, f) -> None:
        self.solver.trap.call(self._residual, ts, tau, u, udot, f)

    def _residual(self, ts, tau, u, udot, f) -> None:
        self.parts().implicit.evaluator.evaluate(ts, tau, u, f)
        f.aypx(-1.0, udot)  # F = udot - f_I

    def i_jacobian(self, ts, tau, u, udot, shift, jac, pre) -> None:
        self.solver.trap.call(self._point_implicit, tau, u, shift)

    def _point_implicit(self, tau, u, shift) -> None:
        shell = self.solver.jacobian
        context = shell.getPythonContext()
        context.reset(self.parts().implicit.linearizer.at(context.linearization, tau, u))
        shell.scale(-1.0)  # through PETSc, so that the operator's state changes and PCs set up again
        shell.shift(shift)

    def i_jacobian_p(self, ts, tau, u, udot, shift, jac_p) -> None:
        self.solver.trap.call(self._point_param, self.solver.jacobian, self.solver.param_jacobian,
                              self.parts().implicit, tau, u, -1.0)

    def rhs_function(self, ts, tau, u, f) -> None:
        self.solver.trap.call(lambda: self.parts().explicit.evaluator.evaluate(ts, tau, u, f))

    def rhs_jacobian(self, ts, tau, u, jac, pre) -> None:
        if self.split:
            self.solver.trap.call(self._point_explicit, tau, u)

    def _point_explicit(self, tau, u) -> None:
        context = self.explicit_jacobian.getPythonContext()
        context.reset(self.parts().explicit.linearizer.at(context.linearization, tau, u))

    def rhs_jacobian_p(self, ts, tau, u, jac_p) -> None:
        if self.split:
            self.solver.trap.call(self._point_param, self.explicit_jacobian, self.explicit_param_jacobian,
                                  self.parts().explicit, tau, u, 1.0)

    @staticmethod
    def _point_param(state_shell, param_shell, part: _Part, tau, u, sign: float) -> None:
        """Point ``param_shell`` at the part's linearization at ``(tau, u)`` (the one ``state_shell`` holds
        when it is the same point), as ``sign * df/dp``."""
        context = param_shell.getPythonContext()
        context.reset(part.linearizer.at(state_shell.getPythonContext().linearization, tau, u))
        if sign != 1.0:
            context.scale(param_shell, sign)


class ZeroOperator:
    """A MATPYTHON context for the zero operator (the explicit part of a plain f in implicit form)."""

    def mult(self, mat, x, y) -> None:
        y.zeroEntries()

    def multTranspose(self, mat, x, y) -> None:
        y.zeroEntries()

    def multAdd(self, mat, x, v, y) -> None:
        if y.handle != v.handle:
            v.copy(y)

    def multTransposeAdd(self, mat, x, v, y) -> None:
        if y.handle != v.handle:
            v.copy(y)
