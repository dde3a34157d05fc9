"""The functional Kalman core: exact log-likelihoods against statsmodels, pykalman and a brute-force joint
Gaussian; missing data; batches; time-varying matrices and controls; the parallel scan; gradients; sampling.

All comparisons run in float64. statsmodels uses a known (fixed) initialisation with no burn-in, which is
the same model as ours (``x_0 ~ N(initial_mean, initial_cov)`` at the first observation).
"""

import math

import numpy as np
import pytest
import torch

from bmm_ppl.inference.kalman import (
    associative_scan,
    kalman_filter,
    log_likelihood,
    parallel_kalman_filter,
    parallel_rts_smoother,
    rts_smoother,
)
from bmm_ppl.inference.kalman.latents import SmoothedStates
from bmm_ppl.models.state_space import LinearGaussianParams

DT = torch.float64


def random_params(n=4, p=2, steps=None, seed=0, batch=(), controls=False):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731

    def spd(m, lead=()):
        a = randn(*lead, m, m)
        return a @ a.mT / m + 0.2 * torch.eye(m, dtype=DT)

    lead = () if steps is None else (steps,)
    a = randn(*lead, n, n)
    f = 0.95 * a / torch.linalg.matrix_norm(a, 2, keepdim=True)
    params = LinearGaussianParams(
        f, randn(*lead, p, n), spd(n, lead), spd(p, lead), randn(n), spd(n),
    )
    return params


def statsmodels_model(params, y, transition_offset=None, observation_offset=None):
    sm = pytest.importorskip("statsmodels.tsa.statespace.mlemodel")
    n = params.state_dim
    model = sm.MLEModel(y.numpy(), k_states=n)
    tv = lambda m: m.permute(1, 2, 0).numpy() if m.dim() == 3 else m.numpy()  # noqa: E731
    model["design"] = tv(params.observation_matrix)
    model["obs_cov"] = tv(params.observation_cov)
    model["transition"] = tv(params.transition_matrix)
    model["selection"] = np.eye(n)
    model["state_cov"] = tv(params.transition_cov)
    if transition_offset is not None:
        model["state_intercept"] = transition_offset.T.numpy()
    if observation_offset is not None:
        model["obs_intercept"] = observation_offset.T.numpy()
    model.ssm.initialize_known(params.initial_mean.numpy(), params.initial_cov.numpy())
    model.loglikelihood_burn = 0
    return model


def joint_gaussian_log_likelihood(params, y):
    """Brute force: the observations are jointly Gaussian; build their T*p covariance and score y."""
    steps, p = y.shape
    n = params.state_dim
    at = lambda m, t: m[t] if m.dim() == 3 else m  # noqa: E731
    means, covs = [params.initial_mean], [params.initial_cov]
    # Cov(x_s, x_t) for s <= t is Cov(x_s) Phi(t, s)^T, Phi the product of transitions.
    for t in range(1, steps):
        f = at(params.transition_matrix, t - 1)
        means.append(f @ means[-1])
        covs.append(f @ covs[-1] @ f.T + at(params.transition_cov, t - 1))
    big = torch.zeros(steps * p, steps * p, dtype=DT)
    for s in range(steps):
        phi = torch.eye(n, dtype=DT)
        for t in range(s, steps):
            if t > s:
                phi = at(params.transition_matrix, t - 1) @ phi
            cross = at(params.observation_matrix, t) @ phi @ covs[s] @ at(params.observation_matrix, s).T
            big[t * p : (t + 1) * p, s * p : (s + 1) * p] = cross
            big[s * p : (s + 1) * p, t * p : (t + 1) * p] = cross.T
    for t in range(steps):
        big[t * p : (t + 1) * p, t * p : (t + 1) * p] += at(params.observation_cov, t)
    mean = torch.cat([at(params.observation_matrix, t) @ means[t] for t in range(steps)])
    flat = y.reshape(-1)
    keep = ~torch.isnan(flat)
    dist = torch.distributions.MultivariateNormal(mean[keep], big[keep][:, keep])
    return dist.log_prob(flat[keep])


# --------------------------------------------------------------- references
def test_log_likelihood_and_moments_equal_statsmodels():
    params = random_params()
    y = torch.randn(60, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    ours = kalman_filter(params, y)
    smoothed = rts_smoother(params, ours)
    reference = statsmodels_model(params, y).smooth(np.array([]))
    assert abs(float(ours.log_likelihood) - reference.llf) <= 1e-6 * abs(reference.llf)
    np.testing.assert_allclose(ours.filtered_means.numpy(), reference.filtered_state.T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.filtered_covs.numpy(), reference.filtered_state_cov.transpose(2, 0, 1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(smoothed.smoothed_means.numpy(), reference.smoothed_state.T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(smoothed.smoothed_covs.numpy(), reference.smoothed_state_cov.transpose(2, 0, 1), rtol=1e-6, atol=1e-8)


def test_time_varying_matrices_and_controls_equal_statsmodels():
    steps = 30
    params = random_params(steps=steps, seed=3)
    g = torch.Generator().manual_seed(4)
    c = torch.randn(steps, 4, dtype=DT, generator=g)
    d = torch.randn(steps, 2, dtype=DT, generator=g)
    params = LinearGaussianParams(*list(params.__dict__.values())[:6], transition_offset=c, observation_offset=d)
    y = torch.randn(steps, 2, dtype=DT, generator=g)
    reference = statsmodels_model(params, y, c, d).loglike(np.array([]))
    for run in (kalman_filter, parallel_kalman_filter):
        assert abs(float(run(params, y).log_likelihood) - reference) <= 1e-6 * abs(reference)


def test_missing_entries_equal_statsmodels_and_brute_force():
    params = random_params(seed=5)
    y = torch.randn(25, 2, dtype=DT, generator=torch.Generator().manual_seed(6))
    y[3, 0] = y[7] = y[8, 1] = y[20] = float("nan")
    ours = float(kalman_filter(params, y).log_likelihood)
    reference = statsmodels_model(params, y).loglike(np.array([]))
    assert abs(ours - reference) <= 1e-6 * abs(reference)
    assert abs(ours - float(joint_gaussian_log_likelihood(params, y))) <= 1e-8 * abs(ours)
    assert abs(float(parallel_kalman_filter(params, y).log_likelihood) - ours) <= 1e-9 * abs(ours)


def test_equals_brute_force_joint_gaussian_with_time_varying_matrices():
    params = random_params(n=3, p=2, steps=12, seed=7)
    y = torch.randn(12, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(kalman_filter(params, y).log_likelihood, joint_gaussian_log_likelihood(params, y), rtol=1e-10)


def test_equals_pykalman():
    pykalman = pytest.importorskip("pykalman")
    params = random_params(seed=9)
    y = torch.randn(50, 2, dtype=DT, generator=torch.Generator().manual_seed(10))
    kf = pykalman.KalmanFilter(
        transition_matrices=params.transition_matrix.numpy(),
        observation_matrices=params.observation_matrix.numpy(),
        transition_covariance=params.transition_cov.numpy(),
        observation_covariance=params.observation_cov.numpy(),
        initial_state_mean=params.initial_mean.numpy(),
        initial_state_covariance=params.initial_cov.numpy(),
    )
    reference = kf.loglikelihood(y.numpy())
    assert abs(float(kalman_filter(params, y).log_likelihood) - reference) <= 1e-6 * abs(reference)
    smoothed_means, _ = kf.smooth(y.numpy())
    ours = rts_smoother(params, kalman_filter(params, y)).smoothed_means
    np.testing.assert_allclose(ours.numpy(), smoothed_means, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------ batch, scan
def test_batch_equals_series_one_at_a_time():
    params = random_params(seed=11)
    y = torch.randn(3, 20, 2, dtype=DT, generator=torch.Generator().manual_seed(12))
    y[1, 4, 0] = float("nan")
    batched = kalman_filter(params, y)
    for b in range(3):
        single = kalman_filter(params, y[b])
        assert torch.allclose(batched.log_likelihood[b], single.log_likelihood, rtol=1e-12)
        assert torch.allclose(batched.filtered_covs[b], single.filtered_covs, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 7, 33])
def test_parallel_scan_equals_sequential(steps):
    params = random_params(seed=13)
    y = torch.randn(2, steps, 2, dtype=DT, generator=torch.Generator().manual_seed(14))
    y[0, 0, 1] = float("nan")
    sequential, parallel = kalman_filter(params, y), parallel_kalman_filter(params, y)
    for name in ("log_likelihood", "filtered_means", "filtered_covs", "predicted_means", "predicted_covs"):
        assert torch.allclose(getattr(sequential, name), getattr(parallel, name), rtol=1e-9, atol=1e-10), name
    a, b = rts_smoother(params, sequential), parallel_rts_smoother(params, sequential)
    assert torch.allclose(a.smoothed_means, b.smoothed_means, atol=1e-10)
    assert torch.allclose(a.smoothed_covs, b.smoothed_covs, atol=1e-10)


def test_associative_scan_is_a_prefix_sum():
    values = torch.arange(1.0, 12.0, dtype=DT)
    assert torch.equal(associative_scan(lambda a, b: (a[0] + b[0],), (values,))[0], values.cumsum(0))
    suffix = associative_scan(lambda a, b: (a[0] + b[0],), (values,), reverse=True)[0]
    assert torch.equal(suffix, values.flip(0).cumsum(0).flip(0))


# --------------------------------------------------------------- gradients
@pytest.mark.parametrize("run", [kalman_filter, parallel_kalman_filter])
def test_gradcheck_float64(run):
    params = random_params(n=2, p=2, seed=15)
    y = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(16))
    y[2, 1] = float("nan")
    leaves = [params.transition_matrix, params.observation_matrix, params.transition_cov, params.observation_cov]
    leaves = [t.clone().requires_grad_(True) for t in leaves]

    def function(f, h, q, r):
        sym = lambda m: 0.5 * (m + m.mT)  # noqa: E731  (perturb covariances symmetrically)
        p = LinearGaussianParams(f, h, sym(q), sym(r), params.initial_mean, params.initial_cov)
        return run(p, y).log_likelihood

    assert torch.autograd.gradcheck(function, leaves)


# ---------------------------------------------------------------- sampling
def test_smoothing_draws_match_smoothed_moments():
    params = random_params(n=2, p=1, seed=17)
    y = torch.randn(15, 1, dtype=DT, generator=torch.Generator().manual_seed(18))
    filtered = kalman_filter(params, y)
    smoothed = rts_smoother(params, filtered)
    torch.manual_seed(19)
    draws = SmoothedStates.from_results(filtered, smoothed).sample(20000)["states"]
    sd = smoothed.smoothed_covs.diagonal(dim1=-2, dim2=-1).sqrt()
    # |mean - truth| < 5 sd / sqrt(N): a 5-sigma bound on 30 independent-ish checks.
    assert ((draws.mean(0) - smoothed.smoothed_means).abs() < 5 * sd / math.sqrt(20000)).all()
    # Variance: sd of the sample variance of a Gaussian is sqrt(2/N) var.
    var = draws.var(0)
    assert ((var - sd**2).abs() < 5 * math.sqrt(2 / 20000) * sd**2).all()
    # Joint draws: the lag-one cross-covariance is P_{t+1|T} G_t^T.
    cross = ((draws[:, 1:] - draws[:, 1:].mean(0)).unsqueeze(-1) * (draws[:, :-1] - draws[:, :-1].mean(0)).unsqueeze(-2)).mean(0)
    expected = smoothed.smoothed_covs[1:] @ smoothed.gains.mT
    scale = sd[1:].unsqueeze(-1) * sd[:-1].unsqueeze(-2)
    assert ((cross - expected).abs() < 5 * scale * math.sqrt(2 / 20000)).all()


def test_float32_runs_and_agrees_with_float64():
    params = random_params(seed=20)
    y = torch.randn(40, 2, dtype=DT, generator=torch.Generator().manual_seed(21))
    single = LinearGaussianParams(*(t.float() for t in list(params.__dict__.values())[:6]))
    for run in (kalman_filter, parallel_kalman_filter):
        value = run(single, y.float()).log_likelihood
        assert value.dtype == torch.float32
        assert abs(float(value) - float(kalman_filter(params, y).log_likelihood)) < 1e-4 * abs(float(value))


def test_log_likelihood_function_switches_methods():
    params = random_params(seed=22)
    y = torch.randn(40, 2, dtype=DT, generator=torch.Generator().manual_seed(23))
    a = log_likelihood(params, y, "sequential")
    b = log_likelihood(params, y, "parallel")
    assert torch.allclose(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match="method"):
        log_likelihood(params, y, "diagonal")


# -------------------------------------------------------------- steady state
def test_steady_state_path_equals_sequential_filter():
    from bmm_ppl.inference.kalman import steady_state_log_likelihood

    params = random_params(seed=24)
    g = torch.Generator().manual_seed(25)
    steps = 600
    offsets = LinearGaussianParams(
        *list(params.__dict__.values())[:6],
        transition_offset=torch.randn(3, steps, 4, dtype=DT, generator=g),
        observation_offset=torch.randn(steps, 2, dtype=DT, generator=g),
    )
    y = torch.randn(3, steps, 2, dtype=DT, generator=g) + 5.0
    for p in (params, offsets):
        exact = kalman_filter(p, y).log_likelihood
        assert torch.allclose(steady_state_log_likelihood(p, y), exact, rtol=1e-10)
    assert torch.allclose(log_likelihood(params, y), kalman_filter(params, y).log_likelihood, rtol=1e-10)  # "auto"
    y[0, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="complete data"):
        log_likelihood(params, y, "steady-state")


def test_steady_state_gradcheck_float64():
    from bmm_ppl.inference.kalman import steady_state_log_likelihood

    params = random_params(n=2, p=1, seed=26)
    y = torch.randn(200, 1, dtype=DT, generator=torch.Generator().manual_seed(27))  # converges after ~50 steps
    leaves = [t.clone().requires_grad_(True) for t in (params.transition_matrix, params.observation_matrix)]

    def function(f, h):
        return steady_state_log_likelihood(LinearGaussianParams(f, h, *list(params.__dict__.values())[2:6]), y)

    assert torch.autograd.gradcheck(function, leaves)
