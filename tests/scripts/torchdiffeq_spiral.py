"""A torchdiffeq-style training script (the shape of torchdiffeq's ode_demo), written for torchdiffeq.

The only pnode-specific line is the import: ``from pnode import odeint_adjoint as odeint``.
Prints the loss at the first and the last iteration as ``loss_first=...`` / ``loss_last=...``.
"""

import argparse

import numpy as np
import torch
import torch.nn as nn

parser = argparse.ArgumentParser("ODE demo")
parser.add_argument("--method", type=str, choices=["dopri5", "rk4", "euler"], default="dopri5")
parser.add_argument("--data_size", type=int, default=200)
parser.add_argument("--batch_time", type=int, default=10)
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--niters", type=int, default=40)
parser.add_argument("--lr", type=float, default=1e-3)
args = parser.parse_args()

from pnode import odeint_adjoint as odeint  # noqa: E402  (the swap-in: was `from torchdiffeq import odeint_adjoint`)

torch.manual_seed(0)
true_y0 = torch.tensor([[2., 0.]])
t = torch.linspace(0., 5., args.data_size)
true_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


class Lambda(nn.Module):
    def forward(self, t, y):
        return torch.mm(y**3, true_A)


with torch.no_grad():
    true_y = odeint(Lambda(), true_y0, t, method="dopri5")


def get_batch():
    s = torch.from_numpy(np.random.choice(np.arange(args.data_size - args.batch_time, dtype=np.int64),
                                          args.batch_size, replace=False))
    batch_y0 = true_y[s]  # (M, D)
    batch_t = t[:args.batch_time]  # (T)
    batch_y = torch.stack([true_y[s + i] for i in range(args.batch_time)], dim=0)  # (T, M, D)
    return batch_y0, batch_t, batch_y


class ODEFunc(nn.Module):
    def __init__(self):
        super(ODEFunc, self).__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y**3)


if __name__ == "__main__":
    np.random.seed(0)
    func = ODEFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=args.lr)
    losses = []
    for _ in range(args.niters):
        optimizer.zero_grad()
        batch_y0, batch_t, batch_y = get_batch()
        pred_y = odeint(func, batch_y0, batch_t, method=args.method).to("cpu")
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pred_y = odeint(func, true_y0, t)
            losses.append(torch.mean(torch.abs(pred_y - true_y)).item())
    print(f"loss_first={losses[0]:.6f}")
    print(f"loss_last={losses[-1]:.6f}")
