"""The parameter gradient of an explicit RK adjoint, summed in torch from the state products' VJPs.

PETSc's ``TSAdjointStep_RK`` visits the stages ``i = s-1, ..., 0`` of a step of size ``h`` with
``w_i = lambda + sum_{j>i} a_ji / b_i dLambda_j`` and adds

    dLambda_i = -h b_i J_i^T w_i        and        dmu_i = -h b_i J_p,i^T w_i

(``-h`` in place of ``-h b_i`` where ``b_i = 0``, ``w_i`` then built without the division), ``h``
negative in the adjoint. Both products come from one VJP of the stage's graph. Given a parameter
gradient vector PETSc asks for the second product through two more callbacks per stage (pointing
``J_p`` at the stage, then applying it) and two vector operations; :class:`ParamGradientSum` takes
it instead from the VJP that served ``J^T``, with the same arithmetic (the factor ``-h b_i`` in
PETSc's real type, the product cast to PETSc's scalar, scaled, then added), and PETSc runs the
adjoint without a parameter vector.

Interface: ``ParamGradientSum.for_ts(ts, numels, one_device, device)`` (None where PETSc does not
export the tableau or the stages), then per stage :meth:`ParamGradientSum.point` (from the RHS
Jacobian callback, with the stage's Vec) and :meth:`ParamGradientSum.add` (from ``J^T``'s VJP).
"""

import ctypes
from typing import Dict, Optional, Sequence

import torch

from .._compat import PETSc, petsc_function, petsc_int
from .bridge import petsc_dtype
from .operators import pack_param_grads
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

    Attributes:
        total: ``(sum(numels),)``, PETSc's scalar dtype, on ``device``: the sum so far (zero at
            :meth:`for_ts`).
    """

    def __init__(self, weights: Dict[int, float], numels: Sequence[int], one_device: bool, device: torch.device):
        self._weights = weights  # stage Vec address -> b_i (PETSc's real)
        self._numels = tuple(numels)
        self._one_device = one_device
        self.total = torch.zeros(sum(self._numels), dtype=petsc_dtype(), device=device)
        self._product = torch.empty_like(self.total)
        self._factor = 0.0

    @classmethod
    def for_ts(cls, ts, numels: Sequence[int], one_device: bool, device: torch.device) -> Optional["ParamGradientSum"]:
        """A zero sum for ``ts`` (type rk, set up), or None where this PETSc does not export
        ``TSRKGetTableau`` or ``TSGetStages`` (PETSc's own ``J_p`` products then serve)."""
        tableau, handles = petsc_tableau(ts), stage_vec_handles(ts)
        if tableau is None or handles is None or len(handles) != len(tableau[1]):
            return None
        return cls(dict(zip(handles, tableau[1])), numels, one_device, device)

    def point(self, ts, stage_vec) -> None:
        """The next :meth:`add` is for the stage whose Vec is ``stage_vec``, in the step ``ts`` reverses."""
        h = PETSc.RealType(ts.getTimeStep())
        b = self._weights[stage_vec.handle]
        self._factor = float(-h * b) if b else float(-h)

    def add(self, param_grads) -> None:
        """Add ``factor * J_p^T w`` given ``J_p^T w`` as one gradient (or None) per parameter."""
        pack_param_grads(param_grads, self._numels, self._one_device, self._product)
        self._product.mul_(self._factor)
        self.total.add_(self._product)
