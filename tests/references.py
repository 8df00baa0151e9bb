"""Independent references for pnode's tests: hand-written Butcher tableaus and implicit steps in torch.

Nothing here imports pnode. Integrating with these under torch autograd gives "backprop through
the same steps", which a discrete adjoint must reproduce to round-off.
"""

import torch

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


def rk_solve(f, y0, times, h, tableau):
    """Integrate through output ``times`` with fixed step ``h``; returns stacked outputs."""
    outs = [y0]
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        pts = grid(t0, t1, h)
        for a, b in zip(pts[:-1], pts[1:]):
            y = rk_step(f, a, y, b - a, tableau)
        outs.append(y)
    return torch.stack(outs)


def theta_linear_solve(A, y0, times, h, theta):
    """The theta method on dy/dt = A y (A: (n, n), y: (batch, n)), each step solved exactly."""
    n = A.shape[0]
    eye = torch.eye(n, dtype=A.dtype)
    outs = [y0]
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        pts = grid(t0, t1, h)
        for a, b in zip(pts[:-1], pts[1:]):
            dt = b - a
            lhs = eye - theta * dt * A
            rhs = y + (1 - theta) * dt * (y @ A.T)
            y = torch.linalg.solve(lhs, rhs.T).T
        outs.append(y)
    return torch.stack(outs)


def theta_newton_solve(f, y0, times, h, theta, newton_iters=30):
    """The theta method on a nonlinear f, each step solved by (autograd-differentiated) Newton iterations
    to machine precision; backprop through converged Newton gives the implicit-function gradient."""
    outs = [y0]
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        pts = grid(t0, t1, h)
        for a, b in zip(pts[:-1], pts[1:]):
            dt = b - a
            explicit = y + (1 - theta) * dt * f(a, y) if theta < 1 else y
            z = y
            for _ in range(newton_iters):
                residual = z - theta * dt * f(b, z) - explicit
                z = z - _newton_update(lambda v: v - theta * dt * f(b, v), z, residual)
            y = z
        outs.append(y)
    return torch.stack(outs)


def _newton_update(g, z, residual):
    flat = z.reshape(-1)
    jac = torch.autograd.functional.jacobian(lambda v: g(v.reshape(z.shape)).reshape(-1), flat,
                                             create_graph=True)
    return torch.linalg.solve(jac, residual.reshape(-1)).reshape(z.shape)


def forced_linear_implicit_solve(A, forcing, y0, times, h, tableau):
    """A diagonally implicit RK method on dy/dt = y A^T + forcing(t) (y: (batch, n)), every stage
    solved exactly: stage i is ``(I - h a_ii A) Y_i = y + h sum_{j<i} a_ij k_j + h a_ii forcing(t_i)``."""
    c, a, b = tableau
    n = A.shape[0]
    eye = torch.eye(n, dtype=A.dtype)
    outs = [y0]
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        pts = grid(t0, t1, h)
        for start, end in zip(pts[:-1], pts[1:]):
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
        outs.append(y)
    return torch.stack(outs)
