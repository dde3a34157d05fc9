"""to_arviz on the installed ArviZ (0.2x InferenceData or 1.x DataTree): groups, shapes, summary, LOO."""

import arviz as az
import numpy as np
import torch

from bmm_ppl.analysis import from_groups, to_arviz
from bmm_ppl.analysis.arviz_convert import ARVIZ_MAJOR
from bmm_ppl.inference import Exact
from bmm_ppl.models import BayesianLinearRegression, polynomial_features
from tests.inference.test_posterior import stored_posterior


def sin_data(n=25):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(n, generator=g, dtype=torch.float64, device="cpu")
    y = torch.sin(3 * x) + 0.2 * torch.randn(n, generator=g, dtype=torch.float64, device="cpu")
    return x, y


MODEL = BayesianLinearRegression(polynomial_features(3), 1.0, 25.0)


def fitted():
    return Exact().fit(MODEL, *sin_data())


def test_groups_and_shapes_for_an_exact_posterior():
    idata = to_arviz(fitted(), num_samples=400)
    assert idata.posterior["w"].shape == (1, 400, 4)
    assert idata.log_likelihood["obs"].shape == (1, 400, 25)
    assert idata.posterior_predictive["obs"].shape == (1, 400, 25)
    assert idata.observed_data["obs"].shape == (25,)


def exact_leave_one_out(x, y):
    """sum_i log p(y_i | y_-i) by refitting the exact posterior without point i."""
    total = 0.0
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        q = Exact().fit(MODEL, x[keep], y[keep]).latent_distribution
        phi = polynomial_features(3)(x[i : i + 1])
        variance = 1 / 25.0 + phi @ q.covariance_matrix @ phi.T
        total += float(torch.distributions.Normal(phi @ q.mean["w"], variance.sqrt()).log_prob(y[i]))
    return total


def test_summary_and_psis_loo_match_exact_leave_one_out():
    x, y = sin_data()
    idata = Exact().fit(MODEL, x, y).to_arviz(num_samples=2000)
    summary = az.summary(idata, var_names=["w"])
    assert len(summary) == 4
    loo = az.loo(idata)
    elpd = float(loo["elpd_loo"] if ARVIZ_MAJOR < 1 else loo.elpd)
    # PSIS-LOO from 2000 exact posterior draws against exact refits: measured 0.03 nats apart.
    assert abs(elpd - exact_leave_one_out(x, y)) < 0.25


def test_chains_of_stored_draws_are_kept():
    post, samples = stored_posterior(chains=3, draws=40)
    idata = to_arviz(post)
    assert idata.posterior["w"].shape == (3, 40)
    np.testing.assert_allclose(idata.posterior["w"].values, samples["w"].numpy(), rtol=1e-6)
    assert float(az.rhat(idata, var_names=["w"])["w"]) > 0


def test_from_groups_builds_any_group():
    data = from_groups({"posterior": {"mu": np.zeros((2, 5))}, "sample_stats": {"diverging": np.zeros((2, 5), bool)}})
    assert data.sample_stats["diverging"].shape == (2, 5)
