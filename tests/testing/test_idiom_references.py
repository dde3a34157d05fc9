"""The exact references of the Pyro-idiom suite (bmm_ppl.testing.idioms), checked against each other:
closed forms against quadrature, quadrature against closed forms and against torch's own densities,
moment formulas against many independent draws."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch

from bmm_ppl.testing.idioms import PYRO_IDIOMS, Grid, quadrature_moments
from bmm_ppl.testing.idioms import references as ref
from bmm_ppl.testing.idioms.references import trace_program
from bmm_ppl.testing.idioms import structure, supports

Normal = torch.distributions.Normal


def _close(a, b, tol):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


def _assert_same_moments(moments, reference, tol, sites=None):
    """``moments[a]`` against ``reference[b]`` for each ``a: b`` of ``sites`` (default: same names)."""
    for name, other in (sites or {n: n for n in moments}).items():
        assert _close(moments[name].mean, reference[other].mean, tol), name
        assert _close(moments[name].sd, reference[other].sd, tol), name


def test_the_suite_has_at_least_25_programs_and_covers_issue_14():
    assert len(PYRO_IDIOMS) >= 25
    features = " ".join(builder().feature for builder in PYRO_IDIOMS.values())
    for idiom in ("poutine.mask", "mask(mask=False)", "poutine.scale", "obs_mask", "nested plates", "subsample_size",
                  "batch shape outside plates", "broadcast without a plate", ".to_event", "simplex", "ordered",
                  "correlation Cholesky", "positive-definite", "interval", "positive", "ImproperUniform",
                  "mask(False)", "pyro.deterministic", "pyro.param", "config_enumerate", '"enumerate": "parallel"'):
        assert idiom in features, idiom


@pytest.mark.parametrize("name", sorted(PYRO_IDIOMS))
def test_reference_sites_exist_with_the_traced_shapes(name):
    program = PYRO_IDIOMS[name]()
    trace = trace_program(program)
    assert program.reference
    for site, moments in program.reference.items():
        assert site in trace.nodes, site
        assert moments.mean.shape == trace.nodes[site]["value"].shape, site
        checked = ~moments.mean.isnan()
        assert checked.any() and (moments.sd[checked] >= 0).all()
    moved = program.to(torch.float32)
    assert all(m.mean.dtype == torch.float32 for m in moved.reference.values())


def test_normal_mean_closed_form_agrees_with_quadrature():
    program = structure.normal_normal()
    (y,) = program.args
    log_joint = lambda p: Normal(0.0, 2.0).log_prob(p[:, 0]) + Normal(p[:, :1], 1.0).log_prob(y).sum(-1)  # noqa: E731
    moments, log_z = quadrature_moments(log_joint, Grid.box([(-1.0, 3.5)], 3000), {"mu": lambda p: p[:, 0]})
    _assert_same_moments(moments, program.reference, 1e-8)
    assert abs(log_z - program.log_evidence) < 1e-8


def test_weighted_normal_mean_is_the_duplicated_data_posterior():
    y = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    weighted, _ = ref.normal_mean_posterior(0.5, 2.0, y, 1.5, weights=torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))
    repeated, _ = ref.normal_mean_posterior(0.5, 2.0, torch.tensor([0.3, 0.3, -1.0, 2.0, 2.0, 2.0], dtype=torch.float64), 1.5)
    assert _close(weighted.mean, repeated.mean, 1e-12) and _close(weighted.sd, repeated.sd, 1e-12)


def test_beta_binomial_closed_form_agrees_with_quadrature():
    program = structure.beta_binomial()
    trials, successes = program.args
    prior = torch.distributions.Beta(torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))

    def log_joint(points):
        p = points[:, :1]
        return prior.log_prob(points[:, 0]) + torch.distributions.Binomial(trials, probs=p).log_prob(successes).sum(-1)

    moments, log_z = quadrature_moments(log_joint, Grid.box([(0.0, 1.0)], 20000), {"p": lambda p: p[:, 0]})
    _assert_same_moments(moments, program.reference, 1e-7)
    assert abs(log_z - program.log_evidence) < 1e-6


def test_gamma_poisson_closed_form_agrees_with_quadrature():
    program = structure.gamma_poisson()
    (counts,) = program.args
    prior = torch.distributions.Gamma(torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    log_joint = lambda p: prior.log_prob(p[:, 0]) + torch.distributions.Poisson(p[:, :1]).log_prob(counts).sum(-1)  # noqa: E731
    moments, log_z = quadrature_moments(log_joint, Grid.box([(1e-6, 10.0)], 20000), {"rate": lambda p: p[:, 0]})
    _assert_same_moments(moments, program.reference, 1e-7)
    assert abs(log_z - program.log_evidence) < 1e-6


def test_dirichlet_evidence_with_two_categories_is_the_beta_bernoulli_evidence():
    concentration = torch.tensor([1.5, 2.5], dtype=torch.float64)
    counts = torch.tensor([7.0, 4.0], dtype=torch.float64)
    bernoulli = torch.cat([torch.ones(7), torch.zeros(4)]).double()
    expected = ref.beta_binomial_log_evidence(1.5, 2.5, bernoulli, torch.ones(11, dtype=torch.float64))
    assert abs(ref.dirichlet_categorical_log_evidence(concentration, counts) - expected) < 1e-10


def test_dirichlet_and_wishart_moment_formulas_agree_with_draws():
    # 200k independent draws: the mean's MC standard error is sd / 447; 5 of them is the tolerance.
    torch.manual_seed(0)
    program = supports.dirichlet_categorical()
    x, concentration = program.args
    posterior = torch.distributions.Dirichlet(concentration + torch.bincount(x, minlength=3).double())
    draws = posterior.sample((200_000,))
    moments = program.reference["probs"]
    assert ((draws.mean(0) - moments.mean).abs() < 5 * moments.sd / 447).all()
    assert ((draws.std(0) / moments.sd - 1).abs() < 0.01).all()

    program = supports.wishart_precision()
    (y,) = program.args
    scale = torch.linalg.inv(4.0 * torch.eye(2, dtype=torch.float64) + y.T @ y)
    posterior = torch.distributions.Wishart(torch.tensor(24.0, dtype=torch.float64), covariance_matrix=scale)
    with warnings.catch_warnings():
        # torch 2.x's Wishart.sample warns "Singular sample detected" for every non-singular draw (its check
        # is inverted); the draws themselves are right.
        warnings.filterwarnings("ignore", "Singular sample detected", UserWarning)
        draws = posterior.sample((200_000,))
    assert torch.linalg.eigvalsh(draws).min() > 0
    moments = program.reference["precision"]
    assert ((draws.mean(0) - moments.mean).abs() < 5 * moments.sd / 447).all()
    assert ((draws.std(0) / moments.sd - 1).abs() < 0.01).all()


def test_normal_gamma_closed_form_agrees_with_quadrature():
    program = supports.normal_gamma()
    (y,) = program.args
    tau_prior = torch.distributions.Gamma(torch.tensor(2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))

    def log_joint(points):  # over (mu, log tau)
        mu, tau = points[:, 0], points[:, 1].exp()
        return (tau_prior.log_prob(tau) + points[:, 1] + Normal(0.5, (2 * tau).rsqrt()).log_prob(mu)
                + Normal(mu.unsqueeze(-1), tau.rsqrt().unsqueeze(-1)).log_prob(y).sum(-1))

    grid = Grid.box([(-0.5, 2.8), (-2.5, 3.0)], 700)
    moments, log_z = quadrature_moments(log_joint, grid, {"mu": lambda p: p[:, 0], "tau": lambda p: p[:, 1].exp()})
    _assert_same_moments(moments, program.reference, 1e-6)
    assert abs(log_z - program.log_evidence) < 1e-6


def test_uniform_interval_quadrature_agrees_with_the_truncated_normal():
    program = supports.uniform_interval()
    (y,) = program.args
    loc, scale = float(y.mean()), 1 / math.sqrt(len(y))
    truncated = scipy.stats.truncnorm((0 - loc) / scale, (2 - loc) / scale, loc=loc, scale=scale)
    assert abs(float(program.reference["theta"].mean) - truncated.mean()) < 1e-6
    assert abs(float(program.reference["theta"].sd) - truncated.std()) < 1e-6


def test_flat_positive_scale_quadrature_agrees_with_its_closed_form():
    # p(sigma | y) ~ sigma^-n exp(-S / (2 sigma^2)): E sigma = sqrt(S/2) G((n-2)/2) / G((n-1)/2), E sigma^2 = S/(n-3).
    program = supports.improper_positive_scale()
    (y,) = program.args
    n, half_s = len(y), float((y**2).sum()) / 2
    mean = math.sqrt(half_s) * math.exp(math.lgamma((n - 2) / 2) - math.lgamma((n - 1) / 2))
    sd = math.sqrt(2 * half_s / (n - 3) - mean**2)
    assert abs(float(program.reference["sigma"].mean) - mean) < 1e-6
    assert abs(float(program.reference["sigma"].sd) - sd) < 1e-6


def test_lkj_marginal_is_pyros_lkj_cholesky_density():
    r = torch.linspace(-0.99, 0.99, 9, dtype=torch.float64)
    pyro_density = dist.LKJCholesky(2, concentration=torch.tensor(2.0, dtype=torch.float64)).log_prob(
        supports.correlation_cholesky(r))
    assert _close(pyro_density, supports.lkj_log_prior(r, 2.0), 1e-10)
    grid = Grid.box([(-1.0, 1.0)], 4000)
    for eta in (0.7, 1.0, 3.0):
        _, log_z = quadrature_moments(lambda p: supports.lkj_log_prior(p[:, 0], eta), grid, {})
        assert abs(log_z) < 1e-3 if eta < 1 else abs(log_z) < 1e-8  # eta < 1: integrable edge singularity


def test_ordered_reference_agrees_with_quadrature_over_the_ordered_values():
    # The reference integrates over the base coordinates by hand; here over (x0, x1) with torch's own
    # TransformedDistribution density (OrderedTransform's log-det), -inf below the diagonal.
    program = supports.ordered_vector()
    y_low, y_high = program.args
    prior = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1),
                                         [pyro.distributions.transforms.OrderedTransform()])

    def log_joint(x):
        ordered = x[:, 1] > x[:, 0]
        safe = torch.where(ordered.unsqueeze(-1), x, torch.stack([x[:, 0], x[:, 0] + 1], -1))
        log_prior = torch.where(ordered, prior.log_prob(safe), torch.full_like(x[:, 0], -math.inf))
        return (log_prior + Normal(x[:, :1], 1.0).log_prob(y_low).sum(-1)
                + Normal(x[:, 1:], 1.0).log_prob(y_high).sum(-1))

    moments, log_z = quadrature_moments(log_joint, Grid.box([(-2.5, 1.5), (-1.5, 3.0)], 800), {"x": lambda p: p})
    _assert_same_moments(moments, program.reference, 2e-4, {"x": "cutpoints"})
    assert abs(log_z - program.log_evidence) < 1e-3


def test_discrete_switch_closed_form_agrees_with_enumeration_and_quadrature():
    program = supports.discrete_switch()
    (y,) = program.args
    prior_w = torch.tensor([0.7, 0.3], dtype=torch.float64)

    def per_value(points):  # Tensor[G, 2]: log p(z) + log p(mu) + log p(y | mu, z)
        mu = points[:, :1]
        return torch.stack([prior_w[z].log() + Normal(0.0, 1.0).log_prob(mu[:, 0])
                            + Normal(mu + 1.5 * z, 1.0).log_prob(y).sum(-1) for z in (0, 1)], -1)

    grid = Grid.box([(-5.0, 5.0)], 5000)
    moments, log_z = quadrature_moments(lambda p: per_value(p).logsumexp(-1), grid,
                                        {"mu": lambda p: p[:, 0], "shift": lambda p: per_value(p).softmax(-1)[:, 1]})
    _assert_same_moments(moments, program.reference, 1e-8, {"mu": "mu"})  # shift's sd is Bernoulli's
    assert _close(moments["shift"].mean, program.reference["shift"].mean, 1e-8)
    assert abs(log_z - program.log_evidence) < 1e-8


def test_mixture_reference_is_converged_in_the_grid():
    program = supports.mixture_config_enumerate()
    (y,) = program.args
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)

    def log_joint(locs):
        terms = weights.log() + Normal(locs.unsqueeze(1), 1.0).log_prob(y.unsqueeze(-1).unsqueeze(0))
        return Normal(torch.tensor([-2.0, 2.0], dtype=torch.float64), 1.0).log_prob(locs).sum(-1) + terms.logsumexp(-1).sum(-1)

    finer, log_z = quadrature_moments(log_joint, Grid.box([(-7.0, 5.0), (-5.0, 7.0)], 700), {"locs": lambda p: p})
    _assert_same_moments(finer, program.reference, 1e-6)
    assert abs(log_z - program.log_evidence) < 1e-6
    p = program.reference["assignment"].mean
    assert ((p > 0) & (p < 1)).all() and _close(program.reference["assignment"].sd, (p * (1 - p)).sqrt(), 1e-12)
