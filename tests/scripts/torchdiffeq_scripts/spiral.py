"""Fit a spiral's dynamics (the shape of torchdiffeq's ode_demo), written for torchdiffeq: backprop
through ``odeint``. Prints ``loss <iteration> <value>`` per iteration (float64, tight tolerances)."""

import sys

import torch
from torch import nn
from torchdiffeq import odeint

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
niters = int(sys.argv[1]) if len(sys.argv) > 1 else 10
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
t = torch.linspace(0.0, 2.0, 20)
with torch.no_grad():
    true_y = odeint(lambda t, y: (y ** 3) @ A, torch.tensor([[2.0, 0.0]]), t, rtol=1e-10, atol=1e-10)


class ODEFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, t, y):
        return self.net(y ** 3)


func = ODEFunc()
optimizer = torch.optim.Adam(func.parameters(), lr=1e-2)
starts = torch.tensor([0, 3, 6, 9])
for itr in range(niters):
    optimizer.zero_grad()
    batch_y0, batch_y = true_y[starts], torch.stack([true_y[starts + i] for i in range(10)])
    pred_y = odeint(func, batch_y0, t[:10], rtol=1e-9, atol=1e-10)
    loss = (pred_y - batch_y).abs().mean()
    loss.backward()
    optimizer.step()
    print(f"loss {itr} {loss.item():.15e}", flush=True)
