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
