"""Kalman checks its own answers: vacuous series refused by name, variances running to 0 reported as a
boundary (as Exact reports alpha -> inf), convergence reported like every iterative engine, and an
evidence that is equivariant in the scale of the data. float64."""

import math

import numpy as np
import pytest
import torch

from bmm_ppl.inference import ConvergenceWarning, HyperparameterBoundaryError, HyperparameterBoundaryWarning, Kalman
from bmm_ppl.models.state_space import local_level

DT = torch.float64
T = 50
INITIAL_VAR = 10.0


def white_noise(seed=1):
    # Seed 1: the local-level MLE of the level variance on this white noise is 0 (about half of white-noise
    # series put it there); seeds 0, 2, 3 give small interior values instead.
    return torch.randn(T, 1, generator=torch.Generator().manual_seed(seed), dtype=DT)


def noisy_walk(seed=0):
    generator = torch.Generator().manual_seed(seed)
    walk = torch.randn(T, 1, generator=generator, dtype=DT).cumsum(0)
    return walk + torch.randn(T, 1, generator=generator, dtype=DT)


def level_model(initial_cov=INITIAL_VAR):
    return local_level(initial_mean=0.0, initial_cov=initial_cov)


def constant_level_log_evidence(y):
    """max over r of log N(y | 0, r I + P0 1 1^T): the local level with its level variance exactly 0."""
    optimize = pytest.importorskip("scipy.optimize")
    stats = pytest.importorskip("scipy.stats")
    values = y[:, 0].numpy()
    ones = np.ones((len(values), len(values)))

    def negative(log_r):
        cov = math.exp(log_r) * np.eye(len(values)) + INITIAL_VAR * ones
        return -stats.multivariate_normal(np.zeros(len(values)), cov).logpdf(values)

    found = optimize.minimize_scalar(negative, bounds=(-10, 10), method="bounded", options={"xatol": 1e-10})
    return -found.fun, math.exp(found.x)


# ------------------------------------------------------------------ vacuous series
def test_all_missing_series_is_refused_by_name():
    # Before: evidence 0.0 and converged=True.
    y = torch.full((20, 1), float("nan"), dtype=DT)
    with pytest.raises(ValueError, match="y is entirely missing"):
        Kalman(progress=False).fit(level_model(), y)


def test_batch_with_an_all_missing_series_is_refused_by_name():
    y = noisy_walk().expand(3, T, 1).clone()
    y[1] = float("nan")
    with pytest.raises(ValueError, match=r"y has series with no observed entry.*\[1\]"):
        Kalman(progress=False).fit(level_model(), y)


def test_zero_length_series_is_refused_by_name():
    with pytest.raises(ValueError, match="y has no time steps"):
        Kalman(progress=False).fit(level_model(), torch.zeros(0, 1, dtype=DT))


def test_partly_missing_series_still_fits():
    y = noisy_walk()
    y[::3] = float("nan")
    post = Kalman(progress=False, num_steps=0).fit(level_model(), y)
    assert math.isfinite(post.log_evidence.value)


# ----------------------------------------------------------------------- boundary
def test_level_variance_running_to_zero_raises_by_default():
    with pytest.raises(HyperparameterBoundaryError, match="transition_cov -> 0") as raised:
        Kalman(progress=False).fit(level_model(), white_noise())
    assert raised.value.boundary == {"transition_cov": "0"}


def test_clipped_boundary_fit_reports_the_constant_level_limit():
    y = white_noise()
    with pytest.warns(HyperparameterBoundaryWarning, match="on_boundary='clip'"):
        post = Kalman(progress=False, on_boundary="clip").fit(level_model(), y)
    d = post.diagnostics
    assert d["boundary"] == {"transition_cov": "0"}
    expected, noise_var = constant_level_log_evidence(y)
    # The fit stops at a level variance ~1e-12, where the evidence is the limit's to round-off.
    assert d["limit_log_evidence"] == pytest.approx(expected, abs=1e-6)
    assert post.log_evidence.value == pytest.approx(expected, abs=1e-6)
    assert float(post.hyperparameters["observation_cov"]) == pytest.approx(noise_var, rel=1e-4)


def test_interior_optimum_is_not_a_boundary_and_converges():
    y = white_noise(seed=0)  # a small but interior level variance (~9e-3)
    post = Kalman(progress=False).fit(level_model(), y)
    d = post.diagnostics
    assert d["boundary"] == {}
    assert d["converged"] is True and d["gradient_norm"] <= 1e-4 * T
    assert float(post.hyperparameters["transition_cov"]) > 1e-4
    assert d["num_iterations"] < d["max_iterations"]


# -------------------------------------------------------------------- convergence
def test_capped_lbfgs_warns_by_name_and_reports_its_numbers():
    with pytest.warns(ConvergenceWarning, match=r"raise num_steps \(now 2\)"):
        post = Kalman(progress=False, num_steps=2).fit(level_model(), noisy_walk())
    d = post.diagnostics
    assert d["converged"] is False and d["num_iterations"] == 2 == d["max_iterations"]
    assert d["gradient_norm"] > 1e-4 * T
    assert d["relative_change"] > 0


def test_gradient_norm_is_the_evidence_gradient_at_the_fit():
    # Recomputed independently: central differences of the exact evidence in the log-variances.
    y = noisy_walk()
    with pytest.warns(ConvergenceWarning):
        post = Kalman(progress=False, num_steps=3).fit(level_model(), y)
    q, r = (float(post.hyperparameters[name]) for name in ("transition_cov", "observation_cov"))

    def evidence(log_q, log_r):
        fixed = local_level(initial_mean=0.0, initial_cov=INITIAL_VAR, transition_cov=math.exp(log_q), observation_cov=math.exp(log_r))
        return Kalman(progress=False, num_steps=0).fit(fixed, y).log_evidence.value

    h = 1e-5
    dq = (evidence(math.log(q) + h, math.log(r)) - evidence(math.log(q) - h, math.log(r))) / (2 * h)
    dr = (evidence(math.log(q), math.log(r) + h) - evidence(math.log(q), math.log(r) - h)) / (2 * h)
    # The norm is over the unconstrained parameters: log q for the diagonal transition_cov, and for the
    # (full, Cholesky-parameterised) observation_cov the log of its Cholesky factor, log sqrt(r).
    assert post.diagnostics["gradient_norm"] == pytest.approx(math.hypot(dq, 2 * dr), rel=1e-4)


# ------------------------------------------------------------------------ scaling
def test_evidence_is_equivariant_in_the_scale_of_the_data():
    # Defaults are scaled to the data, so a fit of c * y (with the fixed prior variance scaled alike) is
    # the fit of y: log p(c y) = log p(y) - T log c, variances times c^2.
    y = noisy_walk()
    base = Kalman(progress=False).fit(level_model(), y)
    scaled = Kalman(progress=False).fit(level_model(INITIAL_VAR * 1e12), y * 1e6)
    assert scaled.log_evidence.value == pytest.approx(base.log_evidence.value - T * math.log(1e6), rel=1e-9)
    for name in ("transition_cov", "observation_cov"):
        assert float(scaled.hyperparameters[name]) == pytest.approx(1e12 * float(base.hyperparameters[name]), rel=1e-6)
    assert scaled.diagnostics["converged"] and base.diagnostics["converged"]


@pytest.mark.gpu
def test_boundary_check_runs_on_the_gpu():
    with pytest.warns(HyperparameterBoundaryWarning):
        post = Kalman(progress=False, on_boundary="clip").fit(level_model(), white_noise().cuda())
    assert post.diagnostics["boundary"] == {"transition_cov": "0"}
    assert post.hyperparameters["transition_cov"].device.type == "cuda"
