"""LinearGaussianSSM as a Pyro program: sites, learned/fixed/prior arguments, the structural builders
against statsmodels' matrices, the trajectory and observation distributions, and bad inputs. float64."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference.kalman import kalman_filter
from bmm_ppl.models.state_space import (
    GaussMarkovChain,
    LinearGaussianObservations,
    LinearGaussianParams,
    LinearGaussianSSM,
    diagonal,
    local_level,
    local_linear_trend,
    seasonal,
    structural_model,
)

DT = torch.float64


def eye(n):
    return torch.eye(n, dtype=DT)


def small_params():
    f = torch.tensor([[0.9, 0.1], [0.0, 0.7]], dtype=DT)
    h = torch.tensor([[1.0, 0.5]], dtype=DT)
    return LinearGaussianParams(f, h, 0.3 * eye(2) + 0.1, 0.2 * eye(1), torch.tensor([0.5, -0.5], dtype=DT), eye(2))


def test_program_sites_and_learned_parameters():
    model = LinearGaussianSSM(0.9 * eye(2), torch.ones(1, 2, dtype=DT), None, diagonal(), torch.zeros(2, dtype=DT), eye(2))
    y = torch.randn(15, 1, dtype=DT)
    trace = pyro.poutine.trace(model).get_trace(y)
    assert trace.nodes["states"]["value"].shape == (15, 2)
    assert trace.nodes["obs"]["is_observed"] and torch.equal(trace.nodes["obs"]["value"], y)
    store = pyro.get_param_store()
    assert sorted(store.keys()) == ["observation_cov", "transition_cov"]
    assert store["transition_cov"].shape == (2, 2) and store["observation_cov"].shape == (1,)
    # Learned covariances start at the data's variance.
    assert torch.allclose(store["observation_cov"], y.var(), rtol=1e-10)
    assert torch.isfinite(trace.log_prob_sum())


def test_priors_become_sample_sites_and_the_program_runs_under_svi():
    prior = dist.InverseGamma(torch.tensor(3.0, dtype=DT), torch.tensor(2.0, dtype=DT))
    model = local_level(initial_mean=0.0, initial_cov=1.0, transition_cov=prior, observation_cov=prior)
    y = torch.randn(12, 1, dtype=DT).cumsum(0)
    trace = pyro.poutine.trace(model).get_trace(y)
    assert {"transition_cov", "observation_cov", "states", "obs"} <= set(trace.nodes)
    assert trace.nodes["transition_cov"]["type"] == "sample"
    guide = pyro.infer.autoguide.AutoNormal(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    losses = [svi.step(y) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)


def test_prior_sampling_without_data():
    model = LinearGaussianSSM(0.9 * eye(2), torch.ones(1, 2, dtype=DT), eye(2), eye(1), torch.zeros(2, dtype=DT), eye(2))
    draw = model(num_steps=7)
    assert draw.shape == (7, 1) and draw.dtype == DT


def test_batch_of_series_lives_in_a_plate():
    model = local_level(initial_mean=0.0, initial_cov=1.0, transition_cov=1.0, observation_cov=1.0)
    y = torch.randn(4, 9, 1, dtype=DT)
    trace = pyro.poutine.trace(model).get_trace(y)
    assert trace.nodes["states"]["value"].shape == (4, 9, 1)
    assert trace.nodes["obs"]["fn"].batch_shape == (4,)


def test_joint_density_integrates_to_the_kalman_evidence():
    # p(y) = p(x, y) / p(x | y) for any x; at x = smoothed mean, p(x | y) is the joint smoothing Gaussian,
    # which we build by brute force from the joint prior of (x, y) for a short series.
    params = small_params()
    steps = 4
    y = torch.randn(steps, 1, dtype=DT, generator=torch.Generator().manual_seed(0))
    chain = GaussMarkovChain(params, steps)
    # Joint Gaussian of the flattened trajectory by Monte-Carlo-free construction: sample-free moments.
    n = 2
    mean = [params.initial_mean]
    for _ in range(steps - 1):
        mean.append(params.transition_matrix @ mean[-1])
    mean = torch.cat(mean)
    cov = torch.zeros(steps * n, steps * n, dtype=DT)
    marg = [params.initial_cov]
    for _ in range(steps - 1):
        marg.append(params.transition_matrix @ marg[-1] @ params.transition_matrix.T + params.transition_cov)
    for s in range(steps):
        phi = eye(n)
        for t in range(s, steps):
            if t > s:
                phi = params.transition_matrix @ phi
            block = phi @ marg[s]
            cov[t * n : (t + 1) * n, s * n : (s + 1) * n] = block
            cov[s * n : (s + 1) * n, t * n : (t + 1) * n] = block.T
    x = torch.randn(steps, n, dtype=DT, generator=torch.Generator().manual_seed(1))
    brute = torch.distributions.MultivariateNormal(mean, cov).log_prob(x.reshape(-1))
    assert torch.allclose(chain.log_prob(x), brute, rtol=1e-10)
    # Observations: y_t | x_t independent Gaussians.
    obs = LinearGaussianObservations(params, x)
    expected = torch.distributions.Normal((x @ params.observation_matrix.T)[:, 0], params.observation_cov[0, 0].sqrt()).log_prob(y[:, 0]).sum()
    assert torch.allclose(obs.log_prob(y), expected, rtol=1e-12)
    # Marginalising x from p(x) p(y | x) by brute force gives the Kalman evidence.
    big_h = torch.block_diag(*[params.observation_matrix] * steps)
    y_cov = big_h @ cov @ big_h.T + params.observation_cov[0, 0] * eye(steps)
    marginal = torch.distributions.MultivariateNormal(big_h @ mean, y_cov).log_prob(y[:, 0])
    assert torch.allclose(kalman_filter(params, y).log_likelihood, marginal, rtol=1e-10)


def test_missing_observations_contribute_nothing():
    params = small_params()
    x = torch.randn(5, 2, dtype=DT)
    y = torch.randn(5, 1, dtype=DT)
    full = LinearGaussianObservations(params, x)
    y_missing = y.clone()
    y_missing[2] = float("nan")
    keep = [0, 1, 3, 4]
    dropped = LinearGaussianObservations(params, x[keep]).log_prob(y[keep])
    assert torch.allclose(full.log_prob(y_missing), dropped, rtol=1e-12)


@pytest.mark.parametrize("trend, period", [(False, None), (True, None), (False, 4), (True, 7)])
def test_structural_builders_match_statsmodels(trend, period):
    sm = pytest.importorskip("statsmodels.api")
    y = np.random.default_rng(0).normal(size=40).cumsum()
    kwargs = {"level": "local linear trend" if trend else "local level"}
    if period is not None:
        kwargs.update(seasonal=period, stochastic_seasonal=True)
    reference = sm.tsa.UnobservedComponents(y, **kwargs)
    model = structural_model(trend=trend, seasonal_period=period, initial_mean=0.0, initial_cov=1.0)
    assert np.allclose(model.specs["transition_matrix"].value.numpy(), reference.ssm["transition"])
    assert np.allclose(model.specs["observation_matrix"].value.numpy(), reference.ssm["design"])
    assert np.allclose(model.transition_noise_loading.numpy(), reference.ssm["selection"])
    # With the same variances and initialisation, the log-likelihoods agree.
    k = model.noise_dim
    variances = np.linspace(0.5, 1.5, k)
    fixed = structural_model(
        trend=trend, seasonal_period=period, transition_cov=torch.diag(torch.tensor(variances, dtype=DT)),
        observation_cov=0.7, initial_mean=0.0, initial_cov=2.0,
    )
    form = fixed.state_space_form(torch.tensor(y, dtype=DT).unsqueeze(-1))
    reference.ssm.initialize_known(np.zeros(model.state_dim), 2.0 * np.eye(model.state_dim))
    reference.loglikelihood_burn = 0
    llf = reference.loglike(np.concatenate([[0.7], variances]))
    ours = float(kalman_filter(form.params, form.observations).log_likelihood)
    assert abs(ours - llf) <= 1e-6 * abs(llf)


def test_builders_shapes():
    assert local_level(initial_mean=0.0, initial_cov=1.0).state_dim == 1
    assert local_linear_trend().state_dim == 2
    assert seasonal(12).state_dim == 12
    with pytest.raises(ValueError, match="seasonal_period"):
        seasonal(1)


def test_time_varying_and_control_arguments():
    steps = 10
    f = 0.9 * eye(2).expand(steps, 2, 2)
    model = LinearGaussianSSM(f, torch.ones(1, 2, dtype=DT), eye(2), eye(1), torch.zeros(2, dtype=DT), eye(2), control_matrix=torch.ones(2, 1, dtype=DT))
    u = torch.randn(steps, 1, dtype=DT)
    form = model.state_space_form(torch.randn(steps, 1, dtype=DT), u)
    assert form.params.transition_matrix.shape == (steps, 2, 2)
    assert torch.allclose(form.params.transition_offset, u.expand(steps, 2))
    assert form.params.observation_offset is None
    with pytest.raises(ValueError, match="transition_matrix"):
        model.state_space_form(torch.randn(steps + 1, 1, dtype=DT))  # too few time-varying matrices


# ------------------------------------------------------------------ bad input
def test_wrong_matrix_shapes_are_named():
    with pytest.raises(ValueError, match="state dimension"):
        LinearGaussianSSM(eye(2), torch.ones(1, 3, dtype=DT), eye(2), eye(1), torch.zeros(3, dtype=DT), eye(2))
    with pytest.raises(ValueError, match="transition_cov"):
        LinearGaussianSSM(eye(2), torch.ones(1, 2, dtype=DT), eye(3)[:2], eye(1), torch.zeros(2, dtype=DT), eye(2))
    with pytest.raises(ValueError, match="state dimension is unknown"):
        LinearGaussianSSM()
    with pytest.raises(ValueError, match="observation_cov"):
        LinearGaussianSSM(eye(2), torch.ones(1, 2, dtype=DT), eye(2), eye(2), torch.zeros(2, dtype=DT), eye(2)).state_space_form(torch.randn(5, 1, dtype=DT))


def test_non_psd_covariances_are_rejected():
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)  # eigenvalues 3 and -1
    with pytest.raises(ValueError, match="transition_cov must be positive semi-definite"):
        LinearGaussianSSM(eye(2), torch.ones(1, 2, dtype=DT), bad, eye(1), torch.zeros(2, dtype=DT), eye(2))
    with pytest.raises(ValueError, match="initial_cov must be symmetric"):
        LinearGaussianSSM(eye(2), torch.ones(1, 2, dtype=DT), eye(2), eye(1), torch.zeros(2, dtype=DT), torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DT))
    with pytest.raises(ValueError, match="observation_cov"):
        local_level(observation_cov=-1.0)


def test_nan_outside_the_missing_data_convention_is_rejected():
    nan_matrix = eye(2).clone()
    nan_matrix[0, 1] = float("nan")
    with pytest.raises(ValueError, match="transition_matrix contains NaN"):
        LinearGaussianSSM(nan_matrix, torch.ones(1, 2, dtype=DT), eye(2), eye(1), torch.zeros(2, dtype=DT), eye(2))
    model = local_level(initial_mean=0.0, initial_cov=1.0)
    with pytest.raises(ValueError, match="controls"):
        model.state_space_form(torch.randn(4, 1, dtype=DT), torch.full((4, 1), float("nan"), dtype=DT))


def test_bad_argument_types():
    with pytest.raises(TypeError, match="transition_cov"):
        LinearGaussianSSM(eye(1), eye(1), "big", None, None, None)
    with pytest.raises(ValueError, match="diagonal"):
        LinearGaussianSSM(diagonal(), eye(1), None, None, None, None, state_dim=1)
    with pytest.raises(TypeError, match="y must be"):
        local_level(initial_mean=0.0, initial_cov=1.0)([1.0, 2.0])
