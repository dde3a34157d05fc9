"""GPEvidence checks its own numbers: scale-equivariant evidence, GPyTorch's value at the same
hyperparameters, jittered Cholesky, and convergence reported by name."""

import math

import pytest
import torch

from bmm_ppl.inference import ConvergenceWarning
from bmm_ppl.inference.exact.gp_evidence import (
    GPEvidence,
    gaussian_log_evidence,
    jittered_cholesky,
    standardised_log_evidence,
    total_exact_log_evidence,
)
from bmm_ppl.models.invariance import GPRegression
from bmm_ppl.models.invariance._gpytorch import gpytorch

F64 = torch.float64
N = 40


def sine_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, generator=generator, dtype=F64)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(N, generator=generator, dtype=F64)
    return x, y


def scaled_rbf_gp(jitter=0.0):
    # jitter=0: the model itself is then exactly scale-equivariant (a fixed jitter of 1e-6 on K is not).
    return GPRegression(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), jitter=jitter)


def lbfgs():
    return GPEvidence(num_steps=10, lr=1.0, optimizer="lbfgs", progress=False)


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ConvergenceWarning")
def test_adam_trajectory_is_the_same_for_targets_times_1e6():
    # 20 Adam steps on y and on 1e6 y follow the same
    # path in standardised units, so the evidences differ by exactly N log 1e6 (to round-off).
    x, y = sine_data()
    engine = GPEvidence(num_steps=20, lr=0.1, progress=False)
    base = engine.fit(scaled_rbf_gp(), x, y)
    scaled = engine.fit(scaled_rbf_gp(), x, y * 1e6)
    expected = base.log_evidence.value - N * math.log(1e6)
    assert scaled.log_evidence.value == pytest.approx(expected, rel=1e-8)
    assert float(scaled.hyperparameters["noise"]) == pytest.approx(1e12 * float(base.hyperparameters["noise"]), rel=1e-6)


def test_targets_times_1e6_reach_the_optimum_at_the_default_settings():
    # Before: Adam at its defaults started the outputscale and noise at O(1) on targets of O(1e6) and
    # returned -4e11 labelled exact. The optimum is the x1 optimum shifted by -N log 1e6.
    x, y = sine_data()
    reference = lbfgs().fit(scaled_rbf_gp(), x, y)
    scaled = GPEvidence(progress=False).fit(scaled_rbf_gp(), x, y * 1e6)
    expected = reference.log_evidence.value - N * math.log(1e6)
    assert scaled.diagnostics["converged"] is True
    assert scaled.log_evidence.method.value == "exact"
    # Adam stops within its gradient test (<= 1e-3 per observation): the evidence is within 1e-3 nats.
    assert abs(scaled.log_evidence.value - expected) < 1e-3
    assert scaled.diagnostics["target_scale"] == pytest.approx(1e6 * reference.diagnostics["target_scale"], rel=1e-12)


@pytest.mark.parametrize("factor", [1e-3, 1e6])
def test_evidence_is_equivariant_in_the_target_scale(factor):
    # log p(c y) = log p(y) - N log c at the optimum, and the variances scale by c^2.
    x, y = sine_data()
    base = lbfgs().fit(scaled_rbf_gp(), x, y)
    scaled = lbfgs().fit(scaled_rbf_gp(), x, y * factor)
    expected = base.log_evidence.value - N * math.log(factor)
    assert scaled.log_evidence.value == pytest.approx(expected, rel=1e-6, abs=1e-6)
    for name in ("noise", "kernel.outputscale"):
        assert float(scaled.hyperparameters[name]) == pytest.approx(factor**2 * float(base.hyperparameters[name]), rel=1e-5)
    lengthscale = "kernel.base_kernel.lengthscale"
    assert float(scaled.hyperparameters[lengthscale]) == pytest.approx(float(base.hyperparameters[lengthscale]), rel=1e-5)


def test_evidence_matches_gpytorch_exact_marginal_likelihood_at_the_learned_hyperparameters():
    x, y = sine_data()
    y = y * 1e6
    post = lbfgs().fit(scaled_rbf_gp(), x, y)
    h = post.hyperparameters
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    kernel.outputscale = h["kernel.outputscale"]
    kernel.base_kernel.lengthscale = h["kernel.base_kernel.lengthscale"]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = h["noise"]

    class ZeroMeanGP(gpytorch.models.ExactGP):
        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(inputs.new_zeros(inputs.shape[0]), kernel(inputs))

    gp = ZeroMeanGP(x, y, likelihood).double()
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        reference = float(total_exact_log_evidence(mll, gp(x), y))  # n * mll - log priors (none here)
    assert post.log_evidence.value == pytest.approx(reference, rel=1e-9)
    assert post.diagnostics["cholesky_jitter"] == 0.0


def test_standardised_evidence_is_the_evidence_shifted_by_n_log_c():
    x, y = sine_data()
    covariance = torch.exp(-0.5 * (x - x.T).pow(2) / 0.04) * 1e10
    noise = torch.tensor(1e8, dtype=F64)
    value, jitter = standardised_log_evidence(covariance, noise, y * 1e5, 1e5)
    direct = gaussian_log_evidence(covariance, noise, y * 1e5)
    assert float(value) - N * math.log(1e5) == pytest.approx(float(direct), rel=1e-12)
    assert float(jitter) == 0.0


def test_jittered_cholesky_retries_a_singular_matrix_and_reports_the_jitter():
    v = torch.arange(1.0, 5.0, dtype=F64)
    rank_one = torch.outer(v, v)  # positive semi-definite, singular: a plain Cholesky fails
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(rank_one)
    factor, jitter = jittered_cholesky(rank_one)
    assert 0 < float(jitter) <= 1e-4 * float(rank_one.diagonal().mean())
    assert torch.allclose(factor @ factor.T, rank_one + jitter * torch.eye(4, dtype=F64), rtol=1e-12, atol=1e-12)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        jittered_cholesky(-torch.eye(3, dtype=F64))


def test_fit_of_a_singular_covariance_reports_its_jitter():
    # Each input twice and no noise to speak of: K + 1e-30 I is singular (duplicate rows); the targets
    # agree at the duplicates, so the evidence is well defined once a jitter lifts the null space.
    x = torch.linspace(0, 1, 5, dtype=F64).repeat_interleave(2).unsqueeze(-1)
    y = torch.sin(6 * x[:, 0])
    kernel = gpytorch.kernels.RBFKernel()
    kernel.lengthscale = 0.3
    post = GPEvidence(num_steps=0, progress=False).fit(GPRegression(kernel, noise=1e-30, jitter=0.0), x, y)
    jitter = post.diagnostics["cholesky_jitter"]
    assert 0 < jitter <= 1e-4
    # The evidence reported is that of K + (noise + jitter) I, which then factorises without help.
    k = torch.exp(-0.5 * (x - x.T).pow(2) / 0.09)
    expected = gaussian_log_evidence(k, torch.tensor(1e-30 + jitter, dtype=F64), y)
    assert post.log_evidence.value == pytest.approx(float(expected), rel=1e-6)


def test_unconverged_adam_warns_by_name_and_reports_its_numbers():
    x, y = sine_data()
    with pytest.warns(ConvergenceWarning, match="raise num_steps"):
        post = GPEvidence(num_steps=15, progress=False).fit(scaled_rbf_gp(), x, y)
    d = post.diagnostics
    assert d["converged"] is False
    assert d["num_iterations"] == d["max_iterations"] == 15
    assert d["gradient_norm"] > 1e-3 * N  # the test it failed


def test_converged_lbfgs_reports_a_small_gradient():
    x, y = sine_data()
    d = lbfgs().fit(scaled_rbf_gp(), x, y).diagnostics
    assert d["converged"] is True and d["gradient_norm"] <= 1e-3 * N
    assert d["num_iterations"] <= d["max_iterations"]


def test_empty_targets_are_refused_by_name():
    x = torch.zeros(0, 1, dtype=F64)
    with pytest.raises(ValueError, match="y"):
        GPEvidence(num_steps=1, progress=False).fit(scaled_rbf_gp(), x, torch.zeros(0, dtype=F64))


@pytest.mark.gpu
def test_scaled_fit_on_gpu_stays_on_the_device():
    x, y = sine_data()
    post = lbfgs().fit(scaled_rbf_gp(), x.cuda(), y.cuda() * 1e6)
    assert all(v.device.type == "cuda" for v in post.hyperparameters.values())
    assert post.diagnostics["converged"] is True


def test_monte_carlo_convergence_test_separates_a_plateau_from_a_descent():
    # The Monte-Carlo kernel's test on the loss trace (gradients are noisy there): the mean of the last
    # tenth against the tenth before, allowed two standard errors plus 1e-3 per observation.
    engine = GPEvidence(num_steps=200, progress=False)
    p = torch.zeros(2, dtype=F64, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(200, generator=generator, dtype=F64)
    plateau = 100.0 + noise  # sd 1: a difference of window means has sd sqrt(2/20) = 0.32
    descent = 100.0 + noise - torch.linspace(0, 50, 200, dtype=F64)  # falls 5 per window: > 2 se + 0.04
    flat = engine._convergence(lambda: (p**2).sum(), [p], plateau, True, 40)
    falling = engine._convergence(lambda: (p**2).sum(), [p], descent, True, 40)
    assert flat["converged"] is True and falling["converged"] is False
    window_change = abs(float(descent[-20:].mean() - descent[-40:-20].mean()))
    assert falling["relative_change"] == pytest.approx(window_change / abs(float(descent[-20:].mean())), rel=1e-12)
