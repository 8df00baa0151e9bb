"""A continuous normalizing flow on a 2-D density (the shape of torchdiffeq's cnf example), written for
torchdiffeq: the exact trace, a tuple state (z, log p), integrated backwards with ``odeint_adjoint``.
Prints ``loss <iteration> <value>``."""

import sys

import torch
from torch import nn
from torchdiffeq import odeint_adjoint as odeint

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
niters = int(sys.argv[1]) if len(sys.argv) > 1 else 10


class CNF(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, states):
        z, _ = states
        with torch.set_grad_enabled(True):
            z = z.requires_grad_(True) if not z.requires_grad else z
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], 1))
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return dz, -trace.reshape(-1, 1)


func = CNF()
optimizer = torch.optim.Adam(func.parameters(), lr=1e-2)
x = torch.randn(64, 2) * torch.tensor([1.0, 0.3]) + torch.tensor([0.5, 0.0])
for itr in range(niters):
    optimizer.zero_grad()
    z, delta = odeint(func, (x, torch.zeros(64, 1)), torch.tensor([1.0, 0.0]), rtol=1e-8, atol=1e-9)
    logp = -0.5 * z[-1].pow(2).sum(1, keepdim=True) - delta[-1] - torch.log(torch.tensor(2 * torch.pi))
    loss = -logp.mean()
    loss.backward()
    optimizer.step()
    print(f"loss {itr} {loss.item():.15e}", flush=True)
