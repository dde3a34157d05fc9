"""NUTS effective samples per second on Bayesian logistic regression (breast cancer, 31 coefficients).

Compares ``bmm_ppl.inference.NUTS`` (plain and ``jit=True``) with Pyro's ``MCMC(NUTS)`` (plain and
``jit_compile=True``) and, where installed, NumPyro's NUTS, all on the same data in one run: 500 warm-up
+ 1000 draws per chain, first with 1 chain, then (``--chains 1 4``) with 4 chains, each sampler in its
own multi-chain mode: ours batched in one process, Pyro's chains in parallel processes, NumPyro's
vectorised. ESS/s = min bulk ESS over the coefficients (ArviZ, all chains) / wall time, warm-up and any
compilation included. With ``--repeats R`` every sampler runs R times (seeds 0..R-1; NumPyro's compilation
cache is cleared before each run, so each run pays its compilation as a user's first run does), and the
ratios compare median ESS/s: the minimum bulk ESS over 31 coefficients varies by about 20% from seed to
seed. Prints a table of ratios against the peers for each chain count.

``--dense`` adds both samplers with dense mass matrices (``dense_mass=True``), compared with each other.

Run: ``python benchmarks/nuts_ess_per_second.py [--quick] [--skip-pyro] [--chains 1 4] [--repeats 3] [--dense]``
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_breast_cancer

from bmm_ppl.inference.hmc import NUTS


def data(dtype=torch.float64):
    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    features = np.concatenate([np.ones((len(features), 1)), features], 1)  # 30 features + intercept = 31
    return torch.tensor(features, dtype=dtype), torch.tensor(labels, dtype=dtype)


def model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype, device=x.device), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0], device=x.device):
        pyro.sample("obs", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def min_ess(draws: np.ndarray) -> float:
    """draws: (chain, draw, 31)."""
    return float(az.ess(az.convert_to_dataset({"w": draws}), method="bulk")["w"].values.min())


def run_ours(x, y, warmup, samples, jit, chains=1, seed=0, dense=False):
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    post = NUTS(num_samples=samples, warmup_steps=warmup, num_chains=chains, jit=jit, dense_mass=dense,
                progress=False).fit(model, x, y)
    seconds = time.perf_counter() - start
    return min_ess(post.draws()["w"].numpy()), seconds, post.diagnostics["num_gradient_evaluations"]


def run_pyro(x, y, warmup, samples, jit, chains=1, seed=0):
    from pyro.infer import MCMC
    from pyro.infer import NUTS as PyroNUTS

    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    mcmc = MCMC(PyroNUTS(model, jit_compile=jit, ignore_jit_warnings=True), num_samples=samples,
                warmup_steps=warmup, num_chains=chains, disable_progbar=True)
    mcmc.run(x, y)
    seconds = time.perf_counter() - start
    return min_ess(mcmc.get_samples(group_by_chain=True)["w"].numpy()), seconds, None


def run_numpyro(x, y, warmup, samples, chains=1, seed=0, dense=False):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import MCMC as NMCMC
    from numpyro.infer import NUTS as NNUTS

    jax.config.update("jax_enable_x64", True)

    def nmodel(x, y):
        w = numpyro.sample("w", ndist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", ndist.Bernoulli(logits=x @ w), obs=y)

    xs, ys = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    jax.clear_caches()  # each run compiles, as a user's first run does
    start = time.perf_counter()
    mcmc = NMCMC(NNUTS(nmodel, dense_mass=dense), num_warmup=warmup, num_samples=samples, num_chains=chains, progress_bar=False,
                 chain_method="vectorized" if chains > 1 else "sequential")
    mcmc.run(jax.random.PRNGKey(seed), xs, ys)
    w = np.asarray(mcmc.get_samples(group_by_chain=True)["w"])
    seconds = time.perf_counter() - start
    return min_ess(w), seconds, None


def main(quick: bool = False, skip_pyro: bool = False, chain_counts=(1,), repeats: int = 1, dense: bool = False) -> dict:
    torch.set_num_threads(1)
    warmup, samples = (100, 200) if quick else (500, 1000)
    x, y = data()
    try:
        import numpyro  # noqa: F401

        has_numpyro = True
    except ImportError:
        print("NumPyro not installed: skipped")
        has_numpyro = False
    results = {}
    for chains in chain_counts:
        runs = {
            "bmm NUTS": lambda seed: run_ours(x, y, warmup, samples, jit=False, chains=chains, seed=seed),
            "bmm NUTS jit": lambda seed: run_ours(x, y, warmup, samples, jit=True, chains=chains, seed=seed),
        }
        if not skip_pyro:
            runs["Pyro MCMC(NUTS)"] = lambda seed: run_pyro(x, y, warmup, samples, jit=False, chains=chains, seed=seed)
            runs["Pyro MCMC(NUTS) jit"] = lambda seed: run_pyro(x, y, warmup, samples, jit=True, chains=chains, seed=seed)
        if has_numpyro:
            runs["NumPyro NUTS"] = lambda seed: run_numpyro(x, y, warmup, samples, chains=chains, seed=seed)
        if dense:  # dense mass matrices, compared like with like
            runs["bmm NUTS jit dense"] = lambda seed: run_ours(x, y, warmup, samples, jit=True, chains=chains, seed=seed, dense=True)
            if has_numpyro:
                runs["NumPyro NUTS dense"] = lambda seed: run_numpyro(x, y, warmup, samples, chains=chains, seed=seed, dense=True)
        results[chains] = {}
        print(f"\n{chains} chain(s), {warmup} warm-up + {samples} draws each, {repeats} run(s) per sampler")
        for name, run in runs.items():
            per_run = []
            for seed in range(repeats):
                try:
                    ess, seconds, grads = run(seed)
                except Exception as error:  # noqa: BLE001 - a peer that cannot run this mode is reported, not fatal
                    print(f"{name:22s} failed: {type(error).__name__}: {error}")
                    break
                per_run.append({"min_bulk_ess": ess, "seconds": seconds, "ess_per_second": ess / seconds, "gradients": grads})
                print(f"{name:22s} seed {seed}  min ESS {ess:7.1f}  time {seconds:7.1f} s  ESS/s {ess / seconds:7.2f}", flush=True)
            if len(per_run) == repeats:
                rates = sorted(r["ess_per_second"] for r in per_run)
                results[chains][name] = {"runs": per_run, "ess_per_second": float(np.median(rates))}
                if repeats > 1:
                    print(f"{name:22s} median ESS/s {np.median(rates):7.2f}  (min {rates[0]:.2f}, max {rates[-1]:.2f})")
        print(f"ratios (median ESS/s of bmm NUTS over the peer's; 2-core CPU, {chains} chain(s)):")
        for ours in ("bmm NUTS", "bmm NUTS jit", "bmm NUTS jit dense"):
            for peer in results[chains]:
                if peer.startswith("bmm") or ours not in results[chains] or ("dense" in ours) != ("dense" in peer):
                    continue
                ratio = results[chains][ours]["ess_per_second"] / results[chains][peer]["ess_per_second"]
                print(f"  {ours:14s} / {peer:22s} = {ratio:6.2f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 warm-up + 200 draws")
    parser.add_argument("--skip-pyro", action="store_true", help="leave Pyro's (slow) sampler out")
    parser.add_argument("--chains", type=int, nargs="+", default=[1], help="chain counts to run (e.g. 1 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per sampler (seeds 0..R-1); ratios of medians")
    parser.add_argument("--dense", action="store_true", help="also dense mass matrices: ours against NumPyro's dense_mass")
    options = parser.parse_args()
    main(options.quick, options.skip_pyro, tuple(options.chains), options.repeats, options.dense)
