"""HMC's jittered, adapted trajectory on a badly scaled posterior, the checks that catch a stuck chain,
and the ArviZ-named sample statistics (energy for BFMI) of both samplers.

The scaled case (issue 15): a normal mean with known noise, data x 1e6, prior N(0, 100^2): the posterior
is N(m, s^2) in closed form (s close to 100). Tolerances: the mean within 4 MCSE (MCSE = s / sqrt(bulk
ESS)); the sd within 10% (its relative MCSE is about 1 / sqrt(2 ESS_tail), under 3% here).
"""

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference import ChainDiagnosticsWarning
from bmm_ppl.inference.hmc import HMC, NUTS

PRIOR_SD, NOISE = 100.0, 1e6


def scaled_data(n=20):
    generator = torch.Generator().manual_seed(0)
    return 1e6 * (1.0 + torch.randn(n, generator=generator, dtype=torch.float64))


def normal_mean(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), PRIOR_SD))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, NOISE), obs=y)


def exact_posterior(y):
    precision = PRIOR_SD**-2 + len(y) / NOISE**2
    return float(y.sum()) / NOISE**2 / precision, precision**-0.5


def test_hmc_at_its_defaults_samples_a_badly_scaled_posterior():
    y = scaled_data()
    mean, sd = exact_posterior(y)
    pyro.set_rng_seed(0)
    post = HMC(num_samples=1000, warmup_steps=1000, progress=False).fit(normal_mean, y)  # no warning
    mu = post.draws()["mu"]
    ess = float(post.diagnostics["ess_bulk"]["mu"])
    assert abs(float(mu.mean()) - mean) < 4 * sd / math.sqrt(ess), (float(mu.mean()), mean, ess)
    assert abs(float(mu.std()) / sd - 1) < 0.10
    # The number of leapfrog steps follows the adapted step size, jittered by a factor in [0.5, 1.5]
    # around the trajectory length pi / 2 (in the metric's units), rounded up: on average the trajectory
    # is pi / 2 plus half a step (the jitter's mean over 1000 draws is within 1% of 1).
    steps, step_size = post.sample_stats["n_steps"], post.sample_stats["step_size"]
    assert len(steps.unique()) > 1
    nominal = math.pi / 2 / step_size
    assert ((steps >= torch.ceil(0.5 * nominal)) & (steps <= torch.ceil(1.5 * nominal))).all()
    expected = math.pi / 2 + 0.5 * float(step_size[0, 0])
    assert float(post.diagnostics["trajectory_length"][0]) == pytest.approx(expected, rel=0.05)


def test_a_stuck_chain_is_reported_by_name():
    """One leapfrog step of a fixed tiny size with no adaptation: the chain stays near its start (the
    issue's "mean -1.6 +- 0.4 against 66 +- 10"). It must not come back silently."""
    y = scaled_data()
    pyro.set_rng_seed(0)
    engine = HMC(num_samples=300, warmup_steps=50, num_steps=1, step_size=1e-2, adapt_step_size=False,
                 adapt_mass_matrix=False, progress=False)
    with pytest.warns(ChainDiagnosticsWarning, match=r"bulk ESS .* per chain at mu"):
        with pytest.warns(ChainDiagnosticsWarning, match="far shorter than the posterior's scale"):
            post = engine.fit(normal_mean, y)
    assert float(post.draws()["mu"].std()) < 0.1 * exact_posterior(y)[1]


@pytest.mark.parametrize("engine", [HMC, NUTS])
def test_sample_stats_carry_arviz_names_and_the_energy_at_the_draw(engine):
    scales = torch.tensor([1.0, 3.0], dtype=torch.float64)
    pyro.set_rng_seed(1)
    post = engine(num_samples=500, warmup_steps=300, num_chains=2, progress=False).run_potential(
        lambda z: 0.5 * ((z / scales) ** 2).sum(-1), torch.zeros(2, dtype=torch.float64))
    stats = post.sample_stats
    names = {"lp", "energy", "acceptance_rate", "diverging", "n_steps", "step_size"}
    assert names | ({"tree_depth"} if engine is NUTS else set()) == set(stats)
    assert all(value.shape == (2, 500) for value in stats.values()) and stats["diverging"].dtype == torch.bool
    z = post.draws()["z"]
    torch.testing.assert_close(stats["lp"], -0.5 * ((z / scales) ** 2).sum(-1))
    # H = U + K with K >= 0 at the drawn point; for a D-dimensional Gaussian, E[H] = D and Var[H] = D
    # (U and K each chi^2_D / 2). 1000 draws: the mean's MCSE is ~ sqrt(2 / ESS) < 0.15 for ESS > 100.
    assert (stats["energy"] >= -stats["lp"] - 1e-9).all()
    assert abs(float(stats["energy"].mean()) - 2.0) < 0.3
    bfmi = az.bfmi(stats["energy"].numpy())
    assert bfmi.shape == (2,) and (bfmi > 0.3).all()
    assert post.diagnostics["max_r_hat"] < 1.01 and post.diagnostics["r_hat"]["z"].shape == (2,)
