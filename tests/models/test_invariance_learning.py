"""Learning invariance ranges by the evidence: exact GP (GPEvidence, Pyro program), SVGP, devices, bad inputs."""

import math

import pyro
import pytest
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from bmm_ppl.inference import Posterior
from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.exact.gp_evidence import GPEvidence, gaussian_log_evidence, total_elbo, total_exact_log_evidence
from bmm_ppl.models.invariance import (
    AffineImageTransform,
    GPRegression,
    InvariantExactGP,
    InvariantKernel,
    InvariantSVGP,
    rot90_group,
)
from bmm_ppl.models.invariance._gpytorch import gpytorch
from bmm_ppl.selection.comparison import compare
from tests.conftest import default_device

F64 = torch.float64
# These fits run a few optimiser steps for speed; GPEvidence rightly reports them unconverged.
pytestmark = pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ConvergenceWarning")
ROTATION = AffineImageTransform((8, 8), ("rotation",))


def rotate_each(x, angles):
    """Each 8x8 image rotated by its own angle (the data-generating augmentation)."""
    theta = ROTATION.affine_matrices(angles.unsqueeze(-1))
    grid = F.affine_grid(theta, [x.shape[0], 1, 8, 8], align_corners=False)
    return F.grid_sample(x.reshape(-1, 1, 8, 8), grid, align_corners=False).reshape(-1, 64)


def digits_pair(first, second, n, true_range, seed=0, dtype=F64):
    """n images of two digit classes, labels +1 / -1, each rotated by U[-true_range, true_range]."""
    data = load_digits()
    images = torch.tensor(data.data, dtype=dtype) / 16.0
    labels = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.nonzero((labels == first) | (labels == second)).squeeze(-1)
    index = pool[torch.randperm(len(pool), generator=generator)[:n]]
    x = images[index]
    if true_range > 0:
        x = rotate_each(x, (torch.rand(n, generator=generator, dtype=dtype) * 2 - 1) * true_range)
    return x, torch.where(labels[index] == first, 1.0, -1.0).to(dtype)


def rotation_gp(num_samples=6, ranges=0.3, lengthscale=3.0, **options):
    kernel = gpytorch.kernels.ScaleKernel(
        InvariantKernel(gpytorch.kernels.RBFKernel(), ROTATION, ranges=ranges, num_samples=num_samples, **options)
    )
    kernel.base_kernel.base_kernel.lengthscale = lengthscale
    return GPRegression(kernel, noise_init=0.1)


def learned_range(n, num_samples, num_steps, first, second, true_range):
    x, y = digits_pair(first, second, n, true_range)
    engine = GPEvidence(num_steps=num_steps, lr=1.0, optimizer="lbfgs", progress=False)
    post = engine.fit(rotation_gp(num_samples), x, y)
    return float(post.hyperparameters["kernel.base_kernel.ranges"]), post


@pytest.fixture(scope="module")
def small_learning_runs():
    # Invariant by construction: 2 vs 7, every image rotated by U[-pi, pi] (true range pi, the maximum).
    # Not invariant: upright 6 vs 9 (a half turn maps one class onto the other).
    invariant = learned_range(40, 6, 3, 2, 7, math.pi)
    upright = learned_range(40, 6, 3, 6, 9, 0.0)
    return invariant, upright


def test_learned_rotation_range_grows_on_invariant_data_and_stays_small_on_6_vs_9(small_learning_runs, capsys):
    (grown, post_invariant), (small, post_upright) = small_learning_runs
    with capsys.disabled():
        print(f"\n[learned rotation range, n=40, S=6] rotated 2v7 (true pi): {grown:.3f} rad; upright 6v9: {small:.3f} rad")
    assert grown > 1.5  # started at 0.3 rad
    assert small < 1.0
    assert post_invariant.log_evidence.method.value == "exact" and post_invariant.diagnostics["stochastic_kernel"] is False


@pytest.mark.slow
def test_learned_rotation_range_bigger_problem(capsys):
    grown, _ = learned_range(200, 12, 6, 2, 7, math.pi)
    small, _ = learned_range(200, 12, 6, 6, 9, 0.0)
    with capsys.disabled():
        print(f"\n[learned rotation range, n=200, S=12] rotated 2v7 (true pi): {grown:.3f}; upright 6v9: {small:.3f}")
    assert grown > 2.0
    # Upright handwriting varies by a few tens of degrees, so a modest range is supported; at pi/2 the
    # orbits of a 6 and a 9 (half a turn apart) would meet, so a learned range must stay well below it.
    assert small < 1.2


def test_posterior_contract_and_evidence_matches_gpytorch(small_learning_runs):
    _, (_, post) = small_learning_runs
    assert isinstance(post, Posterior)
    assert post.samples(4)["f"].shape == (4, 40)
    assert post.predict(num_samples=3)["obs"].shape == (3, 40)
    names = set(post.hyperparameters)
    assert names == {"noise", "kernel.base_kernel.ranges", "kernel.outputscale", "kernel.base_kernel.base_kernel.lengthscale"}
    assert len(post.loss_trace) == 3
    # the same hyperparameters in a plain GPyTorch ExactGP: GPyTorch's per-point value times n is our total
    x, y = post.args
    hyper = post.hyperparameters
    kernel = gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel(), ROTATION, num_samples=6)).double()
    kernel.outputscale = hyper["kernel.outputscale"]
    kernel.base_kernel.ranges = hyper["kernel.base_kernel.ranges"]
    kernel.base_kernel.base_kernel.lengthscale = hyper["kernel.base_kernel.base_kernel.lengthscale"]
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-12))
    gp = InvariantExactGP(x, y, kernel, likelihood).double()
    gp.likelihood.noise = hyper["noise"] + 1e-6  # GPRegression's jitter, K + 1e-6 I, moved into the noise
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    with torch.no_grad():
        K = kernel(x).to_dense() + 1e-6 * torch.eye(40, dtype=F64)
        ours = gaussian_log_evidence(K, hyper["noise"], y)
        theirs = total_exact_log_evidence(mll, gp(x), y)
    assert abs(float(ours) - post.log_evidence.value) < 1e-8
    assert abs(float(ours) - float(theirs)) < 1e-8


def test_compare_ranks_learned_invariance_above_none_on_rotated_data():
    x, y = digits_pair(2, 7, 40, math.pi, seed=1)
    plain = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    plain.base_kernel.lengthscale = 3.0
    models = {"none": GPRegression(plain, noise_init=0.1), "learned": rotation_gp()}
    result = compare(models, GPEvidence(num_steps=3, lr=1.0, optimizer="lbfgs", progress=False), x, y)
    assert result.best == "learned"


def test_one_hot_targets_give_one_latent_row_per_class():
    x, y = digits_pair(2, 7, 20, 0.0)
    one_hot = torch.stack([(y > 0), (y < 0)], -1).to(F64)
    post = GPEvidence(num_steps=2, progress=False).fit(rotation_gp(4), x, one_hot)
    assert post.samples(3)["f"].shape == (3, 2, 20)
    model = rotation_gp(4)
    with pyro.get_param_store().scope():
        trace = pyro.poutine.trace(model).get_trace(x, one_hot)
    assert trace.nodes["obs"]["value"].shape == (20, 2)


def test_monte_carlo_kernel_reports_a_standard_error():
    x, y = digits_pair(2, 7, 20, math.pi)
    post = GPEvidence(num_steps=3, num_evidence_draws=4, progress=False).fit(rotation_gp(4, estimator="shared"), x, y)
    assert post.diagnostics["stochastic_kernel"] is True
    assert post.log_evidence.stderr > 0
    # Not an exact evidence: its own tag, which compare will not rank against exact numbers.
    assert post.log_evidence.method.value == "monte-carlo"


def test_strict_group_kernel_fits_by_evidence():
    x, y = digits_pair(2, 7, 20, 0.0)
    kernel = gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel(), rot90_group((8, 8))))
    post = GPEvidence(num_steps=2, progress=False).fit(GPRegression(kernel), x, y)
    assert post.diagnostics["stochastic_kernel"] is False


# --------------------------------------------------------------------------------------- sparse
def test_svgp_elbo_is_below_the_exact_evidence_and_learns_the_range():
    x, y = digits_pair(2, 7, 40, math.pi)
    torch.manual_seed(0)

    def kernel():
        k = gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel(), ROTATION, ranges=0.3, num_samples=6))
        k.base_kernel.base_kernel.lengthscale = 3.0
        return k.double()

    svgp = InvariantSVGP(x[:10].clone(), kernel()).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    elbo = gpytorch.mlls.VariationalELBO(likelihood, svgp, num_data=40)
    optimiser = torch.optim.Adam(list(svgp.parameters()) + list(likelihood.parameters()), lr=0.05)
    for _ in range(40):
        optimiser.zero_grad()
        (-elbo(svgp(x), y)).backward()
        optimiser.step()
    assert float(svgp.covar_module.base_kernel.ranges.detach()) > 0.3
    exact = InvariantExactGP(x, y, kernel(), likelihood).double()
    exact.covar_module.load_state_dict(svgp.covar_module.state_dict())
    exact.train()
    with torch.no_grad():
        lower = total_elbo(elbo, svgp(x), y)
        evidence = total_exact_log_evidence(gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, exact), exact(x), y)
    assert lower <= evidence + 1e-8  # the ELBO bounds the evidence of the same (quadrature, deterministic) kernel


# ------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("transform", [None, "group", "rotation"])
def test_fit_follows_the_data_device_under_a_meta_default(meta_default_device, transform):
    with default_device("cpu"):
        x, y = digits_pair(2, 7, 12, math.pi)
        chosen = {None: None, "group": rot90_group((8, 8)), "rotation": ROTATION}[transform]
        model = GPRegression(gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel(), chosen, num_samples=4)))
    post = GPEvidence(num_steps=2, progress=False).fit(model, x, y)
    assert post.samples(2)["f"].device.type == "cpu"
    assert math.isfinite(post.log_evidence.value)


def test_svgp_follows_the_data_device_under_a_meta_default(meta_default_device):
    with default_device("cpu"):
        x, y = digits_pair(2, 7, 12, math.pi)
        kernel = gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel(), ROTATION, estimator="shared", num_samples=3))
        svgp = InvariantSVGP(x[:4].clone(), kernel).double()
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    value = total_elbo(gpytorch.mlls.VariationalELBO(likelihood, svgp, num_data=12), svgp(x), y)
    value.backward()
    assert value.device.type == "cpu"


@pytest.mark.gpu
def test_fit_on_cuda():
    x, y = digits_pair(2, 7, 30, math.pi)
    post = GPEvidence(num_steps=2, optimizer="lbfgs", progress=False, device="cuda").fit(rotation_gp(), x, y)
    assert post.samples(2)["f"].device.type == "cuda"
    assert post.hyperparameters["kernel.base_kernel.ranges"].device.type == "cuda"


def test_float32_fit():
    x, y = digits_pair(2, 7, 20, math.pi, dtype=torch.float32)
    post = GPEvidence(num_steps=3, progress=False).fit(rotation_gp(4), x, y)
    assert post.samples(2)["f"].dtype == torch.float32 and math.isfinite(post.log_evidence.value)


# ----------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_to_the_engine_and_the_program():
    x, y = digits_pair(2, 7, 10, 0.0)
    with pytest.raises(UnsupportedModelError, match="gp_form"):
        GPEvidence(progress=False).fit(lambda x, y: None, x, y)
    with pytest.raises(UnsupportedModelError, match="hyperprior"):
        GPEvidence(progress=False).fit(GPRegression(gpytorch.kernels.RBFKernel(), noise=pyro.distributions.HalfNormal(1.0)), x, y)
    with pytest.raises(ValueError, match="y must be"):
        GPEvidence(progress=False).fit(rotation_gp(), x, y[:-1])
    with pytest.raises(ValueError, match="NaN|nan|finite"):
        GPEvidence(progress=False).fit(rotation_gp(), x, y.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="x must be"):
        GPEvidence(progress=False).fit(rotation_gp(), x[0], y)
    with pytest.raises(ValueError, match="optimizer"):
        GPEvidence(optimizer="sgd")
    with pytest.raises(TypeError, match="kernel"):
        GPRegression("rbf")
    with pytest.raises(ValueError, match="noise"):
        GPRegression(gpytorch.kernels.RBFKernel(), noise=-1.0)


def test_the_program_runs_under_pyro_svi():
    # GPRegression is a plain Pyro program: Pyro's own SVI fits f and the kernel's param sites.
    x, y = digits_pair(2, 7, 15, math.pi)
    model = rotation_gp(4)
    guide = pyro.infer.autoguide.AutoDelta(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    assert "kernel.base_kernel.ranges" in pyro.get_param_store()


def test_linear_kernel_gp_evidence_equals_the_exact_engines_bayesian_linear_regression():
    # Oracle: a GP with kernel x x'/alpha and noise 1/beta *is* Bayesian linear regression w ~ N(0, I/alpha).
    from bmm_ppl.inference import Exact
    from bmm_ppl.models import BayesianLinearRegression, IdentityFeatures

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(25, 3, generator=generator, dtype=F64)
    y = x @ torch.tensor([0.5, -1.0, 2.0], dtype=F64) + 0.3 * torch.randn(25, generator=generator, dtype=F64)
    alpha, beta = 2.0, 8.0
    reference = Exact().fit(BayesianLinearRegression(IdentityFeatures(bias=False), alpha=alpha, beta=beta), x, y)
    kernel = gpytorch.kernels.LinearKernel().double()
    kernel.variance = torch.tensor(1 / alpha, dtype=F64)
    post = GPEvidence(num_steps=0, progress=False).fit(GPRegression(kernel, noise=1 / beta, jitter=0.0), x, y)
    assert abs(post.log_evidence.value - reference.log_evidence.value) < 1e-8
    # and the posterior over f = X w matches X times the posterior over w
    weights = reference.latent_distribution
    assert torch.allclose(post.latent_distribution.loc, x @ weights.mean["w"], rtol=0, atol=1e-8)
    f_covariance = x @ weights.covariance_matrix @ x.T
    assert torch.allclose(post.latent_distribution.covariance_matrix, f_covariance, rtol=0, atol=1e-8)
