"""Laplace on Bayesian neural networks: the GGN against one built by hand from autograd Jacobians, the
post-hoc (type-II) noise on laplace-torch's documentation problem (a tanh network on a noisy sinusoid,
noise sd 0.3), and the posterior's predictive."""

import math

import pytest
import torch

from bmm_ppl.inference import Laplace
from bmm_ppl.models import BayesianNeuralNetwork

F64 = torch.float64


def sinusoid(n, seed=711):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=F64, device="cpu") * 8
    y = torch.sin(x).squeeze(-1) + 0.3 * torch.randn(n, generator=g, dtype=F64, device="cpu")
    return x, y


def tanh_network(width, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).double()


def test_ggn_evidence_equals_one_built_from_autograd_jacobians():
    x, y = sinusoid(40)
    net = tanh_network(6)
    model = BayesianNeuralNetwork(net, prior_scale=1.5, noise=0.3)
    post = Laplace(progress=False).fit(model, x, y)
    mode = post.latent_distribution.mean
    names = list(mode)

    def network_output(*flat):
        params = {name.removeprefix("net."): value for name, value in zip(names, flat)}
        return torch.func.functional_call(net, params, (x,)).squeeze(-1)

    jacobians = torch.autograd.functional.jacobian(network_output, tuple(mode[n] for n in names))
    J = torch.cat([j.reshape(len(y), -1) for j in jacobians], dim=1)
    theta = torch.cat([mode[n].reshape(-1) for n in names])
    precision = J.T @ J / 0.3**2 + torch.eye(theta.numel(), dtype=F64) / 1.5**2
    residual = y - network_output(*(mode[n] for n in names))
    zero = torch.zeros((), dtype=F64)
    log_joint = (torch.distributions.Normal(zero, zero + 0.3).log_prob(residual).sum()
                 + torch.distributions.Normal(zero, zero + 1.5).log_prob(theta).sum())
    expected = log_joint + 0.5 * theta.numel() * math.log(2 * math.pi) - 0.5 * torch.logdet(precision)
    assert post.diagnostics["converged"]
    assert abs(post.log_evidence.value - float(expected)) < 1e-8
    torch.testing.assert_close(post.latent_distribution.covariance_matrix, torch.linalg.inv(precision), rtol=1e-6, atol=1e-10)


def test_learned_noise_on_a_small_network_is_near_the_truth():
    """1-10-1 tanh network, 80 points: the Laplace type-II noise sd is within 15% of 0.3 (the sample
    noise sd of these 80 draws is 0.296; the fit's residual sd sits a little below the truth)."""
    x, y = sinusoid(80)
    post = Laplace(progress=False).fit(BayesianNeuralNetwork(tanh_network(10), prior_scale=None, noise=None), x, y)
    noise = float(post.hyperparameters["noise"])
    assert abs(noise / 0.3 - 1) < 0.15, noise
    assert post.diagnostics["converged"]
    # the mode follows the sinusoid: its error is well below the noise and the signal (sd 0.7)
    mode = post.latent_distribution.mean
    fitted = torch.func.functional_call(post.model.module, {n.removeprefix("net."): v for n, v in mode.items()}, (x,))
    assert float((fitted.squeeze(-1) - torch.sin(x).squeeze(-1)).pow(2).mean().sqrt()) < 0.15
    assert post.predict(x, num_samples=20)["obs"].shape == (20, 80)


@pytest.mark.slow
def test_learned_noise_on_the_documentation_network_within_ten_percent():
    """laplace-torch's example: 1-50-1 tanh, 150 points of sin(x) + N(0, 0.3^2); measured 0.296."""
    x, y = sinusoid(150)
    post = Laplace(progress=False).fit(BayesianNeuralNetwork(tanh_network(50), prior_scale=None, noise=None), x, y)
    assert abs(float(post.hyperparameters["noise"]) / 0.3 - 1) < 0.1
    assert post.diagnostics["converged"]


def test_a_categorical_network_reads_its_logits_through_the_output():
    """BayesianNeuralNetwork(likelihood="categorical") builds its Categorical from what
    pyro.deterministic("logits") returns, so the GGN's output check passes and the fit converges."""
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(30, 2, generator=g, dtype=F64, device="cpu")
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    post = Laplace(progress=False).fit(BayesianNeuralNetwork(net, prior_scale=1.0, likelihood="categorical"), x, y)
    assert post.diagnostics["output"] == "logits" and post.diagnostics["converged"]
