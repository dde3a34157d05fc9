"""SGLD step time against a plain SGD step on the same network (a one-hidden-layer regression MLP).

The SGD baseline is a ``torch.nn`` MLP with the same negative log joint (Gaussian likelihood + Gaussian
prior) as loss, stepped by ``torch.optim.SGD``; SGLD runs the Pyro version of the network through
``bmm_ppl.inference.sgmcmc.SGLD`` (1 chain, minibatch 128). Prints seconds per step and the ratio.

Run: ``python benchmarks/sgld_step_time.py [--steps N]``
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch

from bmm_ppl.inference.sgmcmc import SGLD

N, D, H, BATCH = 2000, 10, 50, 128


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(N, generator=generator)
    return x, y


def bnn(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(torch.zeros(D, H, device=x.device), 1.0).to_event(2))
    w2 = pyro.sample("w2", dist.Normal(torch.zeros(H, device=x.device), 1.0).to_event(1))
    hidden = torch.tanh(x @ w1)  # w1: (D, H) or (C, D, H) under the chain plate -> (C, n, H)
    mean = (hidden * w2.unsqueeze(-2)).sum(-1)
    with pyro.plate("data", x.shape[0], device=x.device):
        pyro.sample("obs", dist.Normal(mean, 0.1), obs=y)


def sgd_seconds_per_step(x, y, steps):
    net = torch.nn.Sequential(torch.nn.Linear(D, H, bias=False), torch.nn.Tanh(), torch.nn.Linear(H, 1, bias=False))
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-5)
    scale = N / BATCH
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, N, (BATCH,))
        optimiser.zero_grad()
        prediction = net(x[index]).squeeze(-1)
        nll = scale * 0.5 * ((prediction - y[index]) / 0.1).pow(2).sum()
        prior = 0.5 * sum((p**2).sum() for p in net.parameters())
        (nll + prior).backward()
        optimiser.step()
    return (time.perf_counter() - start) / steps


def sgld_seconds_per_step(x, y, steps):
    engine = SGLD(num_samples=steps, warmup_steps=0, lr=1e-6, batch_size=BATCH, progress=False)
    start = time.perf_counter()
    engine.fit(bnn, x, y)
    return (time.perf_counter() - start) / steps


def main(steps: int = 2000) -> dict:
    torch.set_num_threads(1)
    x, y = data()
    sgd = sgd_seconds_per_step(x, y, steps)
    sgld = sgld_seconds_per_step(x, y, steps)
    print(f"SGD step  {sgd * 1e3:.3f} ms\nSGLD step {sgld * 1e3:.3f} ms  (incl. model trace and draw bookkeeping)")
    print(f"ratio SGLD / SGD = {sgld / sgd:.2f}  (2-core CPU, 1 chain, minibatch {BATCH}, MLP {D}-{H}-1)")
    return {"sgd_seconds": sgd, "sgld_seconds": sgld, "ratio": sgld / sgd}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    main(parser.parse_args().steps)
