"""The networks pnode's benchmarks and tests integrate.

* :class:`ODENetFunc`: the classic ODE-Net block (GroupNorm, ReLU, time-concatenated 3x3 conv,
  GroupNorm, ReLU, time-concatenated 3x3 conv, GroupNorm) for states ``(batch, channels, size, size)``.
* :class:`MLPFunc`: the MLP 2 -> 64 -> 64 -> 2 with tanh (autonomous), for states ``(batch, 2)``.
* :class:`ScaleFunc`: ``f(t, y) = a y`` with one parameter: almost free to evaluate, so that a
  training step through it costs what the solver itself costs per stage.
"""

import torch
from torch import nn


class ConcatConv(nn.Module):
    """A 3x3 convolution of the state with the time appended as a constant channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))


class ODENetFunc(nn.Module):
    """``f(t, x)`` of the ODE-Net block for states ``(batch, channels, size, size)``."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(min(32, channels), channels) for _ in range(3))
        self.conv1, self.conv2 = ConcatConv(channels), ConcatConv(channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, torch.relu(self.norm1(x)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class MLPFunc(nn.Module):
    """``f(t, y) = MLP(y)``, 2 -> 64 -> 64 -> 2 with tanh, for states ``(batch, 2)``."""

    def __init__(self, dim: int = 2, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class ScaleFunc(nn.Module):
    """``f(t, y) = a y`` for states of any shape, ``a`` one trainable scalar (initially -0.5)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.5))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a * y
