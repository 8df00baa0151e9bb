"""An IMEX split of the right-hand side: ``f = f_explicit + f_implicit`` (:class:`IMEX`).

Stiff terms (diffusion, fast reactions, a known linear operator) go into ``implicit``, the rest
(a learned, non-stiff part) into ``explicit``. An IMEX method (``kencarp3``, ``kencarp4``,
``kencarp5``: PETSc's ARKIMEX) steps the explicit part explicitly and solves for the implicit part
only, so its step is not limited by the stiff part's stability and its Newton iterations see the
implicit part's Jacobian only. Every other method integrates the sum.
"""

from typing import Callable

import torch
from torch import nn

from .errors import InputError


class IMEX(nn.Module):
    """``f(t, y) = explicit(t, y) + implicit(t, y)``, with the two parts kept apart for IMEX methods.

    Args:
        explicit: ``explicit(t, y) -> dy/dt`` part, stepped explicitly by an IMEX method (non-stiff).
        implicit: ``implicit(t, y) -> dy/dt`` part, solved for by an IMEX method (stiff).

    Either part is an ``nn.Module`` (its parameters become this module's, so ``odeint_adjoint``
    differentiates them by default) or any callable (list the tensors it closes over in
    ``adjoint_params``). Each returns a tensor (or tuple) shaped like ``y``, of ``y``'s dtype.

    Example::

        func = pnode.IMEX(explicit=reaction_net, implicit=lambda t, u: diffusion @ u)
        u = pnode.odeint_adjoint(func, u0, t, method="kencarp4", rtol=1e-6, atol=1e-8)
    """

    def __init__(self, explicit: Callable, implicit: Callable):
        super().__init__()
        for name, part in (("explicit", explicit), ("implicit", implicit)):
            if not callable(part):
                raise InputError(f"IMEX({name}=...) must be callable as {name}(t, y) -> dy/dt, got "
                                 f"{type(part).__name__}")
        self.explicit = explicit
        self.implicit = implicit

    def forward(self, t: torch.Tensor, y):
        fe, fi = self.explicit(t, y), self.implicit(t, y)
        if isinstance(fe, (tuple, list)) and isinstance(fi, (tuple, list)):
            return tuple(a + b for a, b in zip(fe, fi))
        return fe + fi


def is_split(func) -> bool:
    """Whether ``func`` is an :class:`IMEX` split."""
    return isinstance(func, IMEX)
