"""The Laplace engine against exact answers (float64 throughout).

- A log joint quadratic in the weights (Bayesian linear regression written as a one-layer network): the
  Laplace posterior and evidence are exact, so they equal ``Exact``'s to 1e-8, and the type-II optimum of
  the Laplace evidence equals Exact's type-II optimum to 1e-4 relative.
- An output linear in the weights with any likelihood (logistic, softmax, Poisson regression): the GGN is
  the log-likelihood's Hessian, so the evidence equals the Laplace formula with the autograd Hessian.
- The empirical Fisher equals ``sum_i g_i g_i^T`` computed point by point.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from bmm_ppl.inference import Exact, Laplace, UnsupportedModelError
from bmm_ppl.models import BayesianLinearRegression, IdentityFeatures

F64 = torch.float64


def regression_data(n=30, d=3, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64, device="cpu")
    y = x @ torch.tensor([1.0, -0.5, 0.25], dtype=F64, device="cpu")[:d] + 0.3 * torch.randn(n, generator=g, dtype=F64, device="cpu")
    return x, y


def linear_network(alpha=None, beta=None):
    """``w ~ N(0, 1/alpha)``, ``y ~ N(x w, 1/beta)``; a precision ``None`` is a learned pyro.param."""
    def model(x, y):
        a = pyro.param("alpha", x.new_tensor(1.0), constraint=constraints.positive) if alpha is None else torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        b = pyro.param("beta", x.new_tensor(1.0), constraint=constraints.positive) if beta is None else torch.as_tensor(beta, dtype=x.dtype, device=x.device)
        w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[1]), a ** -0.5).to_event(1))
        mean = pyro.deterministic("mean", x @ w)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("obs", dist.Normal(mean, b ** -0.5), obs=y)
    return model


def test_quadratic_log_joint_gives_exact_evidence_and_posterior():
    x, y = regression_data()
    exact = Exact().fit(BayesianLinearRegression(IdentityFeatures(bias=False), 2.0, 9.0), x, y)
    post = Laplace(progress=False).fit(linear_network(2.0, 9.0), x, y)
    assert post.log_evidence.method == "laplace"
    assert abs(post.log_evidence.value - exact.log_evidence.value) < 1e-8
    torch.testing.assert_close(post.latent_distribution.loc, exact.latent_distribution.loc, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(post.latent_distribution.covariance_matrix, exact.latent_distribution.covariance_matrix,
                               rtol=1e-8, atol=1e-12)
    assert post.diagnostics["converged"] and post.diagnostics["curvature"] == "ggn"


def test_diagonal_is_exact_for_an_orthogonal_design_and_an_approximation_otherwise():
    x, y = regression_data()
    q, _ = torch.linalg.qr(x)
    orthogonal = q * 3.0
    for design, equal in ((orthogonal, True), (x, False)):
        exact = Exact().fit(BayesianLinearRegression(IdentityFeatures(bias=False), 2.0, 9.0), design, y).log_evidence.value
        diagonal = Laplace(hessian="diag", progress=False).fit(linear_network(2.0, 9.0), design, y).log_evidence.value
        assert (abs(diagonal - exact) < 1e-8) is equal, (diagonal, exact)


def test_type_two_optimum_equals_exact_type_two():
    x, y = regression_data(n=40)
    exact = Exact().fit(BayesianLinearRegression(IdentityFeatures(bias=False)), x, y)
    post = Laplace(progress=False).fit(linear_network(), x, y)
    for name in ("alpha", "beta"):
        learned, reference = float(post.hyperparameters[name]), float(exact.hyperparameters[name])
        assert abs(learned / reference - 1) < 1e-4, (name, learned, reference)
    assert abs(post.log_evidence.value - exact.log_evidence.value) < 1e-6
    assert post.diagnostics["converged"] and post.diagnostics["rounds"] > 1


def linear_output_model(kind):
    def model(x, y):
        k = 3 if kind == "categorical" else 1
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], k, dtype=F64), 0.8).to_event(2))
        f = pyro.deterministic("f", x @ w if k > 1 else (x @ w).squeeze(-1))
        with pyro.plate("data", x.shape[0]):
            if kind == "bernoulli":
                pyro.sample("obs", dist.Bernoulli(logits=f), obs=y)
            elif kind == "categorical":
                pyro.sample("obs", dist.Categorical(logits=f), obs=y)
            else:
                pyro.sample("obs", dist.Poisson(f.exp()), obs=y)
    return model


@pytest.mark.parametrize("kind", ["bernoulli", "categorical", "poisson"])
def test_linear_output_ggn_is_the_hessian(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=g, dtype=F64)
    y = {"bernoulli": (x[:, 0] + 0.3 * torch.randn(40, generator=g, dtype=F64) > 0).to(F64),
         "categorical": torch.randint(0, 3, (40,), generator=g),
         "poisson": torch.poisson((0.5 * x[:, 0]).exp(), generator=g)}[kind]
    model = linear_output_model(kind)
    post = Laplace(progress=False).fit(model, x, y)
    mode = post.latent_distribution.loc
    shape = post.latent_distribution.site_shapes["w"]

    def log_joint(flat):
        trace = pyro.poutine.trace(pyro.poutine.condition(model, data={"w": flat.reshape(shape)})).get_trace(x, y)
        return trace.log_prob_sum()

    hessian = torch.autograd.functional.hessian(log_joint, mode)
    expected = log_joint(mode) + 0.5 * mode.numel() * math.log(2 * math.pi) - 0.5 * torch.logdet(-hessian)
    assert abs(post.log_evidence.value - float(expected)) < 1e-8
    torch.testing.assert_close(post.latent_distribution.covariance_matrix, torch.linalg.inv(-hessian), rtol=1e-7, atol=1e-10)


def test_empirical_fisher_is_the_sum_of_pointwise_gradient_outer_products():
    x, y = regression_data(n=12)
    model = linear_network(2.0, 9.0)
    post = Laplace(curvature="ef", progress=False).fit(model, x, y)
    mode = post.latent_distribution.loc.clone()
    gradients = []
    for i in range(len(y)):
        w = mode.clone().requires_grad_(True)
        log_lik = dist.Normal(x[i] @ w, 9.0 ** -0.5).log_prob(y[i])
        gradients.append(torch.autograd.grad(log_lik, w)[0])
    fisher = torch.stack(gradients).T @ torch.stack(gradients)
    expected = torch.linalg.inv(fisher + 2.0 * torch.eye(3, dtype=F64))
    torch.testing.assert_close(post.latent_distribution.covariance_matrix, expected, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------- refused up front, bad input
def test_refusals_name_the_site_and_feature():
    x, y = regression_data()

    def gamma_prior(x, y):
        s = pyro.sample("s", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(pyro.deterministic("m", s * x[:, 0]), 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match="site 's' has Gamma"):
        Laplace(progress=False).fit(gamma_prior, x, y)

    # A LogNormal is a Normal pushed through exp: it has a Normal ``base_dist`` but is not a Gaussian prior
    # (the Gaussian would sit on log s while the draws are reported as s). Refused, masked or expanded too.
    def log_normal_prior(x, y):
        s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0).expand([1]).mask(True).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(pyro.deterministic("m", s * x[:, 0]), 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match="site 's' has LogNormal"):
        Laplace(progress=False).fit(log_normal_prior, x, y)

    def no_output(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(x @ w, 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match="pyro.deterministic"):
        Laplace(progress=False).fit(no_output, x, y)
    Laplace(curvature="ef", progress=False).fit(no_output, x, y)  # the empirical Fisher needs no output

    def latent_noise(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1))
        log_s = pyro.sample("log_s", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(pyro.deterministic("m", x @ w), log_s.exp()), obs=y)

    with pytest.raises(UnsupportedModelError, match="other than through the output 'm'"):
        Laplace(progress=False).fit(latent_noise, x, y)

    def subsampled(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1))
        with pyro.plate("data", len(y), subsample_size=5) as i:
            pyro.sample("obs", dist.Normal(pyro.deterministic("m", x[i] @ w), 1.0), obs=y[i])

    with pytest.raises(UnsupportedModelError, match=r"plate\(s\) \['data'\] subsample"):
        Laplace(progress=False).fit(subsampled, x, y)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"hessian must be one of 'full', 'diag', 'kron', got 'lowrank'"):
        Laplace(hessian="lowrank")
    with pytest.raises(ValueError, match=r"hessian='kron' needs curvature='ggn'"):
        Laplace(hessian="kron", curvature="ef")
    with pytest.raises(ValueError, match=r"kfac must be one of 'expand', 'reduce'"):
        Laplace(hessian="kron", kfac="sum")
    with pytest.raises(TypeError, match="subset must be a non-empty list"):
        Laplace(subset="w")
    with pytest.raises(ValueError, match="curvature must be one of"):
        Laplace(curvature="hessian")
    with pytest.raises(ValueError, match="max_rounds must be a positive int"):
        Laplace(max_rounds=0)


def test_follows_the_data_device(meta_default_device):
    x, y = regression_data()
    post = Laplace(progress=False).fit(linear_network(2.0, 9.0), x, y)
    assert post.samples(2)["w"].device.type == "cpu"


def test_linearised_predictive_of_a_linear_model_is_the_exact_predictive():
    """For an output linear in the weights the linearisation is exact: mean x* mu and variance x* Sigma x*^T
    of Exact's posterior (variances to 1e-8 relative; means to 1e-8 absolute, the mode's accuracy)."""
    from bmm_ppl.inference.laplace import linearised_predictive

    x, y = regression_data()
    new = regression_data(n=7, seed=3)[0]
    exact = Exact().fit(BayesianLinearRegression(IdentityFeatures(bias=False), 2.0, 9.0), x, y).latent_distribution
    post = Laplace(progress=False).fit(linear_network(2.0, 9.0), x, y)
    mean, variance = linearised_predictive(post, new, None)
    # the mode is as exact as its Newton decrement (<= 1e-8 nats) allows: 3.5e-10 off here
    torch.testing.assert_close(mean, new @ exact.mean["w"], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(variance, ((new @ exact.covariance_matrix) * new).sum(-1), rtol=1e-8, atol=1e-12)
    diagonal = Laplace(hessian="diag", progress=False).fit(linear_network(2.0, 9.0), x, y)
    _, diagonal_variance = linearised_predictive(diagonal, new, None)
    scale = diagonal.latent_distribution.scale
    torch.testing.assert_close(diagonal_variance, (new.pow(2) * scale.pow(2)).sum(-1), rtol=1e-8, atol=1e-12)


def test_probit_class_probabilities_from_a_softmax_regression():
    from bmm_ppl.inference.laplace import linearised_predictive, probit_probabilities

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(40, 2, generator=g, dtype=F64, device="cpu")
    y = torch.randint(0, 3, (40,), generator=g, device="cpu")
    post = Laplace(progress=False).fit(linear_output_model("categorical"), x, y)
    mean, covariance = linearised_predictive(post, x[:5], None)
    assert mean.shape == (5, 3) and covariance.shape == (5, 3, 3)
    assert bool((torch.linalg.eigvalsh(covariance) > -1e-12).all())
    probabilities = probit_probabilities(mean, covariance)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(5, dtype=F64))
    # the probit shrinks the mode's confidence toward uniform
    assert bool((probabilities.max(-1).values <= torch.softmax(mean, -1).max(-1).values + 1e-12).all())
