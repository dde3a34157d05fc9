"""InvariantKernel: identity = base kernel, strict invariance, estimators' bias, transforms, bad inputs."""

import math

import pytest
import torch

from bmm_ppl.inference.exact.gp_evidence import gaussian_log_evidence, total_exact_log_evidence
from bmm_ppl.models.invariance import (
    AffineImageTransform,
    FunctionTransform,
    InvariantExactGP,
    InvariantKernel,
    PermutationGroup,
    rot90_group,
)
from bmm_ppl.models.invariance._gpytorch import gpytorch

F64 = torch.float64


def images(n, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, size * size, generator=generator, dtype=F64)


def rbf(lengthscale=1.5):
    kernel = gpytorch.kernels.RBFKernel().double()
    kernel.lengthscale = lengthscale
    return kernel


# ------------------------------------------------------------------------------------------- identity
def test_identity_transform_equals_base_kernel_to_1e_10():
    x1, x2 = images(7), images(5, seed=1)
    base = rbf()
    kernel = InvariantKernel(base).double()
    for a, b in ((x1, x1), (x1, x2)):
        assert torch.allclose(kernel(a, b).to_dense(), base(a, b).to_dense(), rtol=0, atol=1e-10)
    assert torch.allclose(kernel(x1, diag=True), base(x1, diag=True), rtol=0, atol=1e-10)


def test_identity_respects_the_base_kernels_active_dims():
    x = images(6)
    base = gpytorch.kernels.RBFKernel(active_dims=[0, 3, 5]).double()
    assert torch.allclose(InvariantKernel(base)(x).to_dense(), base(x).to_dense(), rtol=0, atol=1e-12)


def test_identity_exact_marginal_likelihood_equals_gpytorch_base_to_1e_10():
    x, y = images(12), torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(3))

    class Plain(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    plain = Plain().double()
    invariant = InvariantExactGP(x, y, gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel()))).double()
    for gp in (plain, invariant):
        gp.likelihood.noise = 0.3
        gp.covar_module.outputscale = 1.7
    plain.covar_module.base_kernel.lengthscale = 0.9
    invariant.covar_module.base_kernel.base_kernel.lengthscale = 0.9
    values = []
    for gp in (plain, invariant):
        gp.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
        with torch.no_grad():
            values.append((mll(gp(x), y), total_exact_log_evidence(mll, gp(x), y)))
    assert abs(values[0][0] - values[1][0]) < 1e-10
    assert abs(values[0][1] - values[1][1]) < 1e-10
    # GPyTorch's number is per data point: the total is n times it (no priors here) and matches ours.
    with torch.no_grad():
        K = invariant.covar_module(x).to_dense()
        ours = gaussian_log_evidence(K, invariant.likelihood.noise.squeeze(), y)
    assert abs(values[1][1] - ours) < 1e-10
    assert abs(values[1][1] - 12 * values[1][0]) < 1e-10


# -------------------------------------------------------------------------------------- strict group
def test_strict_kernel_is_exactly_invariant_to_rotations_by_90_degrees():
    x1, x2 = images(6), images(4, seed=2)
    kernel = InvariantKernel(rbf(), rot90_group((4, 4)))
    reference = kernel(x1, x2).to_dense()
    for k in range(1, 4):
        turned = torch.rot90(x1.reshape(-1, 4, 4), k, (1, 2)).reshape(-1, 16)
        # The group sum is only permuted: equal up to floating-point summation order.
        assert torch.allclose(kernel(turned, x2).to_dense(), reference, rtol=0, atol=1e-14)
        assert torch.allclose(kernel(turned, diag=True), kernel(x1, diag=True), rtol=0, atol=1e-14)
    # ... while the base kernel is not invariant (the check has teeth).
    turned = torch.rot90(x1.reshape(-1, 4, 4), 1, (1, 2)).reshape(-1, 16)
    assert (rbf()(turned, x2).to_dense() - rbf()(x1, x2).to_dense()).abs().max() > 1e-3
    full = kernel(x1).to_dense()
    assert torch.allclose(full, full.T, atol=1e-14)
    assert torch.linalg.eigvalsh(full).min() > -1e-12


def test_permutation_group_must_be_a_group():
    with pytest.raises(ValueError, match="closed under composition"):
        PermutationGroup([[0, 1, 2], [1, 2, 0]])
    with pytest.raises(ValueError, match="identity"):
        PermutationGroup([[1, 0]])
    with pytest.raises(ValueError, match="permutation"):
        PermutationGroup([[0, 0]])
    with pytest.raises(ValueError, match="square"):
        rot90_group((3, 4))
    assert rot90_group((3, 3), flips=True).order == 8


# ------------------------------------------------------------------------------------------ transforms
def test_affine_rotation_by_90_degrees_matches_rot90_and_zero_is_identity():
    x = images(3)
    transform = AffineImageTransform((4, 4), ("rotation",))
    angles = torch.tensor([[0.0], [math.pi / 2], [-math.pi / 2]], dtype=F64)
    moved = transform(x, angles)
    assert torch.allclose(moved[0], x, atol=1e-12)
    turned = {k: torch.rot90(x.reshape(-1, 4, 4), k, (1, 2)).reshape(-1, 16) for k in (1, 3)}
    # grid_sample's bilinear weights are exact at pixel centres up to cos(pi/2) ~ 6e-17 rounding
    for image in moved[1:]:
        assert min((image - t).abs().max() for t in turned.values()) < 1e-12


def test_affine_parameters_translation_scale_shear():
    x = torch.zeros(1, 16, dtype=F64)
    x[0, 5] = 1.0  # pixel (1, 1)
    transform = AffineImageTransform((4, 4), ("translation_x", "translation_y", "scale", "shear"))
    shift = transform(x, torch.tensor([[0.5, 0.0, 0.0, 0.0]], dtype=F64))[0].reshape(4, 4)
    # translation of +0.5 normalised units samples from the right by one pixel: the bright pixel moves left
    assert shift[1, 0] == pytest.approx(1.0)
    assert transform.max_ranges == (1.0, 1.0, math.log(2.0), 1.0)
    assert transform(x, torch.zeros(2, 4, dtype=F64)).shape == (2, 1, 16)


def linear():
    kernel = gpytorch.kernels.LinearKernel().double()
    kernel.variance = 1.0
    return kernel


def test_user_supplied_transform_gives_the_analytic_invariant_kernel():
    # k(x, x') = x x' with t(x; a) = x + a, a ~ U[-θ, θ] independently: E[(x+a)(x'+a')] = x x', and
    # the symmetric midpoint rule integrates the odd terms to zero exactly.
    shift = FunctionTransform(lambda x, a: x.unsqueeze(0) + a.unsqueeze(1), ("shift",), max_ranges=[10.0])
    kernel = InvariantKernel(linear(), shift, ranges=2.0, num_samples=8)
    x = torch.linspace(-1, 1, 5, dtype=F64).unsqueeze(-1)
    assert torch.allclose(kernel(x).to_dense(), x @ x.T, atol=1e-12)
    # With t(x; a) = (x + a)^2 the range appears: E[(x+a)^2 (x'+a')^2] = (x^2 + c)(x'^2 + c), c = E[a^2] = θ^2/3
    # exactly; the S-point midpoint rule gives c = θ^2/3 (1 - 1/S^2) exactly (its O(S^-2) error).
    square = FunctionTransform(lambda x, a: (x.unsqueeze(0) + a.unsqueeze(1)) ** 2, ("shift",), max_ranges=[10.0])
    kernel = InvariantKernel(linear(), square, ranges=2.0, num_samples=64)
    c = 4.0 / 3 * (1 - 1 / 64**2)
    assert torch.allclose(kernel(x).to_dense(), (x**2 + c) @ (x**2 + c).T, rtol=0, atol=1e-12)
    value = kernel(x).to_dense().sum()
    value.backward()
    assert kernel.raw_ranges.grad.abs() > 0


# -------------------------------------------------------------------------------------- estimators
def reference_and_estimates(estimator, num_samples, repeats=400):
    torch.manual_seed(1)
    x = images(3)
    transform = AffineImageTransform((4, 4), ("rotation",))
    reference = InvariantKernel(rbf(0.8), transform, ranges=1.0, learn_ranges=False, num_samples=2048)
    exact = reference(x, diag=True)
    kernel = InvariantKernel(rbf(0.8), transform, ranges=1.0, learn_ranges=False,
                             num_samples=num_samples, estimator=estimator)
    draws = torch.stack([kernel(x, diag=True) for _ in range(repeats)])
    return exact, draws


def test_independent_estimator_is_unbiased_on_the_diagonal():
    exact, draws = reference_and_estimates("independent", 2)
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    # |mean - truth| < 4 standard errors (the 2048-point midpoint reference is exact to ~1e-7)
    assert ((draws.mean(0) - exact).abs() < 4 * stderr).all()


def test_shared_estimator_is_biased_upward_on_the_diagonal():
    exact, draws = reference_and_estimates("shared", 2)
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    # same samples for both arguments: the s = s' terms are k(y, y), the kernel's maximum, so E[K̂] > k_inv
    assert ((draws.mean(0) - exact) > 4 * stderr).all()


def test_shared_estimator_is_psd_and_fixed_samples_make_calls_agree():
    x = images(8)
    kernel = InvariantKernel(rbf(), AffineImageTransform((4, 4), ("rotation", "scale")), estimator="shared", num_samples=5)
    with kernel.fixed_samples(x):
        first, second = kernel(x).to_dense(), kernel(x).to_dense()
        diag = kernel(x, diag=True)
    assert torch.equal(first, second)
    assert torch.allclose(torch.diagonal(first), diag, atol=1e-12)
    assert torch.linalg.eigvalsh(first).min() > -1e-10
    assert not torch.equal(kernel(x).to_dense(), kernel(x).to_dense())


def test_quadrature_is_deterministic_and_differentiable_in_the_range():
    x = images(5)
    kernel = InvariantKernel(rbf(), AffineImageTransform((4, 4)), ranges=0.5, num_samples=6).double()
    assert kernel.estimator.value == "quadrature"
    assert torch.equal(kernel(x).to_dense(), kernel(x).to_dense())
    kernel(x).to_dense().sum().backward()
    assert kernel.raw_ranges.grad.abs().sum() > 0


def test_float32_works():
    x = images(5).float()
    kernel = InvariantKernel(gpytorch.kernels.RBFKernel(), AffineImageTransform((4, 4)), ranges=0.5)
    assert kernel(x).to_dense().dtype == torch.float32


# --------------------------------------------------------------------------------------- bad inputs
def test_transform_that_changes_the_input_shape_is_refused():
    crop = FunctionTransform(lambda x, a: x[:, :-1].unsqueeze(0).expand(a.shape[0], -1, -1), ("a",))
    kernel = InvariantKernel(rbf(), crop, ranges=0.5, learn_ranges=False)
    with pytest.raises(ValueError, match="same input shape"):
        kernel(images(3)).to_dense()


def test_negative_or_too_large_ranges_are_refused():
    rotation = AffineImageTransform((4, 4))
    with pytest.raises(ValueError, match="ranges must be non-negative"):
        InvariantKernel(rbf(), rotation, ranges=-0.1, learn_ranges=False)
    with pytest.raises(ValueError, match="ranges must be non-negative"):
        InvariantKernel(rbf(), rotation, ranges=-0.1)
    with pytest.raises(ValueError, match="max_ranges"):
        InvariantKernel(rbf(), rotation, ranges=4.0, learn_ranges=False)
    with pytest.raises(ValueError, match="strictly inside"):
        InvariantKernel(rbf(), rotation, ranges=0.0)
    kernel = InvariantKernel(rbf(), rotation, ranges=0.3)
    with pytest.raises(ValueError, match="ranges must be non-negative"):
        kernel.ranges = -1.0
    with pytest.raises(ValueError, match="ranges must hold 2"):
        InvariantKernel(rbf(), AffineImageTransform((4, 4), ("rotation", "shear")), ranges=[0.1, 0.2, 0.3])


def test_other_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="base_kernel"):
        InvariantKernel(lambda a, b: a @ b.T)
    with pytest.raises(TypeError, match="transform"):
        InvariantKernel(rbf(), lambda x, a: x)
    with pytest.raises(ValueError, match="estimator"):
        InvariantKernel(rbf(), AffineImageTransform((4, 4)), estimator="magic")
    with pytest.raises(ValueError, match="num_samples"):
        InvariantKernel(rbf(), AffineImageTransform((4, 4)), num_samples=0)
    with pytest.raises(ValueError, match="parameters"):
        AffineImageTransform((4, 4), ("spin",))
    with pytest.raises(ValueError, match="Tensor\\[n, 16\\]"):
        AffineImageTransform((4, 4))(torch.zeros(2, 15), torch.zeros(1, 1))
    kernel = InvariantKernel(rbf(), AffineImageTransform((4, 4)), ranges=0.3)
    with pytest.raises(ValueError, match="Tensor\\[n, d\\]"):
        kernel(torch.zeros(2, 3, 16, dtype=F64)).to_dense()
