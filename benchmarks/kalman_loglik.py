"""Exact Kalman log-likelihood (and its gradient) against statsmodels, pykalman and Pyro's GaussianHMM.

A random stable model (state dim 4, obs dim 2), T = 10^3, 10^4, 10^5, float64, one CPU thread for every
library (statsmodels' Cython filter is single-threaded). Each case runs in its own subprocess so its peak
resident memory can be read; times are the best of ``--repeats`` runs. Prints one table with the ratio of
each peer's time to ours ("ours": the engine's default evidence path -- steady-state gain plus FFT
convolution for these time-invariant, complete-data series; "ours-parallel": the associative scan) and checks that all log-likelihoods agree.

    python benchmarks/kalman_loglik.py [--lengths 1000 10000 100000] [--repeats 3]

Pyro's GaussianHMM puts its initial state one transition before the first observation; we give it
``N(0, I)`` there and give our model (and the peers) the implied state at the first observation,
``N(0, F F^T + Q)``, so all compute the same number.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("ours", "ours+grad", "ours-parallel", "ours-parallel+grad", "ours-sequential", "statsmodels", "pykalman", "pyro-GaussianHMM", "pyro-GaussianHMM+grad")
SLOW_LIMIT = {"ours-sequential": 10_000, "pykalman": 100_000}


def problem(steps: int):
    import torch

    g = torch.Generator().manual_seed(0)
    n, p = 4, 2
    a = torch.randn(n, n, dtype=torch.float64, generator=g)
    f = 0.95 * a / torch.linalg.matrix_norm(a, 2)
    h = torch.randn(p, n, dtype=torch.float64, generator=g)
    b = torch.randn(n, n, dtype=torch.float64, generator=g)
    q = b @ b.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    c = torch.randn(p, p, dtype=torch.float64, generator=g)
    r = c @ c.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    y = torch.randn(steps, p, dtype=torch.float64, generator=g)
    m0 = torch.zeros(n, dtype=torch.float64)
    p0 = f @ f.T + q  # the state at the first observation when N(0, I) precedes the first transition
    return f, h, q, r, m0, p0, y


def run_case(method: str, steps: int, repeats: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    f, h, q, r, m0, p0, y = problem(steps)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method.startswith("ours"):
        from bmm_ppl.inference.kalman import log_likelihood
        from bmm_ppl.models.state_space import LinearGaussianParams

        kind = {"ours": "auto", "ours-sequential": "sequential"}.get(method.replace("+grad", ""), "parallel")
        grad = method.endswith("+grad")

        def call():
            leaves = [t.clone().requires_grad_(grad) for t in (f, h, q, r)]
            value = log_likelihood(LinearGaussianParams(*leaves, m0, p0), y, kind)
            if grad:
                value.backward()
            return float(value.detach())

    elif method == "statsmodels":
        from statsmodels.tsa.statespace.mlemodel import MLEModel

        model = MLEModel(y.numpy(), k_states=4)
        model["design"], model["obs_cov"], model["transition"] = h.numpy(), r.numpy(), f.numpy()
        model["selection"], model["state_cov"] = np.eye(4), q.numpy()
        model.ssm.initialize_known(m0.numpy(), p0.numpy())
        model.loglikelihood_burn = 0

        def call():
            return float(model.loglike(np.array([])))

    elif method == "pykalman":
        from pykalman import KalmanFilter

        kf = KalmanFilter(f.numpy(), h.numpy(), q.numpy(), r.numpy(), initial_state_mean=m0.numpy(), initial_state_covariance=p0.numpy())

        def call():
            return float(kf.loglikelihood(y.numpy()))

    else:
        import pyro.distributions as dist

        grad = method.endswith("+grad")

        def call():
            leaves = [t.clone().requires_grad_(grad) for t in (f, h, q, r)]
            hmm = dist.GaussianHMM(
                dist.MultivariateNormal(m0, torch.eye(4, dtype=torch.float64)),
                leaves[0].T,  # Pyro multiplies row vectors: x_{t+1} = x_t @ matrix
                dist.MultivariateNormal(m0, leaves[2]),
                leaves[1].T,
                dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), leaves[3]),
                duration=steps,
            )
            value = hmm.log_prob(y)
            if grad:
                value.backward()
            return float(value.detach())

    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {"method": method, "T": steps, "seconds": min(times), "log_likelihood": value, "peak_extra_mb": peak_mb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats)))
        return None
    rows = []
    for steps in args.lengths:
        for method in METHODS:
            if steps > SLOW_LIMIT.get(method, float("inf")):
                continue
            repeats = 1 if method in SLOW_LIMIT and steps >= 10_000 else args.repeats
            done = subprocess.run(
                [sys.executable, __file__, "--case", method, str(steps), "--repeats", str(repeats)],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                print(f"{method} T={steps} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("2-core CPU, torch/numpy single-threaded, float64, state dim 4, obs dim 2")
    print(f"{'T':>7} {'method':<24} {'seconds':>10} {'peer/ours':>10} {'peak MB':>9} {'rel. diff loglik':>17}")
    for steps in args.lengths:
        ours = next((r for r in rows if r["T"] == steps and r["method"] == "ours"), None)
        for row in (r for r in rows if r["T"] == steps):
            ratio = row["seconds"] / ours["seconds"] if ours else float("nan")
            diff = abs(row["log_likelihood"] - ours["log_likelihood"]) / abs(ours["log_likelihood"]) if ours else float("nan")
            print(f"{steps:>7} {row['method']:<24} {row['seconds']:>10.4f} {ratio:>10.2f} {row['peak_extra_mb']:>9.1f} {diff:>17.2e}")
    return rows


if __name__ == "__main__":
    main()
