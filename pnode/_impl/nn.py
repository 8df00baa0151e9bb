"""``ODEBlock``: an ``nn.Module`` that maps ``y(t0)`` to ``y(t1)`` through a PETSc-integrated ODE."""

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .odeint import odeint_adjoint_reported
from .stats import SolveStats


class ODEBlock(nn.Module):
    """Integrate ``dy/dt = func(t, y)`` over ``t`` and return the final state.

    Args:
        func: the ODE function (an ``nn.Module`` is registered as a submodule, so its parameters
            train with the block).
        t: integration times ``(t0, t1)`` (or more points; only the last state is returned).
        method, options, rtol, atol, comm: as in :func:`pnode.odeint_adjoint`.
        prefix: PETSc options prefix for this block: ``prefix='block1_'`` makes the command line
            ``-block1_ts_type cn`` tune this block only (``-ts_type cn`` still tunes every block).

    Attributes:
        nfe_forward: right-hand-side evaluations (and JVPs) in forward solves since the last
            :meth:`reset_nfe` (NFE-F of the classic ODE-Net logs).
        nfe_backward: evaluations with a graph, for VJPs, in backward solves (NFE-B).
        stats: a :class:`pnode._impl.stats.SolveStats`: the counters, the configuration PETSc ran
            (``stats.solver``, ``stats.summary()``) and what the adjoint chose and held
            (``stats.adjoint``) in the latest call.
    """

    def __init__(self, func: Callable, t: Sequence[float] = (0.0, 1.0), method: Optional[str] = None,
                 options: Optional[dict] = None, prefix: Optional[str] = None, rtol: float = 1e-7,
                 atol: float = 1e-9, comm=None):
        super().__init__()
        self.func = func
        self.register_buffer("t", torch.as_tensor(t, dtype=torch.float64), persistent=False)
        self.method = method
        self.options = dict(options or {})
        self.prefix = prefix
        self.rtol = rtol
        self.atol = atol
        self.comm = comm
        self.stats = SolveStats()

    @property
    def counter(self):
        return self.stats.counter

    @property
    def nfe_forward(self) -> int:
        return self.counter.nfe_forward

    @property
    def nfe_backward(self) -> int:
        return self.counter.backward

    def reset_nfe(self) -> None:
        """Zero the counters in place (a pending backward pass still counts into them)."""
        self.counter.forward = self.counter.jvp = self.counter.backward = self.counter.vjp = 0

    def forward(self, y0):
        dtype = y0[0].dtype if isinstance(y0, (tuple, list)) else y0.dtype
        ys = odeint_adjoint_reported(self.func, y0, self.t.to(dtype), rtol=self.rtol, atol=self.atol,
                                     method=self.method, options=self.options,
                                     adjoint_params=tuple(p for p in self.parameters()), comm=self.comm,
                                     prefix=self.prefix, stats=self.stats)
        if isinstance(ys, tuple):
            return tuple(y[-1] for y in ys)
        return ys[-1]

    def extra_repr(self) -> str:
        return f"method={self.method or 'dopri5'}, t={self.t.tolist()}, options={self.options}"
