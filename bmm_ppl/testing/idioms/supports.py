"""Idiom programs about supports and site kinds: every constrained support Pyro ships, improper flat
priors, and discrete latent sites to be enumerated out, each with an exact posterior (closed form,
quadrature on a grid, or enumeration).

The quadrature references integrate hand-written densities over the coordinates named in each
builder; the grids hold the posterior mass to well below the suite's tolerances (checked in
``tests/testing/test_pyro_idioms.py`` by refining them and against closed forms where both exist).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from bmm_ppl.testing.idioms.references import (
    Grid,
    IdiomProgram,
    SiteMoments,
    dirichlet_categorical_log_evidence,
    dirichlet_posterior,
    normal_gamma_posterior,
    normal_mean_posterior,
    quadrature_moments,
)
from bmm_ppl.testing.idioms.structure import gaussian_data

_Normal = torch.distributions.Normal


def _gaussian_log_likelihood(y: torch.Tensor, loc: torch.Tensor, scale) -> torch.Tensor:
    """``sum_i log N(y_i; loc_g, scale_g)`` over grid points: ``loc: Tensor[G]``, ``scale`` a number or
    Tensor[G, 1]; returns Tensor[G]."""
    return _Normal(loc.unsqueeze(-1), scale).log_prob(y).sum(-1)


def _dirichlet_model(x, concentration):
    probs = pyro.sample("probs", dist.Dirichlet(concentration))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Categorical(probs), obs=x)


def dirichlet_categorical() -> IdiomProgram:
    """Simplex support: ``probs ~ Dirichlet([1, 2, 3])``, 40 categorical draws (a conjugate pair)."""
    x = torch.tensor([0] * 18 + [1] * 12 + [2] * 10)
    counts = torch.bincount(x, minlength=3).double()
    concentration = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    return IdiomProgram("dirichlet_categorical", "simplex support (Dirichlet)", _dirichlet_model, (x, concentration),
                        {"probs": dirichlet_posterior(concentration, counts)},
                        log_evidence=dirichlet_categorical_log_evidence(concentration, counts), step_scale=0.2)


def _ordered_model(y_low, y_high):
    base = dist.Normal(y_low.new_zeros(2), 1.0).to_event(1)
    cutpoints = pyro.sample("cutpoints", dist.TransformedDistribution(base, [OrderedTransform()]))
    with pyro.plate("low", len(y_low)):
        pyro.sample("obs_low", dist.Normal(cutpoints[..., 0], 1.0), obs=y_low)
    with pyro.plate("high", len(y_high)):
        pyro.sample("obs_high", dist.Normal(cutpoints[..., 1], 1.0), obs=y_high)


def ordered_points(z: torch.Tensor) -> torch.Tensor:
    """``OrderedTransform`` written out: ``(z0, z1) -> (z0, z0 + exp(z1))``."""
    return torch.stack([z[:, 0], z[:, 0] + z[:, 1].exp()], -1)


def ordered_vector() -> IdiomProgram:
    """Ordered support: ``cutpoints`` an ordered 2-vector, a ``TransformedDistribution`` of a standard
    normal by ``OrderedTransform``. Reference: 2-D quadrature over the base coordinates, where the
    prior is ``N(0, I)`` and ``cutpoints = (z0, z0 + exp(z1))``."""
    y_low, y_high = gaussian_data(21, -0.5, 1.0, 15), gaussian_data(22, 1.0, 1.0, 15)

    def log_joint(z):
        x = ordered_points(z)
        return (_Normal(0.0, 1.0).log_prob(z).sum(-1) + _gaussian_log_likelihood(y_low, x[:, 0], 1.0)
                + _gaussian_log_likelihood(y_high, x[:, 1], 1.0))

    moments, log_z = quadrature_moments(log_joint, Grid.box([(-3.0, 2.0), (-2.5, 2.5)], 500),
                                        {"cutpoints": ordered_points})
    return IdiomProgram("ordered_vector", "ordered support (TransformedDistribution by OrderedTransform)",
                        _ordered_model, (y_low, y_high), moments, log_evidence=log_z, step_scale=0.2)


def _lkj_model(y):
    scale_tril = pyro.sample("scale_tril", dist.LKJCholesky(2, concentration=y.new_tensor(2.0)))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.MultivariateNormal(y.new_zeros(2), scale_tril=scale_tril), obs=y)


def lkj_log_prior(r: torch.Tensor, concentration: float) -> torch.Tensor:
    """The LKJ marginal of a 2x2 correlation ``r``: ``(1 - r^2)^(eta - 1) / (2^(2 eta - 1) B(eta, eta))``."""
    eta = concentration
    log_norm = (2 * eta - 1) * math.log(2) + 2 * math.lgamma(eta) - math.lgamma(2 * eta)
    return (eta - 1) * torch.log1p(-r * r) - log_norm


def correlation_cholesky(r: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor ``[[1, 0], [r, sqrt(1 - r^2)]]`` of each correlation ``r: Tensor[G]``."""
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    return torch.stack([torch.stack([one, zero], -1), torch.stack([r, (1 - r * r).sqrt()], -1)], -2)


def lkj_cholesky() -> IdiomProgram:
    """Correlation-Cholesky support: ``LKJCholesky(2, 2.0)``, 30 bivariate points (correlation 0.6).
    Reference: 1-D quadrature over the correlation with the LKJ marginal. The diagonal entry ``[0, 0]``
    and the upper entry are constants (sd 0)."""
    generator = torch.Generator(device="cpu").manual_seed(23)
    white = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    y = white @ correlation_cholesky(torch.tensor([0.6], dtype=torch.float64))[0].T

    def log_joint(points):
        r = points[:, 0]
        cov = torch.stack([torch.stack([torch.ones_like(r), r], -1), torch.stack([r, torch.ones_like(r)], -1)], -2)
        mvn = torch.distributions.MultivariateNormal(y.new_zeros(2), covariance_matrix=cov.unsqueeze(1))
        return lkj_log_prior(r, 2.0) + mvn.log_prob(y).sum(-1)

    moments, log_z = quadrature_moments(log_joint, Grid.box([(-1.0, 1.0)], 4000),
                                        {"scale_tril": lambda p: correlation_cholesky(p[:, 0])})
    return IdiomProgram("lkj_cholesky", "correlation Cholesky support (LKJCholesky)", _lkj_model, (y,), moments,
                        log_evidence=log_z, step_scale=0.15)


def _wishart_model(y):
    precision = pyro.sample("precision", dist.Wishart(y.new_tensor(4.0), covariance_matrix=0.25 * torch.eye(
        2, dtype=y.dtype, device=y.device)))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.MultivariateNormal(y.new_zeros(2), precision_matrix=precision), obs=y)


def wishart_precision() -> IdiomProgram:
    """Positive-definite support: a ``Wishart(4, I / 4)`` precision matrix of 20 bivariate points
    (conjugate: the posterior is ``Wishart(4 + n, (4 I + S)^-1)``, ``S = sum y y^T``). torch has no
    bijection onto positive-definite matrices, so an engine that cannot reparameterise must refuse
    the site by name."""
    y = gaussian_data(24, 0.0, 1.0, 20, 2) @ torch.tensor([[1.0, 0.0], [0.5, 0.8]], dtype=torch.float64).T
    df = 4.0 + len(y)
    scale = torch.linalg.inv(4.0 * torch.eye(2, dtype=torch.float64) + y.T @ y)
    diagonal = scale.diagonal()
    sd = (df * (scale**2 + diagonal.unsqueeze(-1) * diagonal.unsqueeze(-2))).sqrt()
    return IdiomProgram("wishart_precision", "positive-definite support (Wishart)", _wishart_model, (y,),
                        {"precision": SiteMoments(df * scale, sd)}, step_scale=0.15,
                        refusable="no bijection onto positive-definite matrices in torch: refuse the site by name")


def _uniform_model(y):
    theta = pyro.sample("theta", dist.Uniform(y.new_tensor(0.0), y.new_tensor(2.0)))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)


def uniform_interval() -> IdiomProgram:
    """Interval support: ``theta ~ Uniform(0, 2)``, 20 points, posterior about 3 sds below the upper
    end (a slightly truncated normal). Reference: 1-D quadrature over (0, 2)."""
    y = gaussian_data(25, 1.3, 1.0, 20)
    moments, log_z = quadrature_moments(lambda p: _gaussian_log_likelihood(y, p[:, 0], 1.0) - math.log(2.0),
                                        Grid.box([(0.0, 2.0)], 4000), {"theta": lambda p: p[:, 0]})
    return IdiomProgram("uniform_interval", "interval support (Uniform)", _uniform_model, (y,), moments,
                        log_evidence=log_z, step_scale=0.5)


def _scale_model(prior):
    def model(y):
        sigma = pyro.sample("sigma", prior(y))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(y.new_tensor(0.0), sigma), obs=y)

    return model


def _scale_program(name, feature, prior, log_prior_of_log_sigma, seed, true_sigma, n, proper=True):
    """A scale ``sigma`` of ``n`` zero-mean normal points; quadrature over ``u = log sigma`` with the
    prior density in ``u`` (the density of ``sigma`` times ``sigma``)."""
    y = gaussian_data(seed, 0.0, true_sigma, n)

    def log_joint(points):
        u = points[:, 0]
        return log_prior_of_log_sigma(u) + _gaussian_log_likelihood(y, torch.zeros_like(u), u.exp().unsqueeze(-1))

    grid = Grid.box([(math.log(true_sigma) - 2.5, math.log(true_sigma) + 2.5)], 4000)
    moments, log_z = quadrature_moments(log_joint, grid, {"sigma": lambda p: p[:, 0].exp()})
    return IdiomProgram(name, feature, _scale_model(prior), (y,), moments, log_evidence=log_z if proper else None,
                        step_scale=0.13)


def lognormal_scale() -> IdiomProgram:
    """Positive support: ``sigma ~ LogNormal(0, 1)`` as the scale of 30 normal points."""
    return _scale_program("lognormal_scale", "positive support (LogNormal)",
                          lambda y: dist.LogNormal(y.new_tensor(0.0), 1.0),
                          lambda u: _Normal(0.0, 1.0).log_prob(u), 26, 1.5, 30)


def halfnormal_scale() -> IdiomProgram:
    """Positive support: ``sigma ~ HalfNormal(2)`` as the scale of 25 normal points."""
    return _scale_program("halfnormal_scale", "positive support (HalfNormal)",
                          lambda y: dist.HalfNormal(y.new_tensor(2.0)),
                          lambda u: math.log(2.0) + _Normal(0.0, 2.0).log_prob(u.exp()) + u, 27, 0.8, 25)


def improper_positive_scale() -> IdiomProgram:
    """Improper flat prior on a positive site: ``sigma ~ ImproperUniform(positive)``, so the posterior
    is ``prod N(y_i; 0, sigma)`` normalised over ``sigma > 0`` (flat in ``sigma``, not in ``log sigma``)."""
    return _scale_program("improper_positive_scale", "improper flat prior (ImproperUniform, positive)",
                          lambda y: dist.ImproperUniform(constraints.positive, (), ()), lambda u: u, 28, 1.2, 30,
                          proper=False)


def _normal_gamma_model(y):
    tau = pyro.sample("tau", dist.Gamma(y.new_tensor(2.0), y.new_tensor(2.0)))
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.5), (2.0 * tau).rsqrt()))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, tau.rsqrt()), obs=y)


def normal_gamma() -> IdiomProgram:
    """Normal-Gamma (positive precision, a prior that depends on a latent): ``tau ~ Gamma(2, 2)``,
    ``mu | tau ~ N(0.5, 1 / (2 tau))``, 40 points ``y_i ~ N(mu, 1 / tau)``; closed form."""
    y = gaussian_data(29, 1.0, 0.7, 40)
    moments, log_z = normal_gamma_posterior(0.5, 2.0, 2.0, 2.0, y)
    return IdiomProgram("normal_gamma", "positive support (Gamma precision) with a dependent prior",
                        _normal_gamma_model, (y,), moments, log_evidence=log_z, step_scale=0.18)


def _improper_real_model(y):
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def improper_uniform() -> IdiomProgram:
    """Improper flat prior: ``mu ~ ImproperUniform(real)``: the posterior is ``N(ybar, 1 / n)``."""
    y = gaussian_data(30, -1.3, 1.0, 12)
    mu = SiteMoments(y.mean(), torch.tensor(12.0, dtype=torch.float64).rsqrt())
    return IdiomProgram("improper_uniform", "improper flat prior (ImproperUniform, real)", _improper_real_model,
                        (y,), {"mu": mu}, step_scale=0.29)


def _masked_prior_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0).mask(False))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def masked_prior() -> IdiomProgram:
    """A prior switched off by ``.mask(False)``: a flat prior, so ``mu ~ N(ybar, 1 / n)`` (with the
    ``N(0, 1)`` prior counted it would shrink by about one posterior sd)."""
    y = gaussian_data(31, 3.0, 1.0, 6)
    mu = SiteMoments(y.mean(), torch.tensor(6.0, dtype=torch.float64).rsqrt())
    return IdiomProgram("masked_prior", "improper flat prior (Distribution.mask(False))", _masked_prior_model,
                        (y,), {"mu": mu}, step_scale=0.4)


# -------------------------------------------------------------------------------- discrete latents
_MIXTURE_WEIGHTS = (0.4, 0.6)
_MIXTURE_PRIOR_LOCS = (-2.0, 2.0)


@config_enumerate
def _mixture_model(y):
    locs = pyro.sample("locs", dist.Normal(y.new_tensor(_MIXTURE_PRIOR_LOCS), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        assignment = pyro.sample("assignment", dist.Categorical(y.new_tensor(_MIXTURE_WEIGHTS)))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], 1.0), obs=y)


def _mixture_plate_model(y):
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(y.new_tensor(_MIXTURE_PRIOR_LOCS), 1.0))
    with pyro.plate("data", len(y)):
        assignment = pyro.sample("assignment", dist.Categorical(y.new_tensor(_MIXTURE_WEIGHTS)),
                                 infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], 1.0), obs=y)


def _mixture_reference(y):
    """2-D quadrature over the two component means, the assignments summed out at every grid point;
    ``assignment`` gets ``P(z_i = 1 | y)`` as its mean and the Bernoulli sd."""
    weights = torch.tensor(_MIXTURE_WEIGHTS, dtype=y.dtype)
    prior = _Normal(torch.tensor(_MIXTURE_PRIOR_LOCS, dtype=y.dtype), 1.0)

    def joint_terms(locs):  # Tensor[G, n, 2]: log w_k + log N(y_i; loc_k, 1)
        return weights.log() + _Normal(locs.unsqueeze(1), 1.0).log_prob(y.unsqueeze(-1).unsqueeze(0))

    def log_joint(locs):
        return prior.log_prob(locs).sum(-1) + joint_terms(locs).logsumexp(-1).sum(-1)

    def responsibility(locs):
        return joint_terms(locs).softmax(-1)[..., 1]

    moments, log_z = quadrature_moments(log_joint, Grid.box([(-6.0, 4.0), (-4.0, 6.0)], 400),
                                        {"locs": lambda p: p, "assignment": responsibility})
    p = moments["assignment"].mean
    moments["assignment"] = SiteMoments(p, (p * (1 - p)).sqrt(), discrete=True)
    return moments, log_z


def mixture_config_enumerate() -> IdiomProgram:
    """A two-component Gaussian mixture under ``@config_enumerate``: ``locs ~ N([-2, 2], 1)``,
    assignments ``Categorical([0.4, 0.6])`` enumerated out, 12 points. Reference: enumeration of the
    assignments inside 2-D quadrature over ``locs``; the assignments' posterior probabilities too."""
    y = torch.cat([gaussian_data(32, -2.0, 1.0, 5), gaussian_data(33, 2.0, 1.0, 7)])
    moments, log_z = _mixture_reference(y)
    return IdiomProgram("mixture_config_enumerate", "discrete latent enumerated out (config_enumerate)",
                        _mixture_model, (y,), moments, log_evidence=log_z, step_scale=0.35)


def mixture_infer_enumerate() -> IdiomProgram:
    """The mixture with the means in a ``components`` plate and ``infer={"enumerate": "parallel"}`` on
    the assignment site."""
    y = torch.cat([gaussian_data(34, -2.5, 1.0, 6), gaussian_data(35, 1.5, 1.0, 6)])
    moments, log_z = _mixture_reference(y)
    return IdiomProgram("mixture_infer_enumerate", 'discrete latent enumerated out (infer={"enumerate": "parallel"})',
                        _mixture_plate_model, (y,), moments, log_evidence=log_z, step_scale=0.35)


def _switch_model(y):
    shift = pyro.sample("shift", dist.Bernoulli(y.new_tensor(0.3)), infer={"enumerate": "parallel"})
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu + 1.5 * shift, 1.0), obs=y)


def discrete_switch() -> IdiomProgram:
    """A global discrete switch ``shift ~ Bernoulli(0.3)`` (enumerated) moving the mean by 1.5. Closed
    form: for each value the Normal-Normal evidence and posterior, mixed by their posterior weights."""
    y = gaussian_data(36, 1.0, 1.0, 5)
    parts = [normal_mean_posterior(0.0, 1.0, y - 1.5 * z, 1.0) for z in (0, 1)]
    log_w = torch.tensor([math.log(0.7) + parts[0][1], math.log(0.3) + parts[1][1]], dtype=torch.float64)
    w = log_w.softmax(0)
    means = torch.stack([parts[0][0].mean, parts[1][0].mean])
    second = torch.stack([parts[0][0].sd ** 2 + parts[0][0].mean ** 2, parts[1][0].sd ** 2 + parts[1][0].mean ** 2])
    mu_mean = (w * means).sum()
    mu = SiteMoments(mu_mean, ((w * second).sum() - mu_mean**2).sqrt())
    shift = SiteMoments(w[1], (w[1] * w[0]).sqrt(), discrete=True)
    return IdiomProgram("discrete_switch", "global discrete latent enumerated out (Bernoulli)", _switch_model, (y,),
                        {"mu": mu, "shift": shift}, log_evidence=float(log_w.logsumexp(0)), step_scale=0.5)


SUPPORT_PROGRAMS = {
    builder.__name__: builder
    for builder in (
        dirichlet_categorical, ordered_vector, lkj_cholesky, wishart_precision, uniform_interval, lognormal_scale,
        halfnormal_scale, improper_positive_scale, normal_gamma, improper_uniform, masked_prior,
        mixture_config_enumerate, mixture_infer_enumerate, discrete_switch,
    )
}
