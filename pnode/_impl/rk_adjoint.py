"""The parameter gradient of an explicit RK adjoint, summed from the VJPs that serve ``J^T``.

PETSc's ``TSAdjointStep_RK`` visits the stages ``i = s-1, ..., 0`` of a step of size ``h`` with
``w_i = lambda + sum_{j>i} a_ji / b_i dLambda_j`` and adds

    dLambda_i = -h b_i J_i^T w_i        and        dmu_i = -h b_i J_p,i^T w_i

(``-h`` in place of ``-h b_i`` where ``b_i = 0``, ``w_i`` then built without the division), ``h``
negative in the adjoint. Both products come from one VJP of the stage's graph. Given a parameter
gradient vector PETSc asks for the second product through two more callbacks per stage (pointing
``J_p`` at the stage, then applying it); :class:`ParamGradientSum` takes it instead from the VJP
that served ``J^T``, with the same arithmetic (the factor ``-h b_i`` in PETSc's real type, the
product cast into a PETSc Vec, scaled and added by PETSc), and PETSc runs the adjoint without a
parameter vector. PETSc 3.18's own ``dmu_i`` is wrong for zero-weight stages; this sum is not.

Interface: ``ParamGradientSum.for_ts(ts, pack, total, product)`` (None where PETSc does not
export the tableau or the stages; ``pack(param_grads, target)``: the parameter Jacobian shell's
packing, ``total``: the parameter gradient Vec, ``product``: a work Vec like it), then per stage
:meth:`ParamGradientSum.point` (from the RHS Jacobian callback, with the stage's Vec) and
:meth:`ParamGradientSum.add` (from ``J^T``'s VJP).
"""

import ctypes
from typing import Callable, Dict, Optional, Sequence

from .._compat import PETSc, petsc_function, petsc_int
from .bridge import writable_view
from .tableaus import petsc_tableau


def stage_vec_handles(ts) -> Optional[Sequence[int]]:
    """Addresses of the TS's stage Vecs ``Y_0 .. Y_{s-1}`` (``TSGetStages``), or None."""
    get = petsc_function("TSGetStages", ctypes.c_int, None)
    if get is None:
        return None
    count, stages = petsc_int()(), ctypes.POINTER(ctypes.c_void_p)()
    if get(ctypes.c_void_p(ts.handle), ctypes.byref(count), ctypes.byref(stages)) != 0 or not stages:
        return None
    return [stages[i] for i in range(count.value)]


class ParamGradientSum:
    """``mu = sum over steps and stages of -h b_i J_p,i^T w_i`` for one adjoint pass of an explicit RK TS.

    ``total`` (the parameter gradient, zeroed here) and ``product`` are PETSc Vecs of the local
    parameter size; each :meth:`add` packs ``J_p^T w`` into ``product`` (one cast), then scales and
    adds it with PETSc's own ``VecScale`` and ``VecAXPY``, as ``TSAdjointStep_RK`` would (three
    torch operations per stage cost more than the two callbacks they replace).
    """

    def __init__(self, weights: Dict[int, float], pack: Callable, total, product):
        self._double = PETSc.RealType().itemsize == 8
        # stage Vec address -> b_i (PETSc's real; a Python float, whose arithmetic is double's)
        self._weights = {k: float(b) for k, b in weights.items()} if self._double else weights
        self._pack = pack
        self._total, self._product = total, product
        self._factor: Optional[float] = None  # the pointed stage's -h b_i, until its add
        total.zeroEntries()

    @classmethod
    def for_ts(cls, ts, pack: Callable, total, product) -> Optional["ParamGradientSum"]:
        """A zero sum into ``total`` for ``ts`` (type rk, set up), or None where this PETSc does not
        export ``TSRKGetTableau`` or ``TSGetStages`` (PETSc's own ``J_p`` products then serve)."""
        tableau, handles = petsc_tableau(ts), stage_vec_handles(ts)
        if tableau is None or handles is None or len(handles) != len(tableau[1]):
            return None
        return cls(dict(zip(handles, tableau[1])), pack, total, product)

    def point(self, ts, stage_vec) -> None:
        """The next :meth:`add` is for the stage whose Vec is ``stage_vec``, in the step ``ts`` reverses."""
        b = self._weights[stage_vec.handle]
        if self._double:
            h = ts.getTimeStep()
            self._factor = -h * b if b else -h
        else:
            h = PETSc.RealType(ts.getTimeStep())
            self._factor = float(-h * b) if b else float(-h)

    def add(self, param_grads) -> None:
        """Add ``factor * J_p^T w`` given ``J_p^T w`` as one gradient (or None) per parameter."""
        if self._factor is None:
            raise RuntimeError("PETSc applied J^T without pointing the Jacobian at a stage first: "
                               "the stage's weight -h b_i is unknown (pnode's explicit RK adjoint needs both)")
        self._pack(param_grads, writable_view(self._product))
        self._product.scale(self._factor)
        self._total.axpy(1.0, self._product)
        self._factor = None
