"""SGLD step time against a plain SGD step on the same network (a one-hidden-layer regression MLP).

The SGD baseline is a ``torch.nn`` MLP with the same negative log joint (Gaussian likelihood + Gaussian
prior) as loss, stepped by ``torch.optim.SGD``; SGLD runs the Pyro version of the network through
``bmm_ppl.inference.sgmcmc.SGLD`` (1 chain, minibatch 128), once running the model each step
(``jit=False``) and once with the captured minibatch potential (``jit=True``). The three are timed
side by side in each of ``--repeats`` rounds (the machine may be shared: compare ratios within a round)
and the per-round ratios and their median are printed. SGLD's time is the whole ``fit`` (model trace,
capture, draw bookkeeping, constrained draws) divided by the steps.

Run: ``python benchmarks/sgld_step_time.py [--steps N] [--repeats R]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch

from bmm_ppl.inference import ChainDiagnosticsWarning
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


def sgld_seconds_per_step(x, y, steps, jit):
    engine = SGLD(num_samples=steps, warmup_steps=0, lr=1e-6, batch_size=BATCH, jit=jit, progress=False)
    start = time.perf_counter()
    with warnings.catch_warnings():  # a timed run of fixed length at a tiny lr: its chains are not mixed
        warnings.simplefilter("ignore", ChainDiagnosticsWarning)
        posterior = engine.fit(bnn, x, y)
    seconds = (time.perf_counter() - start) / steps
    if jit and posterior.diagnostics["jit"] != "graph":
        raise RuntimeError(f"the capture fell back to {posterior.diagnostics['jit']!r}; the benchmark needs it")
    return seconds


def main(steps: int = 2000, repeats: int = 3) -> dict:
    torch.set_num_threads(1)
    x, y = data()
    rounds = []
    for _ in range(repeats):
        sgd = sgd_seconds_per_step(x, y, steps)
        eager = sgld_seconds_per_step(x, y, steps, jit=False)
        jit = sgld_seconds_per_step(x, y, steps, jit=True)
        rounds.append({"sgd_seconds": sgd, "sgld_eager_seconds": eager, "sgld_jit_seconds": jit,
                       "ratio_eager": eager / sgd, "ratio_jit": jit / sgd})
    print(f"{'round':>5} {'SGD ms':>8} {'SGLD ms':>8} {'jit ms':>8} {'SGLD/SGD':>9} {'jit/SGD':>8}")
    for i, r in enumerate(rounds):
        print(f"{i:>5} {r['sgd_seconds'] * 1e3:>8.3f} {r['sgld_eager_seconds'] * 1e3:>8.3f} "
              f"{r['sgld_jit_seconds'] * 1e3:>8.3f} {r['ratio_eager']:>9.2f} {r['ratio_jit']:>8.2f}")
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"median ratio: SGLD / SGD = {summary['ratio_eager']:.2f}, SGLD(jit=True) / SGD = {summary['ratio_jit']:.2f}"
          f"  (target <= 1.2; {steps} steps, 1 chain, minibatch {BATCH}, MLP {D}-{H}-1, 1 thread)")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    main(arguments.steps, arguments.repeats)
