"""Analysis of posteriors: ArviZ summaries, plots and uncertainty decomposition."""

import math

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.analysis.diagnostics import max_rhat, min_ess, summary
from bmm_ppl.analysis.plots import plot_pair, plot_posterior, plot_predictive_band, plot_trace
from bmm_ppl.analysis.uncertainty import (
    decompose_classification,
    decompose_regression,
    plot_uncertainty,
    uncertainty_decomposition,
)
from bmm_ppl.inference import Exact, Posterior
from bmm_ppl.models import BayesianLinearRegression, polynomial_features


def iid_posterior(chains=4, draws=500):
    generator = torch.Generator().manual_seed(0)
    return Posterior(None, draws={"w": torch.randn(chains, draws, 2, generator=generator, dtype=torch.float64)})


def test_summary_of_independent_draws():
    post = iid_posterior()
    table = summary(post)
    assert list(table.index) == ["w[0]", "w[1]"]
    assert (table["r_hat"] <= 1.01).all() and (table["ess_bulk"] > 1000).all()
    assert max_rhat(post) <= 1.01 and min_ess(post) > 1000


def test_rhat_flags_chains_that_disagree():
    draws = torch.randn(4, 300, 1, generator=torch.Generator().manual_seed(0))
    draws[0] += 3.0  # one chain stuck elsewhere
    assert max_rhat(Posterior(None, draws={"w": draws})) > 1.1
    with pytest.raises(KeyError, match="no draws"):
        summary(Posterior(None, draws={"w": draws}), var_names=["v"])


def test_plots_return_figures(tmp_path):
    post = iid_posterior(2, 100)
    post.sample_stats["diverging"] = torch.zeros(2, 100, dtype=torch.bool)
    for plot in (plot_trace, plot_posterior, plot_pair):
        figure = plot(post)
        figure.savefig(tmp_path / f"{plot.__name__}.png")
        plt.close(figure)
        assert (tmp_path / f"{plot.__name__}.png").stat().st_size > 0


def regression_fit():
    x = torch.linspace(-1, 1, 15, dtype=torch.float64)
    y = torch.sin(3 * x)
    model = BayesianLinearRegression(polynomial_features(3), alpha=1.0, beta=25.0)
    return Exact().fit(model, x, y), x, y


def test_predictive_band_and_regression_decomposition(tmp_path):
    post, x, y = regression_fit()
    grid = torch.linspace(-2, 2, 30, dtype=torch.float64)
    figure = plot_predictive_band(post, grid, x_observed=x, y_observed=y)
    figure.savefig(tmp_path / "band.png")
    plt.close(figure)
    parts = uncertainty_decomposition(post, grid, num_samples=2000)
    assert parts["kind"] == "variance"
    # Aleatoric = the noise variance 1/beta everywhere; epistemic grows away from the data.
    torch.testing.assert_close(parts["aleatoric"], torch.full_like(grid, 1 / 25.0))
    assert parts["epistemic"][0] > 10 * parts["epistemic"][15]
    torch.testing.assert_close(parts["total"], parts["aleatoric"] + parts["epistemic"])
    figure = plot_uncertainty(grid, parts)
    figure.savefig(tmp_path / "uncertainty.png")
    plt.close(figure)


def test_classification_decomposition_through_a_model():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with pyro.plate("data", len(x)):
            return pyro.sample("obs", dist.Bernoulli(logits=w * x), obs=y)

    x = torch.tensor([0.0, 5.0], dtype=torch.float64)
    draws = {"w": torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(50).reshape(1, 100)}
    post = Posterior(model, (x,), draws=draws)
    parts = uncertainty_decomposition(post, x, num_samples=100)
    assert parts["kind"] == "entropy"
    # x = 0: every draw says p = 1/2, all aleatoric; x = 5: draws disagree (p ~ 0.007 or 0.993), mostly epistemic.
    assert parts["total"][0] == pytest.approx(math.log(2)) and parts["epistemic"][0] == pytest.approx(0.0, abs=1e-12)
    assert parts["epistemic"][1] > 10 * parts["aleatoric"][1]


def test_decompositions_reject_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        decompose_classification(torch.ones(2, 3, 4, 5))
    with pytest.raises(ValueError, match="means and variances"):
        decompose_regression(torch.ones(3, 2), torch.ones(3))
