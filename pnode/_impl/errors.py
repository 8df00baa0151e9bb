"""Exception types raised by pnode.

Every error pnode raises derives from :class:`PnodeError`, so ``except pnode.PnodeError`` catches
them all, and from the built-in type a PyTorch user would expect (``ValueError`` for bad input,
``RuntimeError`` for a failed solve).
"""


class PnodeError(Exception):
    """Base class of every exception raised by pnode."""


class InputError(PnodeError, ValueError):
    """An argument to ``odeint``/``odeint_adjoint``/``ODEBlock`` is invalid; the message says how to fix it."""


class SolverError(PnodeError, RuntimeError):
    """The PETSc time integration (or its adjoint) could not complete.

    Attributes:
        t_reached: the time (in the caller's time units and direction) where the solve stopped, or
            ``None`` if unknown.
        reason: PETSc's converged-reason name (e.g. ``'DIVERGED_STEP_REJECTED'``) or a pnode reason
            such as ``'NONFINITE_STATE'``.
    """

    def __init__(self, message: str, t_reached=None, reason=None):
        super().__init__(message)
        self.t_reached = t_reached
        self.reason = reason


class CallbackErrorTrap:
    """Keeps the first Python exception raised inside a PETSc callback.

    PETSc turns an exception in a Python callback into a generic ``PETSc.Error`` after unwinding
    its C stack; pnode re-raises the original exception (a bad ``func`` output, a CUDA error, a
    KeyboardInterrupt) so the user sees their own traceback instead.
    """

    def __init__(self):
        self.error = None

    def call(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise

    def pop(self):
        error, self.error = self.error, None
        return error
