"""Tutorial 03: sampling engines on Bayesian logistic regression, then analysis in ArviZ.

The same Pyro model is fitted by NUTS (batched chains, captured potential) and by stochastic-gradient
HMC with minibatches; we check convergence (R-hat, ESS), compare the posteriors and their LOO, and split
the predictive uncertainty into aleatoric and epistemic parts along a line that leaves the data.

Run: ``python tutorials/03_sampling_engines.py [out_dir] [--quick]``
"""

from __future__ import annotations

import argparse
import pathlib

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

from bmm_ppl.analysis.diagnostics import max_rhat, min_ess, summary  # noqa: E402
from bmm_ppl.analysis.plots import plot_trace  # noqa: E402
from bmm_ppl.analysis.uncertainty import plot_uncertainty, uncertainty_decomposition  # noqa: E402
from bmm_ppl.inference.hmc import NUTS  # noqa: E402
from bmm_ppl.inference.sgmcmc import SGLD  # noqa: E402


def breast_cancer(num_features: int):
    """Standardised features (the first ``num_features``) with an intercept column, and 0/1 labels."""
    features, labels = load_breast_cancer(return_X_y=True)
    features = features[:, :num_features]
    features = (features - features.mean(0)) / features.std(0)
    design = np.concatenate([np.ones((len(features), 1)), features], 1)
    return torch.tensor(design, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)


def logistic_regression(x, y=None):
    """``w ~ N(0, I)``, ``y_i ~ Bernoulli(sigmoid(x_i . w))``."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype, device=x.device), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0], device=x.device):
        return pyro.sample("obs", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def main(out_dir, quick: bool = False) -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(0)
    x, y = breast_cancer(num_features=4 if quick else 10)
    size = {"num_samples": 150, "warmup_steps": 100} if quick else {"num_samples": 1000, "warmup_steps": 500}

    # 1. NUTS: 2 chains advance together; jit=True captures the potential and its gradient as one graph.
    nuts = NUTS(num_chains=2, jit=True, evidence="bridge", progress=False, **size).fit(logistic_regression, x, y)
    # 2. SGHMC with minibatches of 64 (the likelihood is scaled by n / 64) and a small step.
    sghmc = SGLD(num_samples=size["num_samples"], warmup_steps=4 * size["warmup_steps"], num_chains=2, thin=2,
                 lr=2e-4, method="sghmc", batch_size=64, progress=False).fit(logistic_regression, x, y)

    results = {"nuts_max_rhat": max_rhat(nuts), "nuts_min_ess": min_ess(nuts),
               "nuts_divergences": nuts.diagnostics["num_divergences"],
               "nuts_bridge_log_evidence": nuts.log_evidence.value, "nuts_bridge_stderr": nuts.log_evidence.stderr}
    nuts_mean = nuts.samples()["w"].mean(0)
    sghmc_mean = sghmc.samples()["w"].mean(0)
    nuts_sd = nuts.samples()["w"].std(0)
    results["max_mean_gap_in_nuts_sd"] = float(((sghmc_mean - nuts_mean).abs() / nuts_sd).max())
    summary(nuts).to_csv(out / "nuts_summary.csv")
    for name, post in (("nuts", nuts), ("sghmc", sghmc)):
        results[f"{name}_elpd_loo"] = float(az.loo(post.to_arviz(posterior_predictive=False)).elpd_loo)

    figure = plot_trace(nuts)
    figure.savefig(out / "nuts_trace.png")
    plt.close(figure)

    # 3. Uncertainty along a line through the data's centre in the direction of the first feature:
    #    epistemic uncertainty (disagreement between posterior draws) grows as the inputs leave the data.
    t = torch.linspace(-8, 8, 41, dtype=torch.float64)
    line = torch.zeros(len(t), x.shape[1], dtype=torch.float64)
    line[:, 0], line[:, 1] = 1.0, t
    parts = uncertainty_decomposition(nuts, line, num_samples=200)
    figure = plot_uncertainty(t, parts)
    figure.axes[0].set_xlabel("standardised first feature (data within about ±3)")
    figure.savefig(out / "uncertainty.png")
    plt.close(figure)
    inside = t.abs() <= 1
    results["epistemic_inside"] = float(parts["epistemic"][inside].mean())
    results["epistemic_far"] = float(parts["epistemic"][t.abs() >= 7].mean())
    results["figures"] = sorted(p.name for p in out.glob("*.png"))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tutorial_03_output")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    for key, value in main(options.out_dir, options.quick).items():
        print(f"{key}: {value}")
