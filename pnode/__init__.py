"""pnode: neural ODEs for PyTorch, integrated and differentiated by PETSc TS/TSAdjoint.

The public surface is small: :func:`odeint` (solve), :func:`odeint_adjoint` (solve, differentiable
by the discrete adjoint), :func:`odeint_event` (solve until an event, differentiable through the
event time), :func:`odeint_dense` (the solution as a function of time), :class:`ODEBlock`,
:class:`IMEX` (a right-hand side split for IMEX methods),
:func:`available_methods`, :func:`clear_cache` (drop the pooled solvers), :func:`init` (initialise
PETSc from given options) and the exception types.

Importing pnode does not initialise PETSc: the first solve does, reading PETSc options from
``sys.argv`` (``-ts_type cn``), unless :func:`init` was called first.
"""

from ._compat import init
from ._impl.dense import odeint_dense
from ._impl.errors import InputError, PnodeError, SolverError
from ._impl.imex import IMEX
from ._impl.methods import available_methods
from ._impl.nn import ODEBlock
from ._impl.odeint import odeint, odeint_adjoint, odeint_event
from ._impl.pool import clear_cache

__version__ = "0.1.0"

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "ODEBlock", "IMEX", "available_methods",
           "clear_cache", "init", "PnodeError", "InputError", "SolverError", "__version__"]
