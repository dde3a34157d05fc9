"""Idiom programs about a program's structure: conjugate pairs, masks, scales, plates, batch shapes,
``.to_event``, ``pyro.deterministic`` and ``pyro.param``, each with its closed-form posterior.

The posteriors are close to Gaussian in the coordinates engines work in (enough data for every
site), so that an approximate engine (a Gaussian guide) can match them: the suite tests how a program
is read, not how good an approximating family is. Every builder returns an :class:`~bmm_ppl.testing.idioms.references.IdiomProgram` in float64 on the
CPU (``program.to(dtype, device)`` moves it); the models are written as Pyro's documentation writes
them, and create their constants from the data (``y.new_tensor``), so they follow its device and dtype.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from bmm_ppl.testing.idioms.references import (
    IdiomProgram,
    SiteMoments,
    beta_binomial_log_evidence,
    beta_posterior,
    gamma_poisson_posterior,
    normal_mean_posterior,
)


def gaussian_data(seed: int, loc: float, scale: float, *shape: int) -> torch.Tensor:
    """``loc + scale * N(0, 1)`` draws of ``shape``, float64 on the CPU, from a fixed seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return loc + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _normal_mean_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def normal_normal() -> IdiomProgram:
    """Normal-Normal in a plate: ``mu ~ N(0, 2^2)``, 20 points ``y_i ~ N(mu, 1)``."""
    y = gaussian_data(1, 1.5, 1.0, 20)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y, 1.0)
    return IdiomProgram("normal_normal", "conjugate Normal-Normal in a plate", _normal_mean_model, (y,),
                        {"mu": mu}, log_evidence=log_z, step_scale=0.2)


def _beta_binomial_model(trials, successes):
    p = pyro.sample("p", dist.Beta(trials.new_tensor(2.0), trials.new_tensor(3.0)))
    with pyro.plate("data", len(successes)):
        pyro.sample("obs", dist.Binomial(trials, p), obs=successes)


def beta_binomial() -> IdiomProgram:
    """Beta-Binomial (interval support (0, 1)): ``p ~ Beta(2, 3)``, 24 groups of 10 trials."""
    trials = torch.full((24,), 10.0, dtype=torch.float64)
    successes = torch.tensor([3.0, 4.0, 2.0, 5.0, 3.0, 4.0, 3.0, 2.0] * 3, dtype=torch.float64)
    ref = beta_posterior(2.0, 3.0, successes.sum(), trials.sum())
    return IdiomProgram("beta_binomial", "conjugate Beta-Binomial; interval support (Beta)", _beta_binomial_model,
                        (trials, successes), {"p": ref},
                        log_evidence=beta_binomial_log_evidence(2.0, 3.0, successes, trials), step_scale=0.2)


def _gamma_poisson_model(counts):
    rate = pyro.sample("rate", dist.Gamma(counts.new_tensor(3.0), counts.new_tensor(1.0)))
    with pyro.plate("data", len(counts)):
        pyro.sample("obs", dist.Poisson(rate), obs=counts)


def gamma_poisson() -> IdiomProgram:
    """Gamma-Poisson (positive support): ``rate ~ Gamma(3, 1)``, 45 counts."""
    counts = torch.tensor([4.0, 3, 6, 2, 5, 4, 4, 7, 3, 2, 5, 4, 6, 3, 4] * 3, dtype=torch.float64)
    ref, log_z = gamma_poisson_posterior(3.0, 1.0, counts)
    return IdiomProgram("gamma_poisson", "conjugate Gamma-Poisson; positive support (Gamma)", _gamma_poisson_model,
                        (counts,), {"rate": ref}, log_evidence=log_z, step_scale=0.12)


def _kept_and_outliers(seed: int):
    # The masked points are far off, so an engine that ignores the mask is off by many sds.
    keep = torch.arange(20) % 5 < 3
    y = torch.empty(20, dtype=torch.float64)
    y[keep], y[~keep] = gaussian_data(seed, 1.0, 1.0, 12), gaussian_data(seed + 1, 8.0, 1.0, 8)
    return y, keep


def _poutine_mask_model(y, keep):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y)), poutine.mask(mask=keep):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def mask_tensor() -> IdiomProgram:
    """``poutine.mask(mask=keep)`` in a plate: only the kept points count (the others are outliers)."""
    y, keep = _kept_and_outliers(3)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y[keep], 1.0)
    return IdiomProgram("mask_tensor", "poutine.mask with a tensor mask in a plate", _poutine_mask_model, (y, keep),
                        {"mu": mu}, log_evidence=log_z, step_scale=0.25)


def _distribution_mask_model(y, keep):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0).mask(keep), obs=y)


def distribution_mask() -> IdiomProgram:
    """``dist.Normal(...).mask(keep)`` in a plate, the distribution-level spelling of a mask."""
    y, keep = _kept_and_outliers(5)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y[keep], 1.0)
    return IdiomProgram("distribution_mask", "Distribution.mask with a tensor mask in a plate",
                        _distribution_mask_model, (y, keep), {"mu": mu}, log_evidence=log_z, step_scale=0.25)


def _mask_false_model(y, ignored):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)
    with poutine.mask(mask=False), pyro.plate("ignored_data", len(ignored)):
        pyro.sample("ignored_obs", dist.Normal(mu, 0.5), obs=ignored)


def mask_false() -> IdiomProgram:
    """``poutine.mask(mask=False)`` around a whole observed site: it must contribute nothing."""
    y, ignored = gaussian_data(7, 1.0, 1.0, 15), gaussian_data(8, -5.0, 1.0, 10)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y, 1.0)
    return IdiomProgram("mask_false", "poutine.mask(mask=False) over an observed site", _mask_false_model,
                        (y, ignored), {"mu": mu}, log_evidence=log_z, step_scale=0.25)


def _scaled_model(y, weights):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y)), poutine.scale(scale=weights):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def scale_constant() -> IdiomProgram:
    """``poutine.scale(scale=3.0)``: the likelihood counted three times."""
    y = gaussian_data(9, 0.7, 1.0, 10)
    mu, _ = normal_mean_posterior(0.0, 2.0, y, 1.0, weights=torch.full_like(y, 3.0))
    return IdiomProgram("scale_constant", "poutine.scale with a number", _scaled_model, (y, 3.0), {"mu": mu},
                        step_scale=0.15)


def scale_tensor() -> IdiomProgram:
    """``poutine.scale(scale=weights)`` with a weight per point in a plate (a weighted likelihood)."""
    y = gaussian_data(10, -0.5, 1.0, 12)
    weights = torch.linspace(0.25, 2.5, 12, dtype=torch.float64)
    mu, _ = normal_mean_posterior(0.0, 2.0, y, 1.0, weights=weights)
    return IdiomProgram("scale_tensor", "poutine.scale with a tensor of weights in a plate", _scaled_model,
                        (y, weights), {"mu": mu}, step_scale=0.2)


def _obs_mask_model(y, observed):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=observed)


def obs_mask() -> IdiomProgram:
    """``obs_mask``: a partially observed site. Pyro splits it into ``y_observed`` and a latent
    ``y_unobserved``; the missing entries' posterior is the predictive ``N(E mu, 1 + Var mu)``. The entries
    of ``y_unobserved`` at observed positions carry no density (masked out), so they are not checked."""
    values = gaussian_data(11, 2.0, 1.0, 14)
    observed = torch.arange(14) % 7 != 3
    y = torch.where(observed, values, torch.zeros_like(values))  # Pyro ignores the values at missing entries
    mu, _ = normal_mean_posterior(0.0, 2.0, values[observed], 1.0)
    nan = torch.full_like(values, float("nan"))
    missing = SiteMoments(torch.where(observed, nan, mu.mean), torch.where(observed, nan, (1 + mu.sd**2).sqrt()))
    # No evidence: the masked-out entries of y_unobserved make the joint improper.
    return IdiomProgram("obs_mask", "obs_mask (partially observed site)", _obs_mask_model, (y, observed),
                        {"mu": mu, "y_unobserved": missing}, step_scale=0.28)


def _nested_plates_model(y):
    with pyro.plate("groups", y.shape[-1], dim=-1):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
        with pyro.plate("members", y.shape[-2], dim=-2):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def nested_plates() -> IdiomProgram:
    """Nested plates (``dim=-1`` groups, ``dim=-2`` members): a mean per group, ``y: [6, 3]``."""
    y = gaussian_data(12, 0.0, 1.0, 6, 3) + torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    parts = [normal_mean_posterior(0.0, 2.0, y[:, j], 1.0) for j in range(3)]
    mu = SiteMoments(torch.stack([p[0].mean for p in parts]), torch.stack([p[0].sd for p in parts]))
    return IdiomProgram("nested_plates", "nested plates", _nested_plates_model, (y,), {"mu": mu},
                        log_evidence=sum(p[1] for p in parts), step_scale=0.4)


def _subsampled_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    with pyro.plate("data", len(y), subsample_size=10) as index:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y.index_select(0, index))


def subsample_plate() -> IdiomProgram:
    """A plate with ``subsample_size=10`` of 40 points: the reference is the full-data posterior."""
    y = gaussian_data(13, 1.0, 1.0, 40)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y, 1.0)
    return IdiomProgram("subsample_plate", "plate with subsample_size", _subsampled_model, (y,), {"mu": mu},
                        log_evidence=log_z, step_scale=0.15,
                        refusable="HMC/NUTS need a fixed target: the full plate or a refusal by name")


def _batch_latent_model(trials, successes):
    p = pyro.sample("p", dist.Beta(trials.new_tensor([1.0, 2.0, 3.0]), 2.0))  # batch shape [3], no plate
    pyro.sample("obs", dist.Binomial(trials, p), obs=successes)


def batch_latent() -> IdiomProgram:
    """A latent site with batch shape ``[3]`` outside any plate (``Beta(a: Tensor[3], b)``)."""
    trials = torch.tensor([100.0, 100.0, 100.0], dtype=torch.float64)
    successes = torch.tensor([22.0, 50.0, 76.0], dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    p = beta_posterior(a, 2.0, successes, trials)
    log_z = sum(beta_binomial_log_evidence(a[j], 2.0, successes[j:j + 1], trials[j:j + 1]) for j in range(3))
    return IdiomProgram("batch_latent", "latent site with a batch shape outside plates", _batch_latent_model,
                        (trials, successes), {"p": p}, log_evidence=log_z, step_scale=0.35)


def _broadcast_model(data):
    p = pyro.sample("p", dist.Beta(data.new_full((data.shape[-1],), 2.0), 2.0))
    pyro.sample("obs", dist.Bernoulli(p), obs=data)  # data: [n, k] broadcast against p: [k], no plate


def broadcast_observations() -> IdiomProgram:
    """Observations ``[80, 3]`` broadcast against ``Bernoulli(p: Tensor[3])`` with no plate."""
    generator = torch.Generator(device="cpu").manual_seed(14)
    data = (torch.rand(80, 3, generator=generator, dtype=torch.float64) < torch.tensor([0.25, 0.5, 0.7])).double()
    n = torch.full((3,), 80.0, dtype=torch.float64)
    p = beta_posterior(2.0, 2.0, data.sum(0), n)
    log_z = sum(beta_binomial_log_evidence(2.0, 2.0, data[:, j], torch.ones(80, dtype=torch.float64)) for j in range(3))
    return IdiomProgram("broadcast_observations", "observations broadcast without a plate", _broadcast_model,
                        (data,), {"p": p}, log_evidence=log_z, step_scale=0.4)


def _to_event_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(y.shape[-1]), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y)


def to_event() -> IdiomProgram:
    """``.to_event(1)`` on a vector latent and on vector observations in a plate."""
    y = gaussian_data(15, 0.0, 1.0, 10, 3) + torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64)
    parts = [normal_mean_posterior(0.0, 2.0, y[:, j], 1.0) for j in range(3)]
    mu = SiteMoments(torch.stack([p[0].mean for p in parts]), torch.stack([p[0].sd for p in parts]))
    return IdiomProgram("to_event", ".to_event on a latent and an observed site", _to_event_model, (y,),
                        {"mu": mu}, log_evidence=sum(p[1] for p in parts), step_scale=0.3)


def _expanded_observation_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    pyro.sample("obs", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)


def expand_to_event() -> IdiomProgram:
    """Observations as one event: ``Normal(mu, 1).expand([n]).to_event(1)``, no plate."""
    y = gaussian_data(16, -0.8, 1.0, 16)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y, 1.0)
    return IdiomProgram("expand_to_event", ".expand([n]).to_event(1) observations without a plate",
                        _expanded_observation_model, (y,), {"mu": mu}, log_evidence=log_z, step_scale=0.24)


def _sequential_plate_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    for i in pyro.plate("data", len(y)):
        pyro.sample(f"obs_{i}", dist.Normal(mu, 1.0), obs=y[i])


def sequential_plate() -> IdiomProgram:
    """A sequential plate (``for i in pyro.plate(...)``): one observed site per point."""
    y = gaussian_data(17, 0.4, 1.0, 8)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y, 1.0)
    return IdiomProgram("sequential_plate", "sequential pyro.plate", _sequential_plate_model, (y,), {"mu": mu},
                        log_evidence=log_z, step_scale=0.33)


def _deterministic_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 2.0))
    pyro.deterministic("shifted", 2.0 * mu + 1.0)
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def deterministic() -> IdiomProgram:
    """``pyro.deterministic("shifted", 2 mu + 1)``: its posterior is read off the latent's."""
    y = gaussian_data(18, 1.2, 1.0, 12)
    mu, log_z = normal_mean_posterior(0.0, 2.0, y, 1.0)
    shifted = SiteMoments(2 * mu.mean + 1, 2 * mu.sd)
    return IdiomProgram("deterministic", "pyro.deterministic", _deterministic_model, (y,),
                        {"mu": mu, "shifted": shifted}, log_evidence=log_z, step_scale=0.28)


def _param_model(y):
    prior_loc = pyro.param("prior_loc", y.new_tensor(0.0))
    mu = pyro.sample("mu", dist.Normal(prior_loc, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def param_site() -> IdiomProgram:
    """A ``pyro.param`` prior location. Type-II learning (SVI) sets it to the evidence maximiser, the
    data mean, so the reference is ``mu ~ N(ybar, 1 / (1 + n))``; samplers cannot learn it and must
    refuse the site by name."""
    y = gaussian_data(19, 2.0, 1.0, 10)
    mu, log_z = normal_mean_posterior(float(y.mean()), 1.0, y, 1.0)
    return IdiomProgram("param_site", "pyro.param (type-II under SVI; refused by samplers)", _param_model, (y,),
                        {"mu": mu}, log_evidence=log_z, step_scale=0.3,
                        refusable="samplers cannot learn a pyro.param: they must refuse it by name")


STRUCTURE_PROGRAMS = {
    builder.__name__: builder
    for builder in (
        normal_normal, beta_binomial, gamma_poisson, mask_tensor, distribution_mask, mask_false, scale_constant,
        scale_tensor, obs_mask, nested_plates, subsample_plate, batch_latent, broadcast_observations, to_event,
        expand_to_event, sequential_plate, deterministic, param_site,
    )
}
