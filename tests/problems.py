"""Small ODE right-hand sides used across the tests (nothing here imports pnode)."""

import functools

import torch
from torch import nn

import pnode


class MLPField(nn.Module):
    """dy/dt = W2 tanh(W1 y + b1 + t c) + b2: nonlinear, time-dependent, with parameters."""

    def __init__(self, dim=3, hidden=8):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.time = nn.Parameter(torch.randn(hidden) * 0.5)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, t, y):
        return self.lin2(torch.tanh(self.lin1(y) + t * self.time))


class ReLUField(nn.Module):
    """dy/dt = W2 relu(W1 y + t c): kinks where float32 round-off of the state decides a ReLU's side."""

    def __init__(self, dim=6, hidden=64):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.time = nn.Parameter(torch.randn(hidden))
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, t, y):
        return self.lin2(torch.relu(self.lin1(y) + t * self.time))


class LinearField(nn.Module):
    """dy/dt = A y for a batch of row vectors y: (batch, n)."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, y):
        return y @ self.A.T


class ConvField(nn.Module):
    """The classic ODE-Net block shape at toy size: GroupNorm, ReLU, time-concatenated conv."""

    def __init__(self, channels=4):
        super().__init__()
        self.norm1 = nn.GroupNorm(2, channels)
        self.conv1 = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def _tconv(self, conv, t, x):
        tt = torch.ones_like(x[:, :1]) * t
        return conv(torch.cat([tt, x], 1))

    def forward(self, t, x):
        out = self._tconv(self.conv1, t, torch.relu(self.norm1(x)))
        return self._tconv(self.conv2, t, torch.tanh(self.norm2(out)))


def stable_matrix(n, dtype=torch.float64):
    q = torch.randn(n, n, dtype=dtype)
    return 0.5 * (q - q.T) - 0.3 * torch.eye(n, dtype=dtype) + 0.1 * torch.randn(n, n, dtype=dtype)


def solve_case(case, net: nn.Module, y0: torch.Tensor, t: torch.Tensor):
    """Outputs and gradients (to ``y0`` and ``net``'s parameters), flat and detached, of one solve of
    ``case = (method, options, interface)`` of ``dy/dt = net(y)`` from ``y0`` (requiring grad) over
    ``t``; ``method`` ``'tuple'`` solves a tuple state, ``'event'`` an ``odeint_event`` (dopri5 both)."""
    method, options, interface = case
    params = tuple(net.parameters())
    odeint = pnode.odeint if interface == "odeint" else functools.partial(pnode.odeint_adjoint, adjoint_params=params)
    if method == "tuple":
        second = (0.5 * y0).detach().requires_grad_(True)
        ys = odeint(lambda t, y: (net(y[0]), -y[1] * torch.tanh(y[0])), (y0, second), t, method="dopri5",
                    rtol=1e-6, atol=1e-8, options=options)
        loss = ys[0][-1].square().sum() + ys[1][1:].sum()
        inputs, outputs = (y0, second, *params), torch.cat([ys[0].reshape(-1), ys[1].reshape(-1)])
    elif method == "event":
        event_t, ys = pnode.odeint_event(lambda t, y: net(y), y0, t[0], event_fn=lambda t, y: t - 0.7 + 1e-3 * y.sum(),
                                         method="dopri5", rtol=1e-6, atol=1e-8, adjoint_params=params)
        loss = event_t + ys[-1].square().sum()
        inputs, outputs = (y0, *params), torch.cat([event_t.reshape(1), ys.reshape(-1)])
    else:
        ys = odeint(lambda t, y: net(y), y0, t, method=method, rtol=1e-6, atol=1e-8, options=options)
        loss = ys[-1].square().sum() + ys[1].sum()
        inputs, outputs = (y0, *params), ys.reshape(-1)
    grads = torch.autograd.grad(loss, inputs)
    return outputs.detach(), torch.cat([g.reshape(-1) for g in grads])
