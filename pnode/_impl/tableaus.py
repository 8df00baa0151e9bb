"""Explicit Butcher tableaus that PETSc does not ship, registered with PETSc as RK types.

torchdiffeq's ``heun3``, ``fehlberg2``, ``tsit5`` and ``dopri8`` are explicit Runge-Kutta methods
like PETSc's own ``TSRK`` tableaus: once registered (``TSRKRegister``, once per process, before a
TS uses them) PETSc steps them, adapts their steps and runs their discrete adjoint exactly like
``5dp`` or ``3bs``. The coefficients are the published ones (sources in each entry's docstring).
"""

import ctypes
from dataclasses import dataclass
from typing import Optional, Set, Tuple

import numpy as np

from .._compat import PETSc, petsc_function, petsc_int, petsc_real, register_rk_tableau


@dataclass(frozen=True)
class RKTableau:
    """An explicit Runge-Kutta tableau.

    Attributes:
        name: the PETSc ``TSRKType`` it is registered as (``-ts_rk_type <name>``).
        order: the order of the propagated solution ``b``.
        c: the stage times, ``s`` entries (``c[0] == 0``).
        a: the rows of the strictly lower triangular matrix: ``a[i]`` has ``i`` entries.
        b: the weights of the propagated solution, ``s`` entries.
        b_embedded: the weights of the embedded solution of order ``order - 1`` (adaptive pairs:
            PETSc's error estimate is the difference of the two), or None.
    """

    name: str
    order: int
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    b_embedded: Optional[Tuple[float, ...]] = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def zero_weight_stage(self) -> bool:
        """Whether a stage with ``b_i == 0`` feeds a later stage (PETSc 3.18's RK adjoint drops the
        parameter gradient of such a stage, see :func:`pnode._impl.adjoint.zero_weight_param_gradients_ok`)."""
        return any(self.b[i] == 0 and any(row[i] != 0 for row in self.a[i + 1:]) for i in range(self.stages))

    def matrix(self) -> Tuple[float, ...]:
        """The ``s x s`` matrix A, row-major, as ``TSRKRegister`` takes it."""
        s = self.stages
        return tuple(row[j] if j < len(row) else 0.0 for row in self.a for j in range(s))


HEUN3 = RKTableau(
    "pnode_heun3", 3, c=(0.0, 1 / 3, 2 / 3), a=((), (1 / 3,), (0.0, 2 / 3)), b=(1 / 4, 0.0, 3 / 4))
"""Heun's third-order method (Heun 1900; Hairer, Norsett & Wanner, Solving ODEs I, section II.1)."""

FEHLBERG2 = RKTableau(
    "pnode_fehlberg2", 2, c=(0.0, 1 / 2, 1.0), a=((), (1 / 2,), (1 / 256, 255 / 256)),
    b=(1 / 512, 255 / 256, 1 / 512), b_embedded=(1 / 256, 255 / 256, 0.0))
"""Fehlberg's RKF1(2) pair, propagating its second-order solution (Fehlberg 1969, NASA TR R-315)."""

_TSIT5_B = (0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
            0.01,
            0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
            1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
            -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
            2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841)

TSIT5 = RKTableau(
    "pnode_tsit5", 5,
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604,
       1.0, 1.0),
    a=((),
       (0.161,),
       (-0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
        0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569),
       (2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
        -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
        4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077),
       (5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
        -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
        7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
        -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635),
       (5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
        -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
        8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
        -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
        -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206),
       _TSIT5_B),
    b=_TSIT5_B + (0.0,),
    b_embedded=(0.09468075576583945807478876255758922856117527357724631226139574065785592789071067303271,
                0.009183565540343253096776363936645313759813746240984095238905939532922955247253608687270,
                0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
                1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
                -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
                1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
                1 / 66))
"""Tsitouras's 5(4) pair (Tsitouras 2011, Comput. Math. Appl. 62(2)): seven stages, the last
one first-same-as-last; the fifth-order solution is propagated."""

DOPRI8 = RKTableau(
    "pnode_dopri8", 8,
    c=(0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
       1201146811 / 1299019798, 1.0, 1.0),
    a=((),
       (1 / 18,),
       (1 / 48, 1 / 16),
       (1 / 32, 0.0, 3 / 32),
       (5 / 16, 0.0, -75 / 64, 75 / 64),
       (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
       (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
       (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777, 545815736 / 2771057229,
        -180193667 / 1043307555),
       (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301, 100302831 / 723423059,
        790204164 / 839813087, 800635310 / 3783071287),
       (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803,
        -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457, 123872331 / 1001029789),
       (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
        -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
        -45442868181 / 3398467696, 3065993473 / 597172653),
       (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
        -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563, -4093664535 / 808688257,
        3962137247 / 1805957418, 65686358 / 487910083),
       (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805, 652783627 / 914296604,
        11173962825 / 925320556, -13158990841 / 6184727034, 3936647629 / 1978049680, -160528059 / 685178525,
        248638103 / 1413531060, 0.0)),
    b=(14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731,
       561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087,
       -528747749 / 2220607170, 1 / 4),
    b_embedded=(13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145, 1757004468 / 5645159321,
                656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719,
                2 / 45, 0.0))
"""Prince & Dormand's RK8(7)13M (Prince & Dormand 1981, J. Comput. Appl. Math. 7(1), in the
rational approximations published with it): thirteen stages, eighth-order solution propagated."""

_registered: Set[str] = set()


def ensure_registered(tableau: RKTableau) -> None:
    """Register ``tableau`` with PETSc unless this process already did (collective in the sense that
    every rank must call it for the same tableaus, which pnode's entry points guarantee)."""
    if tableau.name in _registered:
        return
    register_rk_tableau(tableau.name, tableau.order, tableau.matrix(), tableau.b, tableau.c, tableau.b_embedded)
    _registered.add(tableau.name)


def petsc_tableau(ts) -> Optional[tuple]:
    """``(A, b, c, fsal)`` of an explicit RK ``ts`` as PETSc holds them (``TSRKGetTableau``), as NumPy
    arrays of PETSc's real type; None when this PETSc does not export it. PETSc's ``c`` are its own
    row sums of ``A`` in its real type (``0.79999995`` for dopri5's 4/5 in float32), which only PETSc
    can say."""
    get = petsc_function("TSRKGetTableau", ctypes.c_int, None)
    if get is None:
        return None
    s, fsal = petsc_int()(), ctypes.c_int()
    a, b, c = (ctypes.POINTER(petsc_real())() for _ in range(3))
    if get(ctypes.c_void_p(ts.handle), ctypes.byref(s), ctypes.byref(a), ctypes.byref(b), ctypes.byref(c),
           None, None, None, ctypes.byref(fsal)) != 0:
        return None
    n = s.value

    def as_array(pointer, count):
        return np.array([pointer[i] for i in range(count)], dtype=PETSc.RealType)

    return as_array(a, n * n).reshape(n, n), as_array(b, n), as_array(c, n), bool(fsal.value)
