"""The program layer: one reading of a Pyro program for every engine (masks, batch shapes, subsampling,
validation), checked against direct computation and closed-form posteriors.

Tolerances: potentials are deterministic functions, compared to 1e-10. Posterior moments from SVI's
variational draws (4000 iid draws): a mean within 0.1 posterior sd and an sd within 15% (the issue's
SVI criterion); from NUTS, means within 4 MCSE (MCSE = sd / sqrt(bulk ESS)) and sds within 10%.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.ops.indexing import Vindex
import pytest
import torch

from bmm_ppl.inference import HMC, NUTS, SGLD, SVI, UnsupportedModelError
from bmm_ppl.inference.program.log_density import log_density, site_log_prob, sum_keeping_batch
from bmm_ppl.inference.program.potential import ModelPotential
from bmm_ppl.inference.program.sites import guess_max_plate_nesting
from tests.inference.hmc.test_nuts import assert_matches, bulk_ess

F64 = torch.float64


def masked_normal_mean_model(y, mask):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
    with pyro.plate("data", len(y)), poutine.mask(mask=mask):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def masked_data():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(30, generator=generator, dtype=F64) + 2.0
    y[::2] += 300.0  # outliers, all masked out: any engine that ignores the mask is off by ~150
    mask = torch.ones(30, dtype=torch.bool)
    mask[::2] = False
    return y, mask


def masked_exact(y, mask):
    """Normal-normal posterior of mu from the unmasked observations (prior sd 10, noise sd 1)."""
    kept = y[mask]
    precision = 1 / 100 + len(kept)
    return kept.sum() / precision, precision ** -0.5


def test_potential_applies_masks_on_the_batched_and_the_per_point_path_alike():
    y, mask = masked_data()
    potential = ModelPotential(masked_normal_mean_model, (y, mask))
    z = torch.tensor([[1.5], [-0.3]], dtype=F64)
    kept = y[mask]
    expected = -(dist.Normal(torch.tensor(0.0, dtype=F64), 10.0).log_prob(z[:, 0]) + dist.Normal(z, 1.0).log_prob(kept).sum(-1))
    assert potential.vectorised
    assert torch.allclose(potential(z), expected, rtol=1e-10)
    potential.vectorised = False  # the per-point fallback used for models that do not broadcast
    assert torch.allclose(potential(z), expected, rtol=1e-10)


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ChainDiagnosticsWarning")
def test_nuts_honours_a_mask_on_a_model_that_does_not_broadcast():
    # One chain of 600 draws: split R-hat can exceed 1.01 by chance; the accuracy check uses the ESS.
    y, mask = masked_data()

    def scalar_loop_model(y, mask):  # a Python loop over rows: cannot broadcast over chains
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        for i in range(len(y)):
            with poutine.mask(mask=mask[i]):
                pyro.sample(f"obs_{i}", dist.Normal(mu, 1.0), obs=y[i])

    post = NUTS(num_samples=600, warmup_steps=300, progress=False).fit(scalar_loop_model, y, mask)
    mean, sd = masked_exact(y, mask)
    draws = post.draws()["mu"].reshape(1, -1, 1)
    assert_matches(draws, torch.tensor([mean]), torch.tensor([sd]))


def test_site_log_prob_masks_and_scales_once():
    def model():
        with pyro.plate("data", 3), poutine.scale(scale=2.0), poutine.mask(mask=torch.tensor([True, False, True])):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(3))

    trace = poutine.trace(model).get_trace()
    expected = 2 * dist.Normal(0.0, 1.0).log_prob(torch.zeros(()))
    assert torch.allclose(site_log_prob(trace.nodes["y"]), torch.stack([expected, torch.zeros(()), expected]))
    assert torch.allclose(log_density(trace), 2 * expected)


def test_sum_keeping_batch_refuses_a_density_that_mixes_points():
    with pytest.raises(ValueError, match="does not separate"):
        sum_keeping_batch(torch.ones(3, 2), 4, 1)


def beta_bernoulli_model(y):
    """A latent with a batch shape outside any plate, observations broadcast without a plate."""
    p = pyro.sample("p", dist.Beta(torch.ones(3, dtype=F64), 1.0))
    pyro.sample("obs", dist.Bernoulli(p), obs=y)


def beta_bernoulli_data():
    generator = torch.Generator().manual_seed(3)
    return torch.bernoulli(torch.full((40, 3), 0.3, dtype=F64), generator=generator)


def beta_bernoulli_exact(y):
    a, b = 1 + y.sum(0), 1 + len(y) - y.sum(0)
    return a / (a + b), (a * b / ((a + b) ** 2 * (a + b + 1))).sqrt()


def test_plate_nesting_counts_batch_shapes_and_broadcast_observations():
    y = beta_bernoulli_data()
    assert guess_max_plate_nesting(poutine.trace(beta_bernoulli_model).get_trace(y)) == 2


@pytest.mark.parametrize("guide", ["normal", "mvn"])
def test_svi_fits_batch_shaped_latents_and_broadcast_observations(guide):
    y = beta_bernoulli_data()
    pyro.set_rng_seed(0)
    post = SVI(guide, progress=False).fit(beta_bernoulli_model, y)
    assert math.isfinite(post.log_evidence.value)
    draws = post.samples(4000)["p"]
    mean, sd = beta_bernoulli_exact(y)
    assert ((draws.mean(0) - mean).abs() < 0.1 * sd).all(), (draws.mean(0), mean)
    assert ((draws.std(0) / sd - 1).abs() < 0.15).all(), (draws.std(0), sd)
    assert post.predict(num_samples=10)["obs"].shape == (10, 40, 3)


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ChainDiagnosticsWarning")
def test_nuts_fits_batch_shaped_latents_and_broadcast_observations():
    y = beta_bernoulli_data()
    pyro.set_rng_seed(0)
    post = NUTS(num_samples=800, warmup_steps=400, progress=False).fit(beta_bernoulli_model, y)
    assert post.diagnostics["vectorised_over_chains"]
    mean, sd = beta_bernoulli_exact(y)
    assert_matches(post.draws()["p"], mean, sd)


def subsampled_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
    with pyro.plate("data", len(y), subsample_size=5) as index:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[index])


@pytest.mark.parametrize("engine", [NUTS, HMC])
def test_samplers_refuse_a_subsampled_plate_before_any_work(engine):
    y = torch.randn(20, dtype=F64)
    with pytest.raises(UnsupportedModelError, match="plate 'data' has subsample_size=5 of 20"):
        engine(num_samples=10, warmup_steps=10, progress=False).fit(subsampled_model, y)


def test_svi_scales_a_subsampled_plate():
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(20, generator=generator, dtype=F64) + 1.0
    pyro.set_rng_seed(0)
    post = SVI(num_steps=3000, progress=False).fit(subsampled_model, y)
    precision = 1 / 100 + len(y)
    mean, sd = y.sum() / precision, precision ** -0.5
    draws = post.samples(4000)["mu"]
    # A subsampled ELBO is noisier: its optimum wanders by about sd * sqrt(b/n) / sqrt(averaged steps); 0.25 sd.
    assert abs(float(draws.mean()) - mean) < 0.25 * sd
    assert abs(float(draws.std()) / sd - 1) < 0.25


def test_eager_potential_returns_infinity_outside_the_support_instead_of_raising():
    def model(y):
        sigma = pyro.sample("sigma", dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(0.0, sigma), obs=y)

    potential = ModelPotential(model, (torch.randn(5, dtype=F64),))
    with pyro.validation_enabled(True):
        energy, grad = potential.potential_and_grad(torch.tensor([[-1000.0], [0.0]], dtype=F64))
    assert not torch.isfinite(energy[0]) and torch.isfinite(energy[1])


def test_samplers_refuse_pyro_params_by_name():
    def with_param(y):
        scale = pyro.param("scale", torch.tensor(1.0, dtype=F64))
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), scale))
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match=r"pyro.param sites \['scale'\]"):
        NUTS(num_samples=10, warmup_steps=10, progress=False).fit(with_param, torch.zeros(3, dtype=F64))
    with pytest.raises(UnsupportedModelError, match=r"pyro.param sites \['scale'\]"):
        SGLD(num_samples=10, progress=False).fit(with_param, torch.zeros(3, dtype=F64))


def mixture_model(y):
    """Two Gaussian components with known weights and unit noise; the assignments are enumerated out."""
    prior_means = torch.tensor([-2.0, 2.0], dtype=y.dtype)
    locs = pyro.sample("locs", dist.Normal(prior_means, 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        assignment = pyro.sample("assignment", dist.Categorical(torch.tensor([0.4, 0.6], dtype=y.dtype)))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], 1.0), obs=y)


def mixture_data():
    generator = torch.Generator().manual_seed(5)
    z = torch.rand(24, generator=generator) < 0.6
    return torch.where(z, 2.5, -1.5).double() + torch.randn(24, generator=generator, dtype=F64)


def mixture_reference(y, points=241):
    """Posterior moments of the two locations and P(assignment_i = 1 | y), by quadrature on a grid
    (the assignments summed exactly): grid spacing 0.025 over +-3 posterior sds."""
    axis = torch.linspace(-6.0, 6.0, points, dtype=F64)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    locs = torch.stack([a, b], -1)  # [G, G, 2]
    log_prior = dist.Normal(torch.tensor([-2.0, 2.0], dtype=F64), 1.0).log_prob(locs).sum(-1)
    log_w = torch.tensor([0.4, 0.6], dtype=F64).log()
    per_component = log_w + dist.Normal(locs.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))  # [G, G, n, 2]
    log_post = log_prior + torch.logsumexp(per_component, -1).sum(-1)
    weights = (log_post - log_post.max()).exp()
    weights = weights / weights.sum()
    mean = (weights.unsqueeze(-1) * locs).sum((0, 1))
    sd = ((weights.unsqueeze(-1) * (locs - mean) ** 2).sum((0, 1))).sqrt()
    membership = (per_component - torch.logsumexp(per_component, -1, keepdim=True)).exp()[..., 1]
    return mean, sd, (weights.unsqueeze(-1) * membership).sum((0, 1))


def check_mixture_fit(num_samples, warmup_steps, sd_tolerance):
    y = mixture_data()
    pyro.set_rng_seed(0)
    # init_radius: start near locs = 0, where the priors (means -2, +2) break the label symmetry; a start
    # in the label-switched basin finds the other, 12-nat lower mode (a multimodality, not an error).
    post = NUTS(num_samples=num_samples, warmup_steps=warmup_steps, init_radius=0.05, progress=False).fit(mixture_model, y)
    mean, sd, membership = mixture_reference(y)
    draws = post.draws()["locs"]
    flat = draws.reshape(-1, 2)
    mcse = sd / torch.as_tensor(bulk_ess(draws)).sqrt()
    assert ((flat.mean(0) - mean).abs() < 4 * mcse).all(), (flat.mean(0), mean, mcse)
    assert ((flat.std(0) / sd - 1).abs() < sd_tolerance).all(), (flat.std(0), sd)
    assignments = post.samples()["assignment"]  # [S, n], drawn by infer_discrete given each draw
    assert assignments.shape == (num_samples, 24)
    # Each P(assignment_i = 1) is a mean of S Bernoulli draws (sd <= 0.5 / sqrt(S)): within 4 sd.
    assert ((assignments.double().mean(0) - membership).abs() < 4 * 0.5 / math.sqrt(num_samples)).all()


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ChainDiagnosticsWarning")
def test_nuts_enumerates_discrete_assignments_and_recovers_them():
    # A deliberately short run (the enumerated potential is evaluated per point, ~10 ms a call), so the
    # chain check may flag ESS < 100; the accuracy checks below use the measured ESS.
    # 150 draws: an sd's relative MCSE is about 1 / sqrt(2 ESS) = 6%, so sds are held to 25% (4 MCSE).
    check_mixture_fit(150, 100, 0.25)


@pytest.mark.slow
def test_nuts_enumerates_discrete_assignments_and_recovers_them_closely():
    check_mixture_fit(600, 300, 0.10)


def test_samplers_refuse_a_discrete_latent_with_unbounded_support():
    def poisson_latent(y):
        count = pyro.sample("count", dist.Poisson(torch.tensor(3.0, dtype=F64)))
        pyro.sample("obs", dist.Normal(count, 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match="site 'count' is discrete with an unbounded support"):
        NUTS(num_samples=10, warmup_steps=10, progress=False).fit(poisson_latent, torch.tensor(2.0, dtype=F64))


@pytest.mark.parametrize("guide", ["normal", "mvn"])
def test_svi_enumerates_discrete_assignments_and_recovers_them(guide):
    y = mixture_data()
    pyro.set_rng_seed(0)
    post = SVI(guide, progress=False).fit(mixture_model, y)
    mean, sd, membership = mixture_reference(y)
    draws = post.samples(2000)
    # SVI criterion of the issue: means within 0.1 posterior sd (+ 4 MCSE of 2000 iid draws), sds within 15%.
    assert ((draws["locs"].mean(0) - mean).abs() < (0.1 + 4 / math.sqrt(2000)) * sd).all(), (draws["locs"].mean(0), mean)
    assert ((draws["locs"].std(0) / sd - 1).abs() < 0.15).all(), (draws["locs"].std(0), sd)
    assert draws["assignment"].shape == (2000, 24)
    # P(assignment_i = 1): a mean of 2000 draws (sd <= 0.011), plus the guide's own error: within 0.05.
    assert ((draws["assignment"].double().mean(0) - membership).abs() < 0.05).all()
    assert math.isfinite(post.log_evidence.value)
