"""Exact engine against closed forms: brute-force marginal densities, the closed-form posterior,
MacKay's fixed point, and the log joint of the Pyro program itself. All float64 unless stated."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from bmm_ppl.inference import (
    Exact,
    HyperparameterBoundaryError,
    HyperparameterBoundaryWarning,
    Posterior,
    UnsupportedModelError,
)
from bmm_ppl.inference.exact import isotropic_prior as linear_gaussian
from bmm_ppl.models import BayesianLinearRegression, polynomial_features, rbf_features

F64 = torch.float64


def sin_data(n=40, seed=0, dtype=F64, noise=0.2):
    # Explicit CPU: under the device-discipline guard the default device is "meta".
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=dtype, device="cpu") * 2 - 1
    y = torch.sin(math.pi * x) + noise * torch.randn(n, generator=g, dtype=dtype, device="cpu")
    return x, y


def brute_force_log_evidence(phi, y, alpha, beta):
    n = phi.shape[0]
    cov = torch.eye(n, dtype=phi.dtype) / beta + phi @ phi.T / alpha
    return torch.distributions.MultivariateNormal(torch.zeros(n, dtype=phi.dtype), cov).log_prob(y)


@pytest.mark.parametrize("n,degree", [(40, 3), (10, 9), (200, 1), (5, 12)])
def test_log_evidence_equals_brute_force_marginal_density(n, degree):
    x, y = sin_data(n)
    alpha, beta = 0.7, 13.0
    post = Exact().fit(BayesianLinearRegression(polynomial_features(degree), alpha, beta), x, y)
    expected = brute_force_log_evidence(polynomial_features(degree)(x), y, alpha, beta)
    assert post.log_evidence.method.value == "exact" and post.log_evidence.stderr is None
    assert abs(post.log_evidence.value - float(expected)) < 1e-8


def test_d_much_larger_than_n_matches_brute_force():
    # 500 features, 20 points: the n x n marginal covariance is the cheap exact reference.
    x, y = sin_data(20)
    features = rbf_features(torch.linspace(-1, 1, 500, dtype=F64), 0.05)
    post = Exact().fit(BayesianLinearRegression(features, 2.0, 25.0), x, y)
    expected = brute_force_log_evidence(features(x), y, 2.0, 25.0)
    assert abs(post.log_evidence.value - float(expected)) < 1e-8


def test_posterior_equals_closed_form():
    x, y = sin_data(30)
    alpha, beta = 0.3, 20.0
    post = Exact().fit(BayesianLinearRegression(polynomial_features(4), alpha, beta), x, y)
    phi = polynomial_features(4)(x)
    precision = alpha * torch.eye(5, dtype=F64) + beta * phi.T @ phi
    covariance = torch.linalg.inv(precision)
    mean = beta * covariance @ phi.T @ y
    q = post.latent_distribution
    torch.testing.assert_close(q.mean["w"], mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(q.covariance_matrix, covariance, rtol=1e-8, atol=1e-12)


def test_evidence_identity_with_the_pyro_program():
    # log p(y) = log p(y | w) + log p(w) - log p(w | y) for any w: ties the engine to the model's trace.
    x, y = sin_data(25)
    model = BayesianLinearRegression(polynomial_features(3), 0.5, 9.0)
    post = Exact().fit(model, x, y)
    posterior_density = post.latent_distribution.to_distribution()
    for w in (torch.zeros(4, dtype=F64), torch.tensor([0.3, -1.0, 0.2, 2.0], dtype=F64)):
        trace = poutine.trace(poutine.condition(model, data={"w": w})).get_trace(x, y)
        log_joint = trace.log_prob_sum()
        identity = log_joint - posterior_density.log_prob(w)
        assert abs(float(identity) - post.log_evidence.value) < 1e-8


def mackay_fixed_point(phi, y, alpha=1.0, beta=1.0, iterations=20000):
    """MacKay (1992) re-estimation: alpha = gamma / |m|^2, beta = (n - gamma) / |y - phi m|^2."""
    eig = torch.linalg.eigvalsh(phi.T @ phi)
    n = phi.shape[0]
    for _ in range(iterations):
        precision = alpha * torch.eye(phi.shape[1], dtype=phi.dtype) + beta * phi.T @ phi
        m = beta * torch.linalg.solve(precision, phi.T @ y)
        gamma = (beta * eig / (alpha + beta * eig)).sum()
        new_alpha = gamma / m.pow(2).sum()
        new_beta = (n - gamma) / (y - phi @ m).pow(2).sum()
        if abs(new_alpha - alpha) < 1e-13 * alpha and abs(new_beta - beta) < 1e-13 * beta:
            break
        alpha, beta = new_alpha, new_beta
    return float(alpha), float(beta)


def test_type2_optimum_agrees_with_mackay_fixed_point():
    x, y = sin_data(40)
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3)), x, y)
    alpha, beta = mackay_fixed_point(polynomial_features(3)(x), y)
    assert post.diagnostics["boundary"] == {}
    assert abs(float(post.hyperparameters["alpha"]) / alpha - 1) < 1e-5
    assert abs(float(post.hyperparameters["beta"]) / beta - 1) < 1e-5


def test_type2_learns_only_the_unfixed_hyperparameter():
    x, y = sin_data(40)
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3), alpha=2.0), x, y)
    assert set(post.hyperparameters) == {"beta"}
    # At the optimum over beta alone the derivative of the evidence in beta vanishes.
    phi = polynomial_features(3)(x)
    log_beta = torch.log(post.hyperparameters["beta"]).clone().requires_grad_(True)
    value = linear_gaussian.log_evidence(linear_gaussian.spectral_data(phi, y), torch.tensor(2.0, dtype=F64), log_beta.exp())
    (grad,) = torch.autograd.grad(value, log_beta)
    assert abs(float(grad)) < 1e-6


def test_boundary_alpha_to_infinity_is_reported_not_returned():
    # Pure noise: the evidence keeps rising as alpha -> inf (the data prefer w = 0).
    g = torch.Generator().manual_seed(3)
    x = torch.linspace(0, 1, 10, dtype=F64)
    y = 0.3 * torch.randn(10, generator=g, dtype=F64)
    model = BayesianLinearRegression(polynomial_features(3))
    with pytest.raises(HyperparameterBoundaryError, match=r"alpha -> \+inf") as info:
        Exact().fit(model, x, y)
    assert info.value.boundary == {"alpha": "+inf"}
    with pytest.warns(HyperparameterBoundaryWarning):
        post = Exact(on_boundary="clip").fit(model, x, y)
    assert post.diagnostics["boundary"] == {"alpha": "+inf"}
    # The clipped fit's evidence approaches the no-signal limit y ~ N(0, beta^-1 I) from below.
    limit = post.diagnostics["limit_log_evidence"]
    beta = 10 / y.pow(2).sum()
    expected_limit = torch.distributions.Normal(0.0, beta.rsqrt()).log_prob(y).sum()
    assert abs(limit - float(expected_limit)) < 1e-9
    assert post.log_evidence.value <= limit + 1e-9 and limit - post.log_evidence.value < 1e-3


def test_on_boundary_rejects_unknown_choice():
    with pytest.raises(ValueError, match="on_boundary='ignore' is not one of 'raise', 'clip'"):
        Exact(on_boundary="ignore")


def test_float32_agrees_with_float64():
    x, y = sin_data(40)
    model = BayesianLinearRegression(polynomial_features(5))
    post64 = Exact().fit(model, x, y)
    post32 = Exact().fit(model, x.float(), y.float())
    assert post32.samples(3)["w"].dtype == torch.float32
    assert abs(post32.log_evidence.value - post64.log_evidence.value) < 1e-3
    rel = abs(float(post32.hyperparameters["alpha"]) / float(post64.hyperparameters["alpha"]) - 1)
    assert rel < 1e-3


def test_large_n_small_d_is_fast_and_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(100_000, generator=g, dtype=F64)
    y = 1 - 2 * x + 0.5 * torch.randn(100_000, generator=g, dtype=F64)
    post = Exact().fit(BayesianLinearRegression(polynomial_features(2)), x, y)
    # Noise precision 1 / 0.25 = 4 estimated from 1e5 points: relative error ~ sqrt(2 / n) = 0.45%.
    assert abs(float(post.hyperparameters["beta"]) / 4.0 - 1) < 0.02


def test_batched_targets_in_the_functional_core():
    x, y = sin_data(30)
    phi = polynomial_features(3)(x)
    targets = torch.stack([y, 2 * y, -y + 0.1], dim=-1)
    data = linear_gaussian.spectral_data(phi, targets)
    alpha, beta = torch.tensor(0.5, dtype=F64), torch.tensor(4.0, dtype=F64)
    batched = linear_gaussian.log_evidence(data, alpha, beta)
    assert batched.shape == (3,)
    for j in range(3):
        expected = brute_force_log_evidence(phi, targets[:, j], 0.5, 4.0)
        assert abs(float(batched[j] - expected)) < 1e-8
    means = linear_gaussian.posterior_mean(data, alpha, beta)
    assert means.shape == (4, 3)


def test_samples_and_predictive_follow_the_posterior():
    x, y = sin_data(40)
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3), 1.0, 25.0), x, y)
    pyro.set_rng_seed(1)
    draws = post.samples(4000)["w"]
    q = post.latent_distribution
    sd = q.covariance_matrix.diagonal().sqrt()
    # |sample mean - mean| < 4 sd / sqrt(4000) for independent draws.
    assert ((draws.mean(0) - q.mean["w"]).abs() < 4 * sd / math.sqrt(4000)).all()
    x_new = torch.linspace(-1, 1, 5, dtype=F64)
    predicted = post.predict(x_new, num_samples=4000)["obs"]
    phi_new = polynomial_features(3)(x_new)
    mean = phi_new @ q.mean["w"]
    predictive_sd = (1 / 25.0 + (phi_new @ q.covariance_matrix * phi_new).sum(-1)).sqrt()
    assert predicted.shape == (4000, 5)
    assert ((predicted.mean(0) - mean).abs() < 4 * predictive_sd / math.sqrt(4000)).all()
    # Predictive sd within 10%: the sd of 4000 Gaussian draws has relative error ~ 1 / sqrt(8000) = 1.1%.
    assert ((predicted.std(0) / predictive_sd - 1).abs() < 0.1).all()


def test_save_and_load_without_unpickling_code(tmp_path):
    x, y = sin_data(20)
    model = BayesianLinearRegression(polynomial_features(3))
    post = Exact().fit(model, x, y)
    path = tmp_path / "posterior.pt"
    post.save(path)
    loaded = Posterior.load(path, model=model, args=(x, y))
    assert loaded.log_evidence == post.log_evidence
    assert loaded.engine == "Exact"
    torch.testing.assert_close(loaded.hyperparameters["alpha"], post.hyperparameters["alpha"])
    torch.testing.assert_close(loaded.latent_distribution.mean["w"], post.latent_distribution.mean["w"])
    assert loaded.predict(x, num_samples=7)["obs"].shape == (7, 20)
    bare = Posterior.load(path)
    with pytest.raises(RuntimeError, match="without its model"):
        bare.predict(x)


# ----------------------------------------------------------------------------- bad input
def test_mismatched_lengths_name_the_arguments():
    x, y = sin_data(10)
    with pytest.raises(ValueError, match="x has 10, y has 9"):
        Exact().fit(BayesianLinearRegression(polynomial_features(2), 1.0, 1.0), x, y[:9])


@pytest.mark.parametrize("which", ["x", "y"])
def test_nan_data_is_rejected(which):
    x, y = sin_data(10)
    bad = {"x": x, "y": y}
    bad[which] = bad[which].clone()
    bad[which][3] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        Exact().fit(BayesianLinearRegression(polynomial_features(2), 1.0, 1.0), bad["x"], bad["y"])


@pytest.mark.parametrize("alpha,beta", [(0.0, 1.0), (1.0, -2.0)])
def test_non_positive_precisions_are_rejected(alpha, beta):
    with pytest.raises(ValueError, match="must be positive"):
        BayesianLinearRegression(polynomial_features(2), alpha, beta)


def test_data_on_two_devices_is_rejected():
    x, y = sin_data(10)
    with pytest.raises(ValueError, match="different devices"):
        Exact().fit(BayesianLinearRegression(polynomial_features(2), 1.0, 1.0), x, y.to("meta"))


def test_unsupported_model_names_other_engines():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.StudentT(3.0, w * x, 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match="SVI.*NUTS"):
        Exact().fit(model, *sin_data(10))


def test_hyperprior_is_unsupported_by_exact():
    model = BayesianLinearRegression(polynomial_features(2), alpha=dist.Gamma(1.0, 1.0), beta=1.0)
    with pytest.raises(UnsupportedModelError, match="hyperprior on alpha"):
        Exact().fit(model, *sin_data(10))


# ------------------------------------------------------------------------ device discipline
def test_exact_follows_the_data_device(meta_default_device):
    x, y = sin_data(20)
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3)), x, y)
    assert post.device.type == "cpu"
    assert post.samples(5)["w"].device.type == "cpu"
    assert post.predict(x, num_samples=5)["obs"].device.type == "cpu"
    assert post.log_likelihood()["obs"].device.type == "cpu"


@pytest.mark.gpu
def test_exact_on_cuda_matches_cpu():
    x, y = sin_data(40)
    model = BayesianLinearRegression(polynomial_features(3))
    cpu = Exact().fit(model, x, y)
    gpu = Exact(device="cuda").fit(model, x, y)
    assert gpu.device.type == "cuda"
    assert abs(gpu.log_evidence.value - cpu.log_evidence.value) < 1e-8
