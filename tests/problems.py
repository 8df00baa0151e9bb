"""Small ODE right-hand sides used across the tests (nothing here imports pnode)."""

import torch
from torch import nn


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
