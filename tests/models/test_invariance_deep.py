"""Deep variant: an invariant Bayesian linear last layer on network features, learned by its exact evidence."""

import math

import pytest
import torch

from bmm_ppl.inference.exact.gp_evidence import GPEvidence
from bmm_ppl.models.invariance import AffineImageTransform, FeatureKernel, GPRegression, InvariantKernel
from bmm_ppl.models.invariance._gpytorch import gpytorch

F64 = torch.float64
# These fits run a few optimiser steps for speed; GPEvidence rightly reports them unconverged.
pytestmark = pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ConvergenceWarning")


def network(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh()).double()


def linear_last_layer():
    kernel = gpytorch.kernels.LinearKernel().double()
    kernel.variance = torch.tensor(0.7, dtype=F64)  # a Python float would be rounded to float32 first
    return kernel


def test_feature_kernel_is_the_bayesian_linear_last_layer():
    net, x = network(), torch.rand(6, 64, dtype=F64)
    kernel = FeatureKernel(net, linear_last_layer())
    features = net(x)
    assert torch.allclose(kernel(x).to_dense(), 0.7 * features @ features.T, rtol=0, atol=1e-12)


def test_invariant_last_layer_uses_augmentation_averaged_features():
    net, x = network(), torch.rand(5, 64, dtype=F64)
    rotation = AffineImageTransform((8, 8))
    kernel = InvariantKernel(FeatureKernel(net, linear_last_layer()), rotation, ranges=0.8, num_samples=6).double()
    # f(x) = w^T E_a phi(t(x; a)): with the midpoint rule, E_a is the mean over the 6 quadrature angles
    angles = kernel.ranges.detach() * (2 * (torch.arange(6, dtype=F64) + 0.5) / 6 - 1)
    averaged = net(rotation(x, angles.unsqueeze(-1))).mean(0)
    assert torch.allclose(kernel(x).to_dense(), 0.7 * averaged @ averaged.T, rtol=0, atol=1e-12)


def test_range_and_network_are_learned_jointly_by_the_last_layer_evidence():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:40], dtype=F64) / 16
    y = torch.tensor(data.target[:40] % 2, dtype=F64) * 2 - 1
    net = network()
    kernel = InvariantKernel(FeatureKernel(net, gpytorch.kernels.LinearKernel()), AffineImageTransform((8, 8)),
                             ranges=0.3, num_samples=4)
    post = GPEvidence(num_steps=5, lr=0.02, progress=False).fit(GPRegression(kernel, noise_init=0.3), x, y)
    hyper = post.hyperparameters
    assert "kernel.ranges" in hyper and "kernel.base_kernel.feature_extractor.0.weight" in hyper
    assert not torch.allclose(hyper["kernel.base_kernel.feature_extractor.0.weight"], net[0].weight.detach())
    assert float(hyper["kernel.ranges"]) != pytest.approx(0.3, abs=1e-6)
    assert post.loss_trace[-1] < post.loss_trace[0] and math.isfinite(post.log_evidence.value)


def test_feature_kernel_bad_arguments():
    with pytest.raises(TypeError, match="feature_extractor"):
        FeatureKernel(lambda x: x, gpytorch.kernels.LinearKernel())
    with pytest.raises(TypeError, match="base_kernel"):
        FeatureKernel(torch.nn.Identity(), "linear")
