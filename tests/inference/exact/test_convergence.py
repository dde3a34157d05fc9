"""Exact's type-II optimiser reports convergence like every iterative engine: diagnostics + ConvergenceWarning."""

import pytest
import torch

from bmm_ppl.inference import ConvergenceWarning, Exact
from bmm_ppl.inference.exact import isotropic_prior
from bmm_ppl.models import BayesianLinearRegression, polynomial_features

F64 = torch.float64


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.linspace(-1, 1, 60, dtype=F64)
    return x, torch.sin(3 * x) + 0.2 * torch.randn(60, generator=generator, dtype=F64)


def gradient_at(post, x, y):
    # The gradient of the exact evidence over (log alpha, log beta), recomputed from the closed form.
    phi = polynomial_features(3)(x)
    spectral = isotropic_prior.spectral_data(phi, y)
    theta = torch.stack([post.hyperparameters["alpha"].log(), post.hyperparameters["beta"].log()]).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(isotropic_prior.log_evidence(spectral, theta[0].exp(), theta[1].exp()), theta)
    return float(grad.norm())


def test_converged_type2_reports_its_gradient_norm():
    x, y = data()
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3)), x, y)
    d = post.diagnostics
    assert d["converged"] is True
    assert d["gradient_norm"] <= 1e-5 * 60
    assert d["gradient_norm"] == pytest.approx(gradient_at(post, x, y), rel=1e-3, abs=1e-9)
    assert 0 < d["num_iterations"] <= d["max_iterations"] == 500


def test_capped_type2_warns_by_name():
    x, y = data()
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        post = Exact(max_iter=1).fit(BayesianLinearRegression(polynomial_features(3)), x, y)
    d = post.diagnostics
    assert d["converged"] is False and d["num_iterations"] == 1
    assert d["gradient_norm"] == pytest.approx(gradient_at(post, x, y), rel=1e-3)
    assert d["gradient_norm"] > 1e-5 * 60


def test_fixed_hyperparameters_have_nothing_to_converge():
    x, y = data()
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3), alpha=1.0, beta=25.0), x, y)
    assert post.diagnostics["converged"] is True and post.diagnostics["num_iterations"] == 0
