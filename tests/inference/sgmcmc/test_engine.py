"""SGLD-family samplers against the exact conjugate posterior.

Tolerances: means within 4 MCSE (MCSE = sd / sqrt(ArviZ bulk ESS)) and sds within 10% with a small step
(SGLD's O(step) bias in the variance is about step * curvature / 2 = 1e-3 * 21 / 2 ~ 1% here, and the
sd's relative MCSE ~ 1/sqrt(2 ESS) ~ 3% at ESS ~ 400). The design is standardised so both weights mix
at the same rate.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference import DivergenceError, Exact
from bmm_ppl.inference.sgmcmc import SGLD, polynomial_decay
from bmm_ppl.models import BayesianLinearRegression, polynomial_features
from tests.conftest import default_device
from tests.inference.hmc.test_nuts import assert_matches


# Runs kept deliberately short (their subject is not the posterior: capture equivalence, devices, shapes,
# a deterministic descent): their chains fail the end-of-run checks by design, so that warning is filtered
# here and only here.
short_run = pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ChainDiagnosticsWarning")
# Many short chains pooled: each chain's ESS is below 100 at the small fixed step (autocorrelation about
# 1 - 1e-3 * 21 per step), which the per-chain check reports, while the pooled ESS (~400 over 16 chains)
# is what the 4-MCSE tolerance uses.
pooled_short_chains = pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ChainDiagnosticsWarning")


def data(device="cpu"):
    generator = torch.Generator().manual_seed(1)
    x = torch.linspace(-1.7, 1.7, 20, dtype=torch.float64)
    y = 0.5 + 1.5 * x + 0.5 * torch.randn(20, generator=generator, dtype=torch.float64)
    return x.to(device), y.to(device)


MODEL = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.0)


def exact_mean_sd(x, y):
    samples = Exact().fit(MODEL, x, y).samples(200_000)["w"]
    return samples.mean(0), samples.std(0)


@pooled_short_chains
@pytest.mark.parametrize("method", ["sgld", "sghmc"])
def test_recovers_the_conjugate_posterior_with_a_small_step(method):
    x, y = data()
    mean, sd = exact_mean_sd(x, y)
    engine = SGLD(num_samples=2500, warmup_steps=500, num_chains=16, lr=1e-3, method=method, progress=False)
    post = engine.fit(MODEL, x, y)
    w = post.draws()["w"]
    assert w.shape == (16, 2500, 2)
    assert_matches(w, mean, sd)
    assert post.sample_stats["lp"].shape == (16, 2500)


@pooled_short_chains
def test_minibatched_sgld_recovers_the_conjugate_posterior():
    # Only the likelihood is scaled by n / b = 4: a prior scaled with it (as before this test) moved the
    # slope's mean by ~0.9 sd. The minibatch gradient's variance, about (n^2 / b)(1 - b / n) ~ 60, adds
    # step * Var / 2 ~ 3% to the injected noise variance: ~1.5% on the sds, inside the 10% tolerance.
    x, y = data()
    mean, sd = exact_mean_sd(x, y)
    post = SGLD(num_samples=2500, warmup_steps=500, num_chains=16, lr=1e-3, batch_size=5, jit=True,
                progress=False).fit(MODEL, x, y)
    assert post.diagnostics["jit"] == "graph"
    assert_matches(post.draws()["w"], mean, sd)


@short_run
def test_preconditioned_minibatched_thinned_and_scheduled_runs_land_near_the_posterior():
    x, y = data()
    mean, sd = exact_mean_sd(x, y)
    engine = SGLD(num_samples=300, warmup_steps=1000, num_chains=8, lr=polynomial_decay(1e-2, 0.3, 500.0),
                  method="psgld", batch_size=10, thin=3, progress=False)
    post = engine.fit(MODEL, x, y)
    w = post.draws()["w"].reshape(-1, 2)
    assert post.draws()["w"].shape == (8, 300, 2)
    # Minibatch noise and the preconditioner bias the spread; the mean stays within half a posterior sd.
    assert ((w.mean(0) - mean).abs() < 0.5 * sd).all()
    steps = post.sample_stats["step_size"][0]
    assert steps[0] > steps[-1]  # the schedule decays


@short_run
def test_temperature_zero_is_noise_free_descent_to_the_mode():
    x, y = data()
    mean, _ = exact_mean_sd(x, y)  # Gaussian posterior: mode = mean
    post = SGLD(num_samples=10, warmup_steps=600, lr=3e-2, temperature=0.0, progress=False).fit(MODEL, x, y)
    torch.testing.assert_close(post.draws()["w"][0, -1], mean, atol=0.01, rtol=0)


@short_run
def test_plate_subsample_scaling_is_honoured():
    # A model that subsamples itself: pyro.plate's scale n / subsample_size enters the potential.
    y = torch.linspace(-1, 1, 40, dtype=torch.float64) + 2.0

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        with pyro.plate("data", len(y), subsample_size=10) as index:
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y[index])

    post = SGLD(num_samples=800, warmup_steps=200, num_chains=4, lr=4e-3, progress=False).fit(model, y)
    loc = post.draws()["loc"]
    # posterior sd = 1/sqrt(40) ~ 0.16; without the plate's scale of 4 it would be 0.32
    assert abs(loc.mean() - 2.0) < 0.1 and 0.1 < loc.std() < 0.25


def test_divergence_is_raised():
    x, y = data()
    with pytest.raises(DivergenceError, match="lower lr"):
        SGLD(num_samples=200, warmup_steps=0, lr=5.0, progress=False).fit(MODEL, x, y)


@short_run
def test_device_discipline():
    x, y = data()
    with default_device("meta"):
        post = SGLD(num_samples=20, warmup_steps=20, num_chains=2, lr=1e-3, batch_size=5, method="sghmc",
                    progress=False).fit(MODEL, x, y)
    assert post.draws()["w"].device.type == "cpu"


@pytest.mark.gpu
@short_run
def test_sgld_on_gpu():
    x, y = data("cuda")
    post = SGLD(num_samples=50, warmup_steps=50, num_chains=4, lr=1e-3, progress=False).fit(MODEL, x, y)
    assert post.draws()["w"].device.type == "cuda"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"thin": 0}, "thin"),
        ({"lr": -1.0}, "lr"),
        ({"method": "adam"}, "method"),
        ({"batch_size": 0}, "batch_size"),
        ({"temperature": -1.0}, "temperature"),
        ({"friction": 2.0}, "friction"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGLD(**kwargs)


@short_run
def test_bad_data():
    x, y = data()
    with pytest.raises(ValueError, match="batch_size"):
        SGLD(batch_size=100, progress=False).fit(MODEL, x, y)
    with pytest.raises(TypeError, match="model"):
        SGLD(progress=False).fit(None, x, y)


# ---------------------------------------------------------------------------- captured minibatch potential
@pytest.mark.parametrize("method", ["sgld", "psgld", "sghmc"])
@short_run
def test_jit_runs_the_same_chain_as_the_model(method):
    # Same seed, same minibatches and noise: the captured graph computes what the model run computes.
    x, y = data()
    chains = {}
    for jit in (False, True):
        pyro.set_rng_seed(3)
        post = SGLD(num_samples=100, warmup_steps=50, num_chains=3, lr=1e-3, method=method, batch_size=8,
                    thin=2, jit=jit, progress=False).fit(MODEL, x, y)
        assert post.diagnostics["jit"] == ("graph" if jit else "none")
        chains[jit] = post
    torch.testing.assert_close(chains[True].draws()["w"], chains[False].draws()["w"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(chains[True].sample_stats["lp"],
                               chains[False].sample_stats["lp"], rtol=1e-9, atol=1e-8)


@short_run
def test_jit_full_data_steps_match_the_model():
    x, y = data()
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(4)
        post = SGLD(num_samples=50, warmup_steps=10, num_chains=2, lr=1e-3, jit=jit, progress=False).fit(MODEL, x, y)
        draws.append(post.draws()["w"])
    torch.testing.assert_close(draws[1], draws[0], rtol=1e-9, atol=1e-10)


def test_captured_minibatch_potential_is_the_scaled_batch_likelihood_plus_prior():
    # U(z) = -(n/b) sum_batch log N(y_i | m, s) - log N(m | 0, 3) - log LogNormal(s | 0, 1) - log s  (s = exp z_s)
    from bmm_ppl.inference.program.minibatch import DataArguments, compiled_minibatch_potential_and_grad
    from bmm_ppl.inference.program.potential import ModelPotential

    y = torch.linspace(-2.0, 3.0, 12, dtype=torch.float64)
    offset = torch.tensor(0.5, dtype=torch.float64)  # not data: its first dimension is not n

    def model(y, offset):
        m = pyro.sample("m", dist.Normal(torch.zeros((), dtype=y.dtype), 3.0))
        s = pyro.sample("s", dist.LogNormal(torch.zeros((), dtype=y.dtype), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(m + offset, s), obs=y)

    potential = ModelPotential(model, (y, offset))
    split = DataArguments((y, offset), {}, size=12)
    assert split.positions == (0,)
    n, b = 12, 4
    example = torch.zeros(2, 2, dtype=torch.float64)
    captured, kind = compiled_minibatch_potential_and_grad(potential, split, n / b, example, (y[:b],), (y[b: 2 * b],))
    assert kind == "graph"

    def expected(z, batch):
        m, log_s = z[:, 0:1], z[:, 1:2]
        s = log_s.exp()
        likelihood = dist.Normal(m + offset, s).log_prob(batch).sum(-1)
        prior = dist.Normal(0.0, 3.0).log_prob(m[:, 0]) + dist.LogNormal(0.0, 1.0).log_prob(s[:, 0])
        return -((n / b) * likelihood + prior + log_s[:, 0])

    z = torch.tensor([[0.3, -0.2], [-1.0, 0.4]], dtype=torch.float64)
    for batch in (y[8:], y[[0, 5, 7, 11]]):
        value, grad = captured(z, (batch,))
        point = z.clone().requires_grad_(True)
        reference = expected(point, batch)
        (reference_grad,) = torch.autograd.grad(reference.sum(), point)
        torch.testing.assert_close(value, reference.detach())
        torch.testing.assert_close(grad, reference_grad)


@short_run
def test_value_dependent_control_flow_falls_back_to_running_the_model():
    y = torch.linspace(-1.0, 2.0, 30, dtype=torch.float64)

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros((), dtype=y.dtype), 2.0))
        scale = 1.0 if loc > 0 else 2.0  # reads a value: a captured graph would freeze one branch
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(loc, scale), obs=y)

    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(5)
        post = SGLD(num_samples=40, warmup_steps=10, num_chains=2, lr=1e-3, batch_size=10, jit=jit,
                    progress=False).fit(model, y)
        assert post.diagnostics["jit"] == "none"
        draws.append(post.draws()["loc"])
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)  # the failed capture left the RNG alone


@short_run
def test_a_value_read_of_the_minibatch_falls_back():
    # A per-batch normaliser read into Python would freeze the first minibatch's value into the graph.
    y = torch.linspace(0.5, 3.0, 30, dtype=torch.float64)

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros((), dtype=y.dtype), 2.0))
        spread = float(y.max())
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(loc, spread), obs=y)

    post = SGLD(num_samples=20, warmup_steps=0, lr=1e-3, batch_size=10, jit=True, progress=False).fit(model, y)
    assert post.diagnostics["jit"] == "none"


@short_run
def test_a_self_subsampling_model_falls_back_and_keeps_the_plate_scale():
    # pyro.plate(subsample_size=...) draws its indices inside the model: recorded as a random operation,
    # whose draws differ from the model run's at the probe point, so the capture is dropped.
    y = torch.linspace(-1, 1, 40, dtype=torch.float64) + 2.0

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        with pyro.plate("data", len(y), subsample_size=10) as index:
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y[index])

    post = SGLD(num_samples=800, warmup_steps=200, num_chains=4, lr=4e-3, jit=True, progress=False).fit(model, y)
    assert post.diagnostics["jit"] == "none"
    loc = post.draws()["loc"]
    assert abs(loc.mean() - 2.0) < 0.1 and 0.1 < loc.std() < 0.25


@short_run
def test_jit_divergence_is_raised_with_its_step():
    x, y = data()
    with pytest.raises(DivergenceError, match=r"by step \d+ .*lower lr"):
        SGLD(num_samples=200, warmup_steps=0, lr=5.0, batch_size=5, jit=True, progress=False).fit(MODEL, x, y)


@short_run
def test_jit_device_discipline():
    x, y = data()
    with default_device("meta"):
        post = SGLD(num_samples=20, warmup_steps=20, num_chains=2, lr=1e-3, batch_size=5, method="psgld",
                    jit=True, progress=False).fit(MODEL, x, y)
    assert post.diagnostics["jit"] == "graph"
    assert post.draws()["w"].device.type == "cpu"


@pytest.mark.gpu
def test_jit_sgld_on_gpu():
    x, y = data("cuda")
    post = SGLD(num_samples=50, warmup_steps=50, num_chains=4, lr=1e-3, batch_size=5, jit=True,
                progress=False).fit(MODEL, x, y)
    assert post.diagnostics["jit"] == "graph"
    assert post.draws()["w"].device.type == "cuda"


def test_sgld_defaults_sample_a_correlated_cubic_regression():
    """Issue 15: ``SGLD()`` at its defaults on a conjugate cubic regression (50 noisy sin(2 pi x) points on
    [0, 1], alpha 5e-3, beta 25: coefficient correlations up to 0.99) had sds 21% too large. The adapted
    preconditioner and whitened step 0.25 inflate the variances by 1 / (1 - 0.25 / 2) = 1.14 in theory
    (sds +7%), which the Stein ratio reports. Tolerances (issue 15): sds within 15%, means within 0.25 sd
    (the means' MCSE at bulk ESS >= 100 is <= 0.1 sd, so 0.25 sd is 2.5 MCSE at the least; the measured
    errors are under 0.2 sd at seeds 0-1)."""
    import math

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(50, generator=generator, dtype=torch.float64)
    y = torch.sin(2 * math.pi * x) + 0.2 * torch.randn(50, generator=generator, dtype=torch.float64)
    model = BayesianLinearRegression(polynomial_features(3), alpha=5e-3, beta=25.0)
    exact = Exact().fit(model, x, y).samples(200_000)["w"]
    mean, sd = exact.mean(0), exact.std(0)
    pyro.set_rng_seed(0)
    post = SGLD(progress=False).fit(model, x, y)  # at its defaults, and no chain warning
    w = post.draws()["w"].reshape(-1, 4)
    assert ((w.std(0) / sd - 1).abs() < 0.15).all(), w.std(0) / sd
    assert ((w.mean(0) - mean).abs() < 0.25 * sd).all(), (w.mean(0) - mean) / sd
    # The Stein ratio is 1.14 in expectation on this Gaussian posterior; its Monte-Carlo error over 1000
    # autocorrelated steps is a few percent.
    assert abs(post.diagnostics["stein_variance_ratio"] - 1 / (1 - 0.25 / 2)) < 0.1
    assert post.diagnostics["inverse_metric"].shape == (4, 4)
    assert set(post.sample_stats) == {"lp", "step_size"}


def test_adaptive_sgld_needs_a_warmup():
    with pytest.raises(ValueError, match="warmup_steps"):
        SGLD(warmup_steps=50)


def test_stein_ratio_is_near_one_for_a_small_step():
    # The identity Cov(z, dU/dz) = I holds for exact draws: with a small step the ratio is near 1 (bias
    # 1 / (1 - 0.02 / 2) - 1 = 1%), with a large one it grows as 1 / (1 - step / 2). The small step mixes
    # slowly (autocorrelation 0.98 between draws), which the chain checks report.
    from bmm_ppl.inference import ChainDiagnosticsWarning

    x, y = data()
    ratios = {}
    for step in (0.02, 0.8):
        pyro.set_rng_seed(0)
        engine = SGLD(num_samples=2000, warmup_steps=400, num_chains=4, whitened_step_size=step, progress=False)
        if step < 0.1:
            with pytest.warns(ChainDiagnosticsWarning, match="ESS"):
                post = engine.fit(MODEL, x, y)
        else:
            post = engine.fit(MODEL, x, y)
        ratios[step] = post.diagnostics["stein_variance_ratio"]
    assert abs(ratios[0.02] - 1.0) < 0.1
    assert abs(ratios[0.8] - 1 / (1 - 0.4)) < 0.15
