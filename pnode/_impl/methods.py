"""The method registry: one table from a pnode method name to the PETSc TS configuration.

Nothing else in pnode branches on method names or keeps facts about methods; it reads the
:class:`Method` record instead, or, for a TS whose type the command line chose
(``-ts_type cn``), the facts about PETSc's TS types below.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .._compat import petsc_version
from .errors import InputError
from .tableaus import DOPRI8, FEHLBERG2, HEUN3, TSIT5, RKTableau, ensure_registered

# PETSc TS types that step explicitly: their adjoint reads dG/dp of the right-hand side form, and
# pnode hands them f as a right-hand side only.
EXPLICIT_TS_TYPES = ("rk", "euler", "ssp")
# TS types that take f in implicit form, F(t, y, y') = y' - f (their adjoint needs it so).
IMPLICIT_FORM_TS_TYPES = ("arkimex",)
# TS types that are PETSc's theta method (TSTHETA and its named cases: a theta to report).
THETA_TS_TYPES = ("theta", "cn", "beuler")
# Stages of PETSc's RK tableaus and pnode's registered ones (for estimates made before a solve has
# counted them).
RK_STAGES = {"1fe": 1, "2a": 2, "2b": 2, "3": 3, "3bs": 4, "4": 4, "5f": 6, "5dp": 7, "5bs": 8, "6vr": 10,
             "7vr": 13, "8vr": 16, "pnode_heun3": 3, "pnode_fehlberg2": 3, "pnode_tsit5": 7, "pnode_dopri8": 13}


def steps_explicitly(ts_type: str) -> bool:
    """Whether PETSc's TS type ``ts_type`` is an explicit method (see :data:`EXPLICIT_TS_TYPES`)."""
    return ts_type in EXPLICIT_TS_TYPES


def takes_implicit_form(ts_type: str) -> bool:
    """Whether TS type ``ts_type`` takes f in implicit form (see :data:`IMPLICIT_FORM_TS_TYPES`)."""
    return ts_type in IMPLICIT_FORM_TS_TYPES


@dataclass(frozen=True)
class Method:
    """How a pnode method maps onto PETSc TS.

    Attributes:
        name: the pnode (torchdiffeq-compatible where one exists) name.
        ts_type: PETSc ``TSType`` (``'rk'``, ``'theta'``, ``'cn'``, ``'beuler'``, ...).
        rk_type: PETSc ``TSRKType`` tableau name for ``ts_type == 'rk'``.
        theta: the theta of ``TSTHETA`` (``None`` for other types).
        adaptive: whether the method has an error estimator, so that steps adapt to ``rtol``/``atol``
            unless ``options['step_size']`` fixes them.
        implicit: whether each step solves a nonlinear system (Newton-Krylov with matrix-free JVPs).
        order: the classical order of accuracy.
        zero_weight_stage: an RK tableau with a zero weight b_i on a stage that later stages use
            (PETSc 3.18's RK adjoint drops the parameter gradient of such stages).
        fsal: "first same as last": the last stage is evaluated at the step's end state, so its
            derivative starts the next step (Dormand-Prince, Bogacki-Shampine, Tsitouras).
        dense_midpoint: PETSc interpolates a step of this method to higher order than linear
            (``TSInterpolate``: Dormand-Prince's fourth-order dense formula).
        description: a one-line description shown by :func:`available_methods`.
        tableau: for a tableau PETSc does not ship, the tableau pnode registers with PETSc (as
            ``rk_type``) before the first solve that uses it; None for PETSc's own methods.
        arkimex_type: PETSc ``TSARKIMEXType`` for ``ts_type == 'arkimex'``: f is handed to PETSc in
            implicit form, ``F(t, y, y') = y' - f(t, y)`` (or ``y' - f_implicit`` with the explicit part
            of a :class:`pnode.IMEX` split as the right-hand side), see :mod:`pnode._impl.formulation`.
        adjoint_since: the oldest PETSc ``(major, minor)`` whose TSAdjoint of this method is right.
        l_stable: the implicit method damps infinitely stiff components in one step (its stability
            function vanishes at infinity): stiff transients do not ring.
        imex: a :class:`pnode.IMEX` split is integrated as IMEX (its explicit part explicitly); other
            methods integrate the split's sum.
    """

    name: str
    ts_type: str
    rk_type: Optional[str] = None
    theta: Optional[float] = None
    adaptive: bool = False
    implicit: bool = False
    order: int = 1
    zero_weight_stage: bool = False
    fsal: bool = False
    dense_midpoint: bool = False
    description: str = ""
    tableau: Optional[RKTableau] = field(default=None, compare=False, repr=False)
    arkimex_type: Optional[str] = None
    adjoint_since: Tuple[int, int] = (3, 0)
    l_stable: bool = False
    imex: bool = False

    @property
    def stages(self) -> Optional[int]:
        """Evaluations of f per step of an explicit RK method (FSAL's reused one included); None for
        other methods (an implicit step's count depends on Newton)."""
        if self.ts_type == "euler":
            return 1
        return RK_STAGES.get(self.rk_type) if self.ts_type == "rk" else None


def _registered_rk(name: str, tableau: RKTableau, adaptive: bool, description: str, fsal: bool = False) -> Method:
    return Method(name, "rk", rk_type=tableau.name, adaptive=adaptive, order=tableau.order,
                  zero_weight_stage=tableau.zero_weight_stage, fsal=fsal, description=description, tableau=tableau)


def _kencarp(name: str, arkimex_type: str, order: int, paper_name: str) -> Method:
    """Kennedy & Carpenter's additive Runge-Kutta pair (Appl. Numer. Math. 44, 2003) as PETSc's ARKIMEX
    ``arkimex_type``: its L-stable, stiffly accurate ESDIRK (embedded order ``order - 1``) on f, and the
    IMEX pair on a :class:`pnode.IMEX` split. TSAdjoint has its current ARKIMEX adjoint since 3.20."""
    return Method(name, "arkimex", arkimex_type=arkimex_type, adaptive=True, implicit=True, order=order,
                  adjoint_since=(3, 20), l_stable=True, imex=True,
                  description=f"Kennedy-Carpenter {paper_name}: L-stable ESDIRK, IMEX on a pnode.IMEX split "
                              f"(PETSc TS arkimex {arkimex_type})")


_TABLE: Tuple[Method, ...] = (
    Method("euler", "rk", rk_type="1fe", order=1, description="forward Euler (PETSc RK 1fe)"),
    Method("midpoint", "rk", rk_type="2b", order=2, zero_weight_stage=True,
           description="explicit midpoint (PETSc RK 2b)"),
    Method("rk4", "rk", rk_type="4", order=4,
           description="classic RK4 (PETSc RK 4); torchdiffeq's rk4 is the 3/8 rule"),
    Method("bosh3", "rk", rk_type="3bs", adaptive=True, order=3, fsal=True,
           description="Bogacki-Shampine 3(2) (PETSc RK 3bs)"),
    Method("dopri5", "rk", rk_type="5dp", adaptive=True, order=5, zero_weight_stage=True, fsal=True,
           dense_midpoint=True, description="Dormand-Prince 5(4) (PETSc RK 5dp)"),
    Method("adaptive_heun", "rk", rk_type="2a", adaptive=True, order=2,
           description="Heun with embedded Euler (PETSc RK 2a)"),
    # pnode's own implicit names adapt their steps (PETSc's estimate from the last three step ends);
    # torchdiffeq's names below keep torchdiffeq's meaning: fixed steps
    Method("cn", "cn", adaptive=True, implicit=True, order=2,
           description="Crank-Nicolson, error-controlled steps (PETSc TS cn)"),
    Method("beuler", "beuler", adaptive=True, implicit=True, order=1, l_stable=True,
           description="backward Euler, error-controlled steps (PETSc TS beuler)"),
    Method("theta", "theta", theta=0.5, adaptive=True, implicit=True, order=2,
           description="theta method, options={'theta': ...}, error-controlled steps (PETSc TS theta)"),
    _kencarp("kencarp3", "3", 3, "ARK3(2)4L[2]SA"),
    _kencarp("kencarp4", "4", 4, "ARK4(3)6L[2]SA"),
    _kencarp("kencarp5", "5", 5, "ARK5(4)8L[2]SA"),
    Method("heun2", "rk", rk_type="2a", order=2, description="Heun's method, fixed steps (PETSc RK 2a)"),
    _registered_rk("heun3", HEUN3, False, "Heun's third-order method (tableau registered with TSRKRegister)"),
    _registered_rk("fehlberg2", FEHLBERG2, True, "Fehlberg 2(1) (tableau registered with TSRKRegister)"),
    _registered_rk("tsit5", TSIT5, True, "Tsitouras 5(4) (tableau registered with TSRKRegister)", fsal=True),
    _registered_rk("dopri8", DOPRI8, True, "Prince-Dormand 8(7) (tableau registered with TSRKRegister)"),
    Method("implicit_euler", "beuler", implicit=True, order=1, description="backward Euler (PETSc TS beuler)"),
    Method("trapezoid", "cn", implicit=True, order=2, description="trapezoidal rule (PETSc TS cn)"),
    Method("implicit_midpoint", "theta", theta=0.5, implicit=True, order=2,
           description="implicit midpoint rule (PETSc TS theta, theta = 0.5, midpoint form)"),
)

# Every PETSc RK tableau, usable by name (``method='rk:5bs'`` or ``-ts_rk_type``):
# name -> (adaptive, order, has a zero-weight stage that later stages use).
_PETSC_RK: Dict[str, Tuple[bool, int, bool]] = {
    "1fe": (False, 1, False), "2a": (True, 2, False), "2b": (False, 2, True), "3": (False, 3, False),
    "3bs": (True, 3, False), "4": (False, 4, False), "5f": (True, 5, True), "5dp": (True, 5, True),
    "5bs": (True, 5, True), "6vr": (True, 6, True), "7vr": (True, 7, True), "8vr": (True, 8, True),
}

_FULLY_IMPLICIT = ("PETSc's fully implicit Runge-Kutta methods (TSIRK) have no adjoint; use 'kencarp4' or "
                   "'kencarp5' (L-stable ESDIRKs, error-controlled), or with fixed steps 'implicit_midpoint' or "
                   "'trapezoid' (A-stable, second order) or 'implicit_euler' (L-stable)")
_MULTISTEP = "PETSc has no adjoint for multistep methods"

# torchdiffeq methods that PETSc cannot serve with an adjoint, with why and what to use instead.
_UNAVAILABLE: Dict[str, str] = {
    "explicit_adams": f"{_MULTISTEP}; use 'rk4' or 'dopri5'",
    "implicit_adams": f"{_MULTISTEP}; use 'dopri5', or 'kencarp4'/'beuler' for stiff problems",
    "fixed_adams": f"{_MULTISTEP}; use 'rk4'",
    "scipy_solver": "pnode integrates with PETSc only; use 'dopri5', or 'kencarp4' (L-stable, error-controlled) "
                    "for stiff problems",
    "radauiia3": _FULLY_IMPLICIT,
    "radauiia5": _FULLY_IMPLICIT,
    "gl4": _FULLY_IMPLICIT,
    "gl6": _FULLY_IMPLICIT,
    "sdirk2": "PETSc has no DIRK method with this tableau (its 2-stage SDIRKs weigh the stages differently); "
              "use 'implicit_midpoint' or 'trapezoid' (second order) or 'implicit_euler' (L-stable)",
    "trbdf2": "PETSc's TR-BDF2 (TSDIRK es213sal) has this tableau, but its adjoint gives wrong gradients for "
              "an ODE given by its right-hand side (as pnode gives it): it reads the explicit tableau of an "
              "additive method, which a DIRK method leaves unset; use 'trapezoid' or 'implicit_euler'",
}

_BY_NAME: Dict[str, Method] = {m.name: m for m in _TABLE}

DEFAULT_METHOD = "dopri5"
# What a stiff problem should try first (error messages and the stiffness hint name it), and where
# this PETSc cannot differentiate it.
STIFF_METHOD = "kencarp4"
STIFF_METHOD_OLD_PETSC = "beuler"


def stiff_method() -> str:
    """The method to suggest for a stiff problem: :data:`STIFF_METHOD` where this PETSc differentiates it."""
    return STIFF_METHOD if adjoint_available(_BY_NAME[STIFF_METHOD]) else STIFF_METHOD_OLD_PETSC


def adjoint_available(method: Method) -> bool:
    """Whether this PETSc's TSAdjoint differentiates ``method`` (``method.adjoint_since``)."""
    return tuple(petsc_version()[:2]) >= method.adjoint_since


def available_methods(adaptive: Optional[bool] = None) -> List[str]:
    """Names accepted by ``method=``: the torchdiffeq-style names, PETSc's own, and ``'rk:<tableau>'``;
    with ``adaptive`` True (False) only the methods that do (do not) adapt their steps to
    ``rtol``/``atol`` by default."""
    names = [m.name for m in _TABLE] + [f"rk:{name}" for name in _PETSC_RK]
    return names if adaptive is None else [name for name in names if resolve_method(name).adaptive == adaptive]


def resolve_method(name: Optional[str]) -> Method:
    """Return the :class:`Method` for ``name`` (``None`` means the default, ``'dopri5'``).

    Raises:
        InputError: the name is unknown, or names a torchdiffeq method PETSc has no adjoint for.
    """
    if name is None:
        name = DEFAULT_METHOD
    if not isinstance(name, str):
        raise InputError(f"method must be a string, got {type(name).__name__}; "
                         f"choose one of: {', '.join(available_methods())}")
    key = name.strip().lower()
    if key in _BY_NAME:
        method = _BY_NAME[key]
        if method.tableau is not None:
            _register(method)
        return method
    if key.startswith("rk:") and key[3:] in _PETSC_RK:
        adaptive, order, zero_weight = _PETSC_RK[key[3:]]
        return Method(key, "rk", rk_type=key[3:], adaptive=adaptive, order=order, zero_weight_stage=zero_weight,
                      fsal=key[3:] in ("3bs", "5dp"), dense_midpoint=key[3:] == "5dp",
                      description=f"PETSc RK tableau {key[3:]}")
    hint = _UNAVAILABLE.get(key)
    reason = f" ({hint})" if hint else ""
    raise InputError(f"method {name!r} is not available with PETSc{reason}; "
                     f"choose one of: {', '.join(available_methods())}")


def _register(method: Method) -> None:
    try:
        ensure_registered(method.tableau)
    except RuntimeError as exc:
        raise InputError(f"method {method.name!r} needs its tableau registered with PETSc, which failed ({exc}); "
                         f"choose one of PETSc's own: {', '.join(m.name for m in _TABLE if m.tableau is None)}"
                         ) from None
