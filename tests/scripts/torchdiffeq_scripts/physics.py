"""Learn a bouncing ball's physics from its trajectory (the idiom of torchdiffeq's learn_physics example),
written for torchdiffeq: ``odeint_event`` chained with ``odeint``, an event function that ends the last
flight at a terminal time by returning exactly zero past it. Prints ``loss <iteration> <value>``."""

import sys

import torch
from torch import nn
from torchdiffeq import odeint, odeint_event

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
niters = int(sys.argv[1]) if len(sys.argv) > 1 else 10


class Dynamics(nn.Module):
    def __init__(self, gravity):
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor(gravity))

    def forward(self, t, state):
        pos, vel, radius = state
        return vel, -self.gravity * torch.ones_like(vel), torch.zeros_like(radius)


class Ball(nn.Module):
    def __init__(self, gravity, restitution):
        super().__init__()
        self.dynamics = Dynamics(gravity)
        self.logit = nn.Parameter(torch.tensor(restitution).logit())
        self.radius = nn.Parameter(torch.tensor([0.5]))

    def simulate(self, times):
        t0, end = torch.tensor([0.0]), times[-1]

        def event_fn(t, state):
            if t > end + 1e-7:  # the last flight ends at the terminal time
                return torch.zeros_like(t)
            pos, _, radius = state
            return pos - radius.reshape_as(pos)

        state = (torch.tensor([10.0]), torch.tensor([0.0]), self.radius)
        pieces = [state[0][None]]
        for _ in range(8):
            event_t, solution = odeint_event(self.dynamics, state, t0, event_fn=event_fn, atol=1e-8, rtol=1e-8,
                                             method="dopri5")
            inside = times[(times > t0) & (times <= event_t)]
            path = odeint(self.dynamics, state, torch.cat([t0.reshape(-1), inside]), atol=1e-8, rtol=1e-8)
            pieces.append(path[0][1:])
            if event_t >= end:
                break
            pos, vel, radius = tuple(s[-1] for s in solution)
            vel = -torch.sigmoid(self.logit) * vel
            state = (pos + 1e-7 * vel, vel, radius)
            t0 = event_t.reshape(-1)
        return torch.cat(pieces).reshape(-1)


times = torch.linspace(0.0, 6.0, 61)
with torch.no_grad():
    observed = Ball(9.81, 0.8).simulate(times)
model = Ball(7.0, 0.6)
optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
for itr in range(niters):
    optimizer.zero_grad()
    trajectory = model.simulate(times)
    loss = (trajectory - observed).pow(2).mean()
    loss.backward()
    optimizer.step()
    print(f"loss {itr} {loss.item():.15e}", flush=True)
