"""SVI step time on Bayesian logistic regression (sklearn's breast-cancer data, 569 x 30).

Compares, in one run and on one thread, the time per optimisation step of

- a hand-written raw-torch ELBO step (mean-field Gaussian, analytic entropy, torch.optim.Adam): the floor;
- Pyro's own loop: ``pyro.infer.SVI`` with ``Trace_ELBO`` and with ``JitTrace_ELBO`` (AutoNormal guide);
- ``bmm_ppl.inference.SVI`` (AutoNormal guide), eager and with ``jit=True``. It runs Adam fused (one
  kernel over all parameters), so the raw-torch step is timed with fused Adam too.

Our per-step time is the slope of fit time against ``num_steps`` (two fits), so the fixed costs of a fit
(setup, final evidence estimate) drop out. Prints a table of microseconds per step and ratios to raw torch.

Run: ``python benchmarks/svi_step_time.py [--steps 1000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from sklearn.datasets import load_breast_cancer

from bmm_ppl.inference import ConvergenceWarning
from bmm_ppl.inference.svi.engine import SVI


def data(dtype=torch.float32):
    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.tensor(features, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(labels, dtype=dtype)


def logistic_regression(x, y):
    d = x.shape[1]
    w = pyro.sample("w", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=x @ w + b), obs=y)


def per_step(step, num_steps: int, warmup: int = 50) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    return (time.perf_counter() - start) / num_steps


def raw_torch(x, y, num_steps, fused: bool = False):
    d = x.shape[1] + 1
    loc = x.new_zeros(d, requires_grad=True)
    log_scale = x.new_full((d,), -2.0, requires_grad=True)
    optimiser = torch.optim.Adam([loc, log_scale], lr=0.01, fused=fused)
    ones = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)

    def step():
        z = loc + log_scale.exp() * torch.randn_like(loc)
        log_likelihood = -torch.nn.functional.binary_cross_entropy_with_logits(ones @ z, y, reduction="sum")
        log_prior = -0.5 * (z**2).sum()
        entropy = log_scale.sum()
        loss = -(log_likelihood + log_prior + entropy)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return per_step(step, num_steps)


def pyro_loop(x, y, num_steps, jit: bool):
    pyro.clear_param_store()
    guide = AutoNormal(logistic_regression)
    loss = pyro.infer.JitTrace_ELBO() if jit else pyro.infer.Trace_ELBO()
    svi = pyro.infer.SVI(logistic_regression, guide, pyro.optim.Adam({"lr": 0.01}), loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return per_step(lambda: svi.step(x, y), num_steps)


def ours(x, y, num_steps, jit: bool):
    def fit(steps):
        engine = SVI("normal", num_steps=steps, lr=0.01, evidence_particles=1, jit=jit, progress=False)
        start = time.perf_counter()
        with warnings.catch_warnings():  # short timed runs do not converge, by design: they time steps
            warnings.simplefilter("ignore", ConvergenceWarning)
            engine.fit(logistic_regression, x, y)
        return time.perf_counter() - start

    short, long = max(num_steps // 10, 50), num_steps + max(num_steps // 10, 50)
    fit(short)  # warm-up
    return (fit(long) - fit(short)) / (long - short)


def main(num_steps: int = 1000, repeats: int = 3) -> dict[str, float]:
    torch.set_num_threads(1)
    x, y = data()
    runs = {
        "raw torch ELBO step": lambda: raw_torch(x, y, num_steps),
        "raw torch, fused Adam": lambda: raw_torch(x, y, num_steps, fused=True),
        "pyro SVI + Trace_ELBO": lambda: pyro_loop(x, y, num_steps, jit=False),
        "pyro SVI + JitTrace_ELBO": lambda: pyro_loop(x, y, num_steps, jit=True),
        "bmm_ppl SVI": lambda: ours(x, y, num_steps, jit=False),
        "bmm_ppl SVI (jit=True)": lambda: ours(x, y, num_steps, jit=True),
    }
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so that drifts in machine load hit every entry alike
        for name, run in runs.items():
            times[name].append(run())
    medians = {name: statistics.median(values) for name, values in times.items()}
    floor = medians["raw torch ELBO step"]
    print(f"SVI step time, Bayesian logistic regression (breast cancer 569 x 30), 1 thread, median of {repeats}")
    print(f"{'loop':<28}{'us/step':>10}{'x raw torch':>14}")
    for name, value in medians.items():
        print(f"{name:<28}{value * 1e6:>10.0f}{value / floor:>14.2f}")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    main(options.steps, options.repeats)
