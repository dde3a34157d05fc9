"""Inter-domain invariant SVGP: its Monte-Carlo ELBO is unbiased, bounds the evidence, and learns the range."""

import math

import pytest
import torch

from bmm_ppl.inference.exact.gp_evidence import gaussian_log_evidence
from bmm_ppl.models.invariance import AffineImageTransform, InvariantKernel
from bmm_ppl.models.invariance._gpytorch import gpytorch
from bmm_ppl.models.invariance.interdomain import InterDomainInvariantSVGP

F64 = torch.float64
ROTATION = AffineImageTransform((4, 4))


def scaled_rbf():
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    kernel.base_kernel.lengthscale = torch.tensor(1.2, dtype=F64)
    return kernel


def data(n=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 16, generator=generator, dtype=F64), torch.randn(n, generator=generator, dtype=F64)


def model_with(estimator, num_samples, x):
    kernel = InvariantKernel(scaled_rbf(), ROTATION, ranges=0.9, learn_ranges=False,
                             estimator=estimator, num_samples=num_samples)
    model = InterDomainInvariantSVGP(kernel, x[:5].clone() + 0.05, noise=0.2).double()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-trivial q(v) so that every term of the ELBO matters
        model.variational_mean.copy_(torch.randn(5, generator=generator, dtype=F64))
        model.variational_scale_raw.copy_(0.3 * torch.randn(5, 5, generator=generator, dtype=F64))
    return model


def test_monte_carlo_elbo_is_unbiased_for_the_exact_invariant_elbo():
    x, y = data()
    # reference: the 1024-point midpoint rule, exact to ~1e-7 for this smooth integrand
    reference = model_with("quadrature", 1024, x).elbo(x, y).detach()
    model = model_with("shared", 2, x)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([model.elbo(x, y) for _ in range(400)])
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - reference) < 4 * stderr  # |mean - truth| < 4 standard errors

    # The check has teeth: reusing one draw for both factors of the products (and both sides of the
    # diagonal) gives a biased ELBO, about -1.3 nats here, ~15 standard errors.
    fresh_draw = model._draw

    def same_draw_twice():
        cache = {}
        return lambda inputs: cache.setdefault("draw", fresh_draw(inputs))

    with torch.no_grad():
        naive = []
        for _ in range(400):
            model._draw = same_draw_twice()
            naive.append(model.elbo(x, y))
    naive = torch.stack(naive)
    assert (reference - naive.mean()) > 4 * naive.std() / math.sqrt(len(naive))


def test_quadrature_elbo_bounds_the_exact_evidence_of_the_same_kernel():
    x, y = data()
    model = model_with("quadrature", 8, x)
    kernel = InvariantKernel(scaled_rbf(), ROTATION, ranges=0.9, learn_ranges=False, num_samples=8)
    with torch.no_grad():
        evidence = gaussian_log_evidence(kernel(x).to_dense(), model.noise, y)
        assert model.elbo(x, y) <= evidence


def test_range_is_learned_jointly_and_predictions_have_the_right_shape():
    x, y = data(20)
    kernel = InvariantKernel(scaled_rbf(), ROTATION, ranges=0.3, num_samples=4).double()
    model = InterDomainInvariantSVGP(kernel, x[:6].clone()).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    start = kernel.ranges.detach().clone()
    for _ in range(5):
        optimiser.zero_grad()
        (-model.elbo(x, y)).backward()
        optimiser.step()
    assert not torch.equal(kernel.ranges.detach(), start)
    mean, variance = model.predict(x[:3])
    assert mean.shape == (3,) and (variance > -1e-8).all()


def test_bad_arguments():
    x, y = data()
    with pytest.raises(TypeError, match="InvariantKernel"):
        InterDomainInvariantSVGP(scaled_rbf(), x[:3])
    kernel = InvariantKernel(scaled_rbf(), ROTATION, ranges=0.3)
    with pytest.raises(ValueError, match="inducing_points"):
        InterDomainInvariantSVGP(kernel, x[0])
    with pytest.raises(ValueError, match="noise"):
        InterDomainInvariantSVGP(kernel, x[:3], noise=-1.0)
    with pytest.raises(ValueError, match="y must be"):
        InterDomainInvariantSVGP(kernel, x[:3]).double().elbo(x, y[:-1])


def test_interdomain_elbo_follows_the_data_device_under_a_meta_default(meta_default_device):
    from tests.conftest import default_device

    with default_device("cpu"):
        x, y = data()
        kernel = InvariantKernel(scaled_rbf(), ROTATION, ranges=0.3, num_samples=3, estimator="shared").double()
        model = InterDomainInvariantSVGP(kernel, x[:4].clone()).double()
    value = model.elbo(x, y)
    value.backward()
    assert value.device.type == "cpu" and model.kernel.raw_ranges.grad is not None
