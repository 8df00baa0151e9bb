"""Independent references: hand-written Butcher tableaus and implicit steps, integrated in torch.

Nothing here imports the rest of pnode. Integrating with these under torch autograd gives
"backprop through the same steps", which a discrete adjoint must reproduce to round-off.

* Explicit Runge-Kutta: the textbook tableaus (:data:`TABLEAUS`) on a fixed grid
  (:func:`rk_solve`) or over given step times (:func:`rk_reference`, e.g. the steps an adaptive
  solve accepted).
* Implicit methods: the theta method on a linear ODE solved exactly (:func:`theta_linear_solve`),
  on a nonlinear one by autograd-differentiated Newton (:func:`theta_newton_solve`) or by
  fixed-point iteration with the implicit function theorem's derivative (:func:`theta_reference`),
  and diagonally implicit RK stages on a forced linear ODE (:func:`forced_linear_implicit_solve`).

A reference can run in pnode's mixed arithmetic (:func:`in_dtype`): on a float64 PETSc pnode sums
the steps of a float32 state in float64 and evaluates the network in float32. The ODE-Net block's
ReLUs make the gradient jump where a pre-activation crosses zero, so a reference that rounded
differently would differ by 1e-5 to 1e-3 without either being wrong.
"""

from typing import Callable, List, Sequence

import torch

Func = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Explicit tableaus (c, A, b) of the textbook methods, written out from the literature.
TABLEAUS = {
    "euler": ([0.0], [[]], [1.0]),
    "midpoint": ([0.0, 0.5], [[], [0.5]], [0.0, 1.0]),
    "rk4": ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    "adaptive_heun": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    "bosh3": ([0.0, 0.5, 0.75, 1.0], [[], [0.5], [0.0, 0.75], [2 / 9, 1 / 3, 4 / 9]],
              [2 / 9, 1 / 3, 4 / 9, 0.0]),
    "dopri5": ([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
               [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
                [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
                [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
                [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
               [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]),
    # Heun's method is adaptive_heun's tableau without the embedded Euler step
    "heun2": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    # Heun (1900): third order, three stages
    "heun3": ([0.0, 1 / 3, 2 / 3], [[], [1 / 3], [0.0, 2 / 3]], [1 / 4, 0.0, 3 / 4]),
    # Fehlberg's RKF1(2), second-order weights (Fehlberg 1969)
    "fehlberg2": ([0.0, 1 / 2, 1.0], [[], [1 / 2], [1 / 256, 255 / 256]], [1 / 512, 255 / 256, 1 / 512]),
    # Tsitouras 5(4) (Tsitouras 2011), fifth-order weights, 16-digit coefficients
    "tsit5": ([0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
              [[], [0.161], [-0.008480655492356989, 0.335480655492357],
               [2.897153057105493, -6.359448489975075, 4.3622954328695815],
               [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
               [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
                -0.028269050394068383],
               [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
                2.324710524099774]],
              [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
               2.324710524099774, 0.0]),
    # Prince & Dormand RK8(7)13M (Prince & Dormand 1981), eighth-order weights
    "dopri8": ([0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
                1201146811 / 1299019798, 1.0, 1.0],
               [[], [1 / 18], [1 / 48, 1 / 16], [1 / 32, 0.0, 3 / 32], [5 / 16, 0.0, -75 / 64, 75 / 64],
                [3 / 80, 0.0, 0.0, 3 / 16, 3 / 20],
                [29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000,
                 23124283 / 1800000000],
                [16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777,
                 545815736 / 2771057229, -180193667 / 1043307555],
                [39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301,
                 100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287],
                [246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803,
                 -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457, 123872331 / 1001029789],
                [-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
                 -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
                 -45442868181 / 3398467696, 3065993473 / 597172653],
                [185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
                 -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
                 -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083],
                [403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805,
                 652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
                 3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060, 0.0]],
               [14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731,
                561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087,
                -528747749 / 2220607170, 1 / 4]),
}

# Implicit Runge-Kutta tableaus (c, A, b) of torchdiffeq's implicit names that pnode serves.
IMPLICIT_TABLEAUS = {
    "implicit_euler": ([1.0], [[1.0]], [1.0]),
    "trapezoid": ([0.0, 1.0], [[0.0, 0.0], [0.5, 0.5]], [0.5, 0.5]),
    "implicit_midpoint": ([0.5], [[0.5]], [1.0]),
}


def rk_step(f, t, y, h, tableau):
    """One explicit RK step of size ``h`` from ``y`` at ``t`` with ``tableau = (c, A, b)``."""
    c, a, b = tableau
    k = []
    for i in range(len(c)):
        yi = y
        for j, aij in enumerate(a[i]):
            if aij != 0.0:
                yi = yi + h * aij * k[j]
        k.append(f(t + c[i] * h, yi))
    out = y
    for bi, ki in zip(b, k):
        if bi != 0.0:
            out = out + h * bi * ki
    return out


def grid(t0, t1, h):
    """Step end times from t0 to t1 with steps of h (the last one shortened to land on t1)."""
    times = [t0]
    n = 0
    while True:
        n += 1
        nxt = t0 + n * h
        if nxt >= t1 - 1e-8 * h:
            times.append(t1)
            return times
        times.append(nxt)


def fixed_step_solve(step, y0, times, h):
    """Integrate through output ``times`` with fixed steps of ``h`` (each output interval's last one
    shortened to land on its time, :func:`grid`): ``step(y, start, end)`` takes one step. Returns the
    stacked outputs, ``y0`` first."""
    outs = [y0]
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        pts = grid(t0, t1, h)
        for start, end in zip(pts[:-1], pts[1:]):
            y = step(y, start, end)
        outs.append(y)
    return torch.stack(outs)


def rk_solve(f, y0, times, h, tableau):
    """Integrate through output ``times`` with fixed step ``h``; returns stacked outputs."""
    return fixed_step_solve(lambda y, start, end: rk_step(f, start, y, end - start, tableau), y0, times, h)


def theta_linear_solve(A, y0, times, h, theta):
    """The theta method on dy/dt = A y (A: (n, n), y: (batch, n)), each step solved exactly."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)

    def step(y, start, end):
        dt = end - start
        rhs = y + (1 - theta) * dt * (y @ A.T)
        return torch.linalg.solve(eye - theta * dt * A, rhs.T).T

    return fixed_step_solve(step, y0, times, h)


def theta_newton_solve(f, y0, times, h, theta, newton_iters=30):
    """The theta method on a nonlinear f, each step solved by (autograd-differentiated) Newton iterations
    to machine precision; backprop through converged Newton gives the implicit-function gradient."""
    def step(y, start, end):
        dt = end - start
        explicit = y + (1 - theta) * dt * f(start, y) if theta < 1 else y
        z = y
        for _ in range(newton_iters):
            residual = z - theta * dt * f(end, z) - explicit
            z = z - _newton_update(lambda v: v - theta * dt * f(end, v), z, residual)
        return z

    return fixed_step_solve(step, y0, times, h)


def _newton_update(g, z, residual):
    flat = z.reshape(-1)
    jac = torch.autograd.functional.jacobian(lambda v: g(v.reshape(z.shape)).reshape(-1), flat,
                                             create_graph=True)
    return torch.linalg.solve(jac, residual.reshape(-1)).reshape(z.shape)


def forced_linear_implicit_solve(A, forcing, y0, times, h, tableau):
    """A diagonally implicit RK method on dy/dt = y A^T + forcing(t) (y: (batch, n)), every stage
    solved exactly: stage i is ``(I - h a_ii A) Y_i = y + h sum_{j<i} a_ij k_j + h a_ii forcing(t_i)``."""
    c, a, b = tableau
    eye = torch.eye(A.shape[0], dtype=A.dtype)

    def step(y, start, end):
        dt = end - start
        k = []
        for i in range(len(c)):
            ti = start + c[i] * dt
            rhs = y
            for j in range(i):
                if a[i][j] != 0.0:
                    rhs = rhs + dt * a[i][j] * k[j]
            if a[i][i] != 0.0:
                rhs = rhs + dt * a[i][i] * forcing(ti)
                stage = torch.linalg.solve(eye - dt * a[i][i] * A, rhs.T).T
            else:
                stage = rhs
            k.append(stage @ A.T + forcing(ti))
        for bi, ki in zip(b, k):
            y = y + dt * bi * ki
        return y

    return fixed_step_solve(step, y0, times, h)


THETA = {"cn": 0.5, "beuler": 1.0}
"""The implicit methods a reference exists for, and their theta."""


def in_dtype(func: Func, dtype: torch.dtype) -> Func:
    """``func`` on states of any dtype, evaluated in ``dtype``: each input cast to ``dtype`` on its way
    in, the result cast back to the state's dtype on its way out (what pnode does at its Vecs)."""
    def cast(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return func(torch.as_tensor(t, dtype=dtype), y.to(dtype)).to(y.dtype)
    return cast


def rk_reference(func: Func, y0: torch.Tensor, times: Sequence[float], method: str) -> torch.Tensor:
    """``y(times[-1])`` by explicit RK steps from each time to the next, differentiable."""
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        y = rk_step(func, t0, y, t1 - t0, TABLEAUS[method])
    return y


def fixed_point(update: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, tol: float,
                max_iter: int = 500) -> torch.Tensor:
    """Iterate ``x = update(x)`` until the relative change is below ``tol`` or stalls at round-off.

    Raises:
        RuntimeError: no convergence in ``max_iter`` iterations (the step is too large for a
            fixed-point iteration: ``h theta L >= 1`` for a Lipschitz constant ``L`` of f).
    """
    x, previous = start, float("inf")
    for _ in range(max_iter):
        new = update(x)
        change = float((new - x).norm() / new.norm().clamp_min(1e-300))
        x = new
        if change <= tol or (change >= previous and change < tol**0.5):
            return x
        previous = change
    raise RuntimeError(f"fixed-point iteration of an implicit step did not converge in {max_iter} iterations "
                       f"(relative change {change:.1e}); the step is too large for it")


def theta_step(func: Func, y: torch.Tensor, t0: float, t1: float, theta: float, tol: float) -> torch.Tensor:
    """One theta step from ``y`` at ``t0`` to ``t1``, solved to ``tol``, with its exact derivative.

    The value comes from fixed-point iteration without a graph. Autograd then sees one more
    application ``z = y + h ((1 - theta) f(t0, y) + theta f(t1, z*))``, whose incoming cotangent
    ``g`` a hook replaces by ``u = (I - h theta J(z*))^-T g`` (fixed-point iteration of
    ``u = g + h theta J^T u`` with VJPs): the implicit function theorem's derivative of ``z*``.
    """
    h = t1 - t0
    t_start, t_end = torch.tensor(t0, dtype=y.dtype), torch.tensor(t1, dtype=y.dtype)
    explicit = y + (1 - theta) * h * func(t_start, y) if theta < 1 else y
    with torch.no_grad():
        fixed = explicit.detach()
        solution = fixed_point(lambda z: fixed + theta * h * func(t_end, z), y.detach(), tol)
    solution.requires_grad_(True)
    with torch.enable_grad():
        f_end = func(t_end, solution)
    step = explicit + theta * h * f_end

    def through_solution(g: torch.Tensor) -> torch.Tensor:
        def transpose_update(u: torch.Tensor) -> torch.Tensor:
            return g + theta * h * torch.autograd.grad(f_end, solution, u, retain_graph=True)[0]
        return fixed_point(transpose_update, g, tol)

    if step.requires_grad:
        step.register_hook(through_solution)
    return step


def theta_reference(func: Func, y0: torch.Tensor, times: Sequence[float], method: str) -> torch.Tensor:
    """``y(times[-1])`` by implicit theta steps (``method``: 'cn' or 'beuler'), differentiable.

    Each step is solved to a few ulps of the state's dtype (the fixed-point iteration stops when
    its change stalls at round-off).
    """
    tol = 8 * torch.finfo(y0.dtype).eps
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        y = theta_step(func, y, t0, t1, THETA[method], tol)
    return y


def reference(func: Func, y0: torch.Tensor, times: Sequence[float], method: str) -> torch.Tensor:
    """Autograd through ``method``'s steps between consecutive ``times``."""
    if method in THETA:
        return theta_reference(func, y0, times, method)
    if method in TABLEAUS:
        return rk_reference(func, y0, times, method)
    raise ValueError(f"no reference for method {method!r}; explicit: {sorted(TABLEAUS)}, implicit: {sorted(THETA)}")


def fixed_grid(t_end: float, steps: int) -> List[float]:
    """``steps + 1`` equally spaced times from 0 to ``t_end``."""
    return [t_end * i / steps for i in range(steps + 1)]


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """``||got - want|| / ||want||`` over all the tensors together (float64 sums)."""
    num = sum(float((g.double() - w.double()).norm() ** 2) for g, w in zip(got, want)) ** 0.5
    den = sum(float(w.double().norm() ** 2) for w in want) ** 0.5
    return num / den


# Kennedy & Carpenter's additive Runge-Kutta pairs (Appl. Numer. Math. 44 (2003) 139-181), as
# (implicit A, explicit A): ESDIRK tableaus with an explicit first stage, stiffly accurate (the
# weights b are the implicit tableau's last row, shared by both parts), abscissae the row sums.
KENCARP = {
    "kencarp3": (
        [[0, 0, 0, 0],
         [1767732205903 / 4055673282236, 1767732205903 / 4055673282236, 0, 0],
         [2746238789719 / 10658868560708, -640167445237 / 6845629431997, 1767732205903 / 4055673282236, 0],
         [1471266399579 / 7840856788654, -4482444167858 / 7529755066697, 11266239266428 / 11593286722821,
          1767732205903 / 4055673282236]],
        [[0, 0, 0, 0],
         [1767732205903 / 2027836641118, 0, 0, 0],
         [5535828885825 / 10492691773637, 788022342437 / 10882634858940, 0, 0],
         [6485989280629 / 16251701735622, -4246266847089 / 9704473918619, 10755448449292 / 10357097424841, 0]]),
    "kencarp4": (
        [[0, 0, 0, 0, 0, 0],
         [1 / 4, 1 / 4, 0, 0, 0, 0],
         [8611 / 62500, -1743 / 31250, 1 / 4, 0, 0, 0],
         [5012029 / 34652500, -654441 / 2922500, 174375 / 388108, 1 / 4, 0, 0],
         [15267082809 / 155376265600, -71443401 / 120774400, 730878875 / 902184768, 2285395 / 8070912, 1 / 4, 0],
         [82889 / 524892, 0, 15625 / 83664, 69875 / 102672, -2260 / 8211, 1 / 4]],
        [[0, 0, 0, 0, 0, 0],
         [1 / 2, 0, 0, 0, 0, 0],
         [13861 / 62500, 6889 / 62500, 0, 0, 0, 0],
         [-116923316275 / 2393684061468, -2731218467317 / 15368042101831, 9408046702089 / 11113171139209, 0, 0, 0],
         [-451086348788 / 2902428689909, -2682348792572 / 7519795681897, 12662868775082 / 11960479115383,
          3355817975965 / 11060851509271, 0, 0],
         [647845179188 / 3216320057751, 73281519250 / 8382639484533, 552539513391 / 3454668386233,
          3354512671639 / 8306763924573, 4040 / 17871, 0]]),
}


def ark_step(f_implicit: Func, f_explicit, t: float, y: torch.Tensor, h: float, tableau,
             newton_iters: int = 12) -> torch.Tensor:
    """One step of an additive Runge-Kutta method ``tableau = (implicit A, explicit A)`` (weights: the
    implicit tableau's last row; abscissae: row sums) on ``dy/dt = f_explicit + f_implicit``
    (``f_explicit`` None: the implicit tableau alone, a DIRK on ``f_implicit``). Each implicit stage
    ``Y = z + h a_ii f_I(t_i, Y)`` is solved by autograd-differentiated Newton iterations from the
    previous stage (exact after one for a linear ``f_I``), so backprop gives the implicit function
    theorem's derivative of the converged stages."""
    a_imp, a_exp = tableau
    s = len(a_imp)
    b = a_imp[-1]
    c_imp = [sum(row) for row in a_imp]
    c_exp = [sum(row) for row in a_exp]
    k_imp, k_exp = [], []
    stage = y
    for i in range(s):
        z = y
        for j in range(i):
            z = z + h * a_imp[i][j] * k_imp[j]
            if f_explicit is not None:
                z = z + h * a_exp[i][j] * k_exp[j]
        ti = torch.tensor(t + c_imp[i] * h, dtype=y.dtype)
        if a_imp[i][i] == 0.0:
            stage = z
        else:
            gamma = h * a_imp[i][i]

            def residual_of(v, ti=ti, z=z, gamma=gamma):
                return v - gamma * f_implicit(ti, v) - z

            for _ in range(newton_iters):
                stage = stage - _newton_update(lambda v, ti=ti, gamma=gamma: v - gamma * f_implicit(ti, v),
                                               stage, residual_of(stage))
        k_imp.append(f_implicit(ti, stage))
        if f_explicit is not None:
            k_exp.append(f_explicit(torch.tensor(t + c_exp[i] * h, dtype=y.dtype), stage))
    out = y
    for i in range(s):
        out = out + h * b[i] * k_imp[i]
        if f_explicit is not None:
            out = out + h * b[i] * k_exp[i]
    return out


def ark_reference(f_implicit: Func, f_explicit, y0: torch.Tensor, steps: Sequence[tuple], method: str,
                  newton_iters: int = 12) -> torch.Tensor:
    """``y`` after the steps ``[(t0, h), ...]`` (e.g. those an adaptive solve accepted) of Kennedy &
    Carpenter's pair ``method`` (:data:`KENCARP`), differentiable; see :func:`ark_step`."""
    y = y0
    for t0, h in steps:
        y = ark_step(f_implicit, f_explicit, t0, y, h, KENCARP[method], newton_iters)
    return y
