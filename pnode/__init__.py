"""pnode: neural ODEs for PyTorch, integrated and differentiated by PETSc TS/TSAdjoint.

The public surface is small: :func:`odeint` (solve), :func:`odeint_adjoint` (solve, differentiable
by the discrete adjoint), :class:`ODEBlock`, :func:`available_methods` and the exception types.
"""

from .errors import InputError, PnodeError, SolverError
from .methods import available_methods
from .nn import ODEBlock
from .odeint import odeint, odeint_adjoint

__version__ = "0.1.0"

__all__ = ["odeint", "odeint_adjoint", "ODEBlock", "available_methods", "PnodeError", "InputError",
           "SolverError", "__version__"]
