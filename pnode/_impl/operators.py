"""Matrix-free PETSc operators: the RHS Jacobian ``J = df/du`` and ``J_p = df/dp`` as shell matrices.

PETSc never sees a dense Jacobian. TS asks for products with these operators: ``J v`` in Newton-
Krylov solves of implicit methods (a torch JVP), ``J^T x`` and ``J_p^T x`` in TSAdjoint (one torch
VJP through the network). TS also scales and shifts the RHS Jacobian in place to form
``shift*I - J`` for implicit methods, so each shell records a scale and a shift:
``A x = scale * (op x) + shift * x``.
"""

from typing import Optional, Tuple

import torch

from .._compat import PETSc
from .bridge import tensor_into_vec, vec_key, vec_view, writable_view
from .errors import CallbackErrorTrap
from .rhs import Linearization


class _ScaledShell:
    """Scale/shift bookkeeping for a MATPYTHON context (``MatScale``/``MatShift`` on a shell)."""

    def __init__(self, trap: CallbackErrorTrap):
        self.trap = trap
        self.linearization: Optional[Linearization] = None
        self.scale_factor = 1.0
        self.shift_amount = 0.0

    def reset(self, linearization: Linearization) -> None:
        """Point the operator at a new linearization, as if freshly assembled (scale 1, shift 0)."""
        self.linearization = linearization
        self.scale_factor = 1.0
        self.shift_amount = 0.0

    def scale(self, mat, alpha) -> None:
        self.scale_factor *= float(alpha)
        self.shift_amount *= float(alpha)

    def shift(self, mat, alpha) -> None:
        self.shift_amount += float(alpha)

    def _store(self, result: torch.Tensor, x, y) -> None:
        if self.scale_factor != 1.0:
            result = result * self.scale_factor
        if self.shift_amount != 0.0:
            result = result + self.shift_amount * vec_view(x).to(result)
        tensor_into_vec(result, y)


class RHSJacobianShell(_ScaledShell):
    """``scale * df/du + shift * I`` applied by JVPs (``mult``) and VJPs (``multTranspose``).

    ``param_sum``: where each VJP's parameter part also goes (an explicit RK adjoint's
    :class:`pnode._impl.rk_adjoint.ParamGradientSum`), or None.
    """

    def __init__(self, trap: CallbackErrorTrap):
        super().__init__(trap)
        self.param_sum = None

    def mult(self, mat, x, y) -> None:
        self.trap.call(self._mult, x, y)

    def multTranspose(self, mat, x, y) -> None:
        self.trap.call(self._mult_transpose, x, y)

    def _mult(self, x, y) -> None:
        self._store(self.linearization.jvp(vec_view(x)), x, y)

    def _mult_transpose(self, x, y) -> None:
        state_grad, param_grads = self.linearization.vjp(vec_view(x), vec_key(x))
        self._store(state_grad, x, y)
        if self.param_sum is not None:
            self.param_sum.add(param_grads)


class ParamJacobianShell(_ScaledShell):
    """``scale * df/dp`` applied transposed (``multTranspose``): the parameter part of the VJP.

    The parameter gradients are packed, in ``params`` order, into the local part of the PETSc
    parameter vector; a parameter that ``f`` does not use contributes zeros.
    """

    def __init__(self, trap: CallbackErrorTrap):
        super().__init__(trap)
        self.param_numels: Tuple[int, ...] = ()
        self.one_device = True  # every parameter (so its gradient) is on one device

    def use(self, params) -> None:
        """The parameters of the next solves (their sizes and devices, read once per call)."""
        self.param_numels = tuple(p.numel() for p in params)
        self.one_device = len({p.device for p in params}) <= 1

    def multTranspose(self, mat, x, y) -> None:
        self.trap.call(self._param_vjp, x, y)

    def pack(self, param_grads, target: torch.Tensor) -> None:
        """Write the parameters' gradients (None: zeros) into ``target`` (see :func:`pack_param_grads`)."""
        pack_param_grads(param_grads, self.param_numels, self.one_device, target)

    def _param_vjp(self, x, y) -> None:
        _, param_grads = self.linearization.vjp(vec_view(x), vec_key(x))
        target = writable_view(y)
        self.pack(param_grads, target)
        if self.scale_factor != 1.0:
            target.mul_(self.scale_factor)


# torch's concatenation of flattened tensors (its data-parallel code's), where this torch has it
_flatten = getattr(getattr(torch._C, "_nn", None), "flatten_dense_tensors", None)


def pack_param_grads(param_grads, numels: Tuple[int, ...], one_device: bool, target: torch.Tensor) -> None:
    """Write one gradient (or None: zeros) per parameter, flattened in order, into ``target``.

    One flatten in the gradients' dtype (torch's C++ one: half the time of reshapes and a
    concatenation), then one cast into ``target``: a cast per parameter, or a concatenation that
    casts, costs several times more on small networks. ``one_device``: every gradient is on one
    device (else each is moved to ``target``'s first).
    """
    if len(param_grads) == 1:
        if param_grads[0] is None:  # f does not use its parameter
            target.zero_()
        else:
            target.copy_(param_grads[0].reshape(-1))
        return
    if one_device and _flatten is not None:
        try:
            target.copy_(_flatten(param_grads))
            return
        except TypeError:  # a parameter that f does not use has no gradient
            pass
    like = next((g for g in param_grads if g is not None), None)
    if like is None:  # f uses no parameter
        target.zero_()
        return
    parts = [g.reshape(-1) if g is not None else like.new_zeros(n) for g, n in zip(param_grads, numels)]
    if not one_device:  # e.g. a 0-dim CPU parameter beside a CUDA state
        parts = [p.to(target.device) for p in parts]
    if parts[0].dtype == target.dtype and parts[0].device == target.device:
        torch.cat(parts, out=target)
    else:
        target.copy_(torch.cat(parts))


def create_shell(ctx, local_rows: int, local_cols: int, comm):
    """A MATPYTHON shell of local size ``local_rows x local_cols`` driven by ``ctx``."""
    mat = PETSc.Mat().createPython(((local_rows, None), (local_cols, None)), context=ctx, comm=comm)
    mat.setUp()
    return mat
