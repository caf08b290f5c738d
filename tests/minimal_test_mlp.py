"""Train a tiny infinite π-MLP on the sine toy data in a few seconds.

    python -m tests.minimal_test_mlp

Also a pytest test: the loss must fall by at least half in 60 steps.
"""

from __future__ import annotations

import math

import torch

from inf.networks import InfMLP
from inf.optim import InfSGD
from inf.utils import clip_grad_norm_


def train(steps: int = 60, r: int = 16, seed: int = 0, verbose: bool = False) -> list[float]:
    torch.manual_seed(seed)
    x = torch.linspace(-math.pi, math.pi, 256)[:, None]
    X, y = torch.cat([x, torch.ones_like(x)], 1), torch.sin(x)
    net = InfMLP(2, 1, r, L=1, bias_alpha=1.0)
    opt = InfSGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(X), (32,))
        loss = 0.5 * ((net(X[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if verbose and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  rows per layer {net.rows_per_layer()}")
    return losses


def test_tiny_pi_net_learns():
    losses = train()
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


if __name__ == "__main__":
    losses = train(verbose=True)
    print(f"loss: first 10 steps {sum(losses[:10]) / 10:.4f}, last 10 steps {sum(losses[-10:]) / 10:.4f}")
