"""One latent ODE on irregular samples of spirals (the shape of torchdiffeq's latent_ode example), written
for torchdiffeq: an RNN encoder, ``odeint`` in the latent space, a decoder, the ELBO. Prints
``loss <iteration> <value>``."""

import math
import sys

import torch
from torch import nn
from torchdiffeq import odeint

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
niters = int(sys.argv[1]) if len(sys.argv) > 1 else 10
latent, batch, samples = 4, 8, 15
ts = torch.sort(torch.rand(samples) * 4.0).values
angles = ts[None, :] + torch.rand(batch, 1) * 2 * math.pi
data = torch.stack([torch.cos(angles), torch.sin(angles)], -1) * (1 + 0.1 * ts[None, :, None])


class LatentFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, 20), nn.ELU(), nn.Linear(20, latent))

    def forward(self, t, z):
        return self.net(z)


encoder, decoder, func = nn.GRU(2, 16, batch_first=True), nn.Linear(latent, 2), LatentFunc()
to_posterior = nn.Linear(16, 2 * latent)
params = [*encoder.parameters(), *decoder.parameters(), *func.parameters(), *to_posterior.parameters()]
optimizer = torch.optim.Adam(params, lr=1e-2)
noise = torch.randn(batch, latent)
for itr in range(niters):
    optimizer.zero_grad()
    _, hidden = encoder(data.flip(1))
    mean, logvar = to_posterior(hidden[-1]).chunk(2, dim=-1)
    z0 = mean + noise * torch.exp(0.5 * logvar)
    pred = decoder(odeint(func, z0, ts, rtol=1e-9, atol=1e-10)).permute(1, 0, 2)
    log_likelihood = -0.5 * ((pred - data) / 0.1).pow(2).sum((1, 2))
    kl = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).sum(-1)
    loss = (kl - log_likelihood).mean()
    loss.backward()
    optimizer.step()
    print(f"loss {itr} {loss.item():.15e}", flush=True)
