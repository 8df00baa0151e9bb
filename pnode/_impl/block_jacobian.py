"""Per-sample block-Jacobian preconditioning of implicit steps: dense blocks from torch, one batched LU.

A neural ODE's batch is independent: sample ``b``'s derivative depends on sample ``b``'s state only,
so ``df/du`` is block diagonal with one ``n x n`` block per sample. Each Newton iteration of an
implicit step solves ``(shift I + scale J) x = r`` (``scale = -1`` for ``shift I - J``, the matrix
PETSc's TS forms on pnode's shell); :class:`BlockJacobianPC` builds those blocks densely from ``n``
vector-Jacobian products (the basis vector ``e_k`` placed in every sample gives row ``k`` of
every block at once; one batched backward pass), factorises all of them by one batched LU
in torch, and serves PETSc's ``PCApply`` (``PCApplyTranspose`` for the adjoint's transposed
solves, with the same factors transposed). GMRES on the matrix-free operator then needs about one
iteration per Newton iteration when the blocks are the whole Jacobian (a state without a batch
dimension is one block), instead of dozens without a preconditioner on a stiff system.

It is chosen by ``options={'jacobian': 'blocks'}`` (or ``-pnode_jacobian blocks``); by default when
the method is implicit and a sample has at most :data:`BLOCK_LIMIT` entries (see
``docs/implicit.md`` for when it pays). PETSc sets the preconditioner up at every Newton
iteration; the blocks are rebuilt for each stage (at its first Newton iterate; the later iterations
of the stage reuse them, a modified Newton method whose residual stays exact) and refactorised when
the shift changes.
"""

import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .bridge import StateLayout, petsc_dtype, tensor_into_vec, vec_view
from .rhs import Linearization

# Default: blocks when a sample's block has at most this many rows. Building a block costs n
# Jacobian-vector products (vectorised) and its LU n^3/3 flops per sample; below ~64 that is less than
# the GMRES iterations it saves on a stiff problem (measured in docs/implicit.md).
BLOCK_LIMIT = 64
# ``options['jacobian']`` values.
CHOICES = ("blocks", "matrix_free")


@dataclass(frozen=True)
class BlockLayout:
    """How the flat state splits into per-sample blocks: ``count`` blocks of ``size`` entries each
    (``count * size`` is the state's local size; the blocks are consecutive in the flat vector)."""

    count: int
    size: int


def block_layout(layout: StateLayout) -> BlockLayout:
    """Per-sample blocks of a state: one per row of the first dimension of a tensor state of two or
    more dimensions (the batch, shape ``(B, ...)``), else a single block over the whole state."""
    if not layout.is_tuple and len(layout.shapes[0]) >= 2 and layout.shapes[0][0] > 0:
        count = int(layout.shapes[0][0])
        return BlockLayout(count, layout.numel // count)
    return BlockLayout(1, layout.numel)


def default_jacobian(layout: StateLayout, implicit: bool) -> str:
    """``'blocks'`` for an implicit method whose per-sample block has at most :data:`BLOCK_LIMIT`
    entries, else ``'matrix_free'``."""
    size = block_layout(layout).size
    return "blocks" if implicit and 0 < size <= BLOCK_LIMIT else "matrix_free"


def jacobian_blocks(lin: Linearization, blocks: BlockLayout) -> torch.Tensor:
    """The per-sample Jacobian blocks of f at ``lin``'s point: ``(count, size, size)``, PETSc dtype, on
    the device of the point (the PETSc vectors').

    Block ``b`` is ``d f_b / d u_b``. Row ``k`` of every block comes from one vector-Jacobian product
    with the cotangent ``e_k`` in every sample; the ``size`` products run as one batched backward pass
    through one evaluation of f with its graph (``is_grads_batched``), where ``func`` allows it, else
    one at a time. Reverse mode is exact whatever ``jvp`` says, and on small networks costs a
    fraction of ``size`` forward-mode products (a 256 x 8 MLP: one batched backward pass ~0.9 ms
    against ~1.8 ms for a single ``torch.func.jvp``).
    """
    count, size = blocks.count, blocks.size
    rhs = lin.rhs
    basis = torch.eye(size, dtype=lin.u.dtype, device=lin.u.device)
    cotangents = basis.unsqueeze(1).expand(size, count, size).reshape(size, count * size)
    y = lin.u.detach().requires_grad_(True)
    with torch.enable_grad():
        out = rhs.call(lin.tau, y)
    rhs.counter.backward += 1
    rhs.counter.vjp += size
    if not out.requires_grad:  # f does not depend on the state
        return torch.zeros((count, size, size), dtype=petsc_dtype(), device=lin.u.device)
    try:
        (rows,) = torch.autograd.grad(out, y, cotangents, retain_graph=True, is_grads_batched=True,
                                      allow_unused=True)
    except RuntimeError:  # an operation without a batching rule: one product at a time
        rows = torch.stack([_vjp(out, y, c) for c in cotangents])
    if rows is None:
        return torch.zeros((count, size, size), dtype=petsc_dtype(), device=lin.u.device)
    return rows.reshape(size, count, size).transpose(0, 1).to(device=lin.u.device, dtype=petsc_dtype())


def _vjp(out: torch.Tensor, y: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(out, y, cotangent, retain_graph=True, allow_unused=True)
    return torch.zeros_like(y) if grad is None else grad


class BlockJacobianPC:
    """A PETSc ``PCPYTHON`` context applying ``(scale J + shift I)^-1`` block by block.

    PETSc instantiates it from ``-pc_python_type pnode._impl.block_jacobian.BlockJacobianPC``; it reads
    everything from the preconditioning matrix, one of pnode's shells
    (:class:`pnode._impl.operators.RHSJacobianShell`): the linearization of f it points at (whose
    right-hand side knows the state's layout, hence the blocks), and the scale and shift PETSc put
    on it. The blocks of one stage are built once, at its first Newton iterate, and refactorised
    for a new shift.
    """

    def __init__(self):
        # what the blocks are of: a weak reference to the right-hand side (a pooled solver's
        # preconditioner must not keep the user's tensors alive between calls), the stage time and the
        # Vec of the point; and the scale and shift of the factorised matrices
        self._rhs = _dead
        self._point: Tuple[float, int] = (float("nan"), 0)
        self._shift: Tuple[float, float] = (float("nan"), float("nan"))
        self._blocks: Optional[torch.Tensor] = None  # (count, size, size), PETSc dtype, the vectors' device
        self._factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._shape: Tuple[int, int, int] = (0, 0, 1)

    def setUp(self, pc) -> None:
        shell = pc.getOperators()[1].getPythonContext()
        shell.trap.call(self._factorise, shell)

    def _factorise(self, shell) -> None:
        """Blocks at the shell's linearization, unless they are of the same stage (the same right-hand
        side, stage time and stage Vec: a Newton iteration after the stage's first keeps the first's
        blocks, a modified Newton iteration whose residual is still exact); LU of ``scale J + shift I``
        unless scale and shift are the same too."""
        lin = shell.linearization
        if lin is None:
            raise RuntimeError("the block-Jacobian preconditioner was set up before its operator had a "
                               "linearization; use options={'jacobian': 'matrix_free'} with this TS type")
        point = (lin.tau, lin.key[0] if lin.key is not None else id(lin))
        if self._rhs() is not lin.rhs or point != self._point:
            layout = block_layout(lin.rhs.layout)
            self._blocks = jacobian_blocks(lin, layout)
            self._rhs, self._point, self._shift = weakref.ref(lin.rhs), point, (float("nan"), float("nan"))
            self._shape = (layout.count, layout.size, 1)
        shift = (shell.scale_factor, shell.shift_amount)
        if shift != self._shift:
            eye = torch.eye(self._blocks.shape[-1], dtype=self._blocks.dtype, device=self._blocks.device)
            self._factors = torch.linalg.lu_factor(shift[0] * self._blocks + shift[1] * eye)
            self._shift = shift

    def apply(self, pc, x, y) -> None:
        self._solve(x, y, adjoint=False)

    def applyTranspose(self, pc, x, y) -> None:
        self._solve(x, y, adjoint=True)

    def _solve(self, x, y, adjoint: bool) -> None:
        lu, pivots = self._factors
        rhs = vec_view(x).reshape(self._shape)
        tensor_into_vec(torch.linalg.lu_solve(lu, pivots, rhs, adjoint=adjoint).reshape(-1), y)

    def reset(self, pc) -> None:
        self.__init__()


def _dead():
    return None
