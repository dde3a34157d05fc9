"""The ``Kalman`` engine: the Nile type-II fit against statsmodels' MLE, EM, the Posterior it returns,
device discipline and bad inputs. float64 unless a test says otherwise."""

import numpy as np
import pytest
import torch

from bmm_ppl.inference import ConvergenceWarning, DivergenceError, HyperparameterBoundaryWarning, Posterior, UnsupportedModelError
from bmm_ppl.inference.kalman import Kalman, SmoothedStates
from bmm_ppl.models import BayesianLinearRegression
from bmm_ppl.models.state_space import LinearGaussianSSM, local_level, local_linear_trend
from tests.conftest import default_device

DT = torch.float64
NILE_INITIAL_MEAN, NILE_INITIAL_VAR = 1120.0, 1e5
# Short fits below run a few steps on purpose (they test devices, dtypes, the param store).
FEW_STEPS = pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ConvergenceWarning")


def noisy_walk(steps, seed=0, dtype=DT):
    """A random walk seen through unit noise: both local-level variances have interior optima (a pure
    walk drives the observation variance to 0, which Kalman reports as a boundary)."""
    generator = torch.Generator().manual_seed(seed)
    walk = torch.randn(steps, 1, generator=generator, dtype=dtype).cumsum(0)
    return walk + torch.randn(steps, 1, generator=generator, dtype=dtype)


@pytest.fixture(scope="module")
def nile():
    datasets = pytest.importorskip("statsmodels.datasets")
    return torch.tensor(datasets.nile.load_pandas().data["volume"].to_numpy(), dtype=DT).unsqueeze(-1)


@pytest.fixture(scope="module")
def statsmodels_nile_mle(nile):
    sm = pytest.importorskip("statsmodels.api")
    optimize = pytest.importorskip("scipy.optimize")
    model = sm.tsa.UnobservedComponents(nile[:, 0].numpy(), "local level")
    model.ssm.initialize_known(np.array([NILE_INITIAL_MEAN]), np.array([[NILE_INITIAL_VAR]]))
    model.loglikelihood_burn = 0  # score every observation, as our exact evidence does
    # statsmodels' own likelihood maximised by an independent optimiser (Nelder-Mead in log-variances).
    found = optimize.minimize(
        lambda log_var: -model.loglike(np.exp(log_var)), np.log([10000.0, 1000.0]), method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 5000},
    )
    assert found.success
    observation_var, level_var = np.exp(found.x)
    return {"observation_var": observation_var, "level_var": level_var, "llf": -found.fun, "model": model}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The filters run many tiny batched linear-algebra calls; on a shared 2-core CPU, intra-op threads
    # only add contention, so these tests run single-threaded (restored afterwards).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def nile_model():
    return local_level(initial_mean=NILE_INITIAL_MEAN, initial_cov=NILE_INITIAL_VAR)


def test_nile_type2_matches_statsmodels_mle(nile, statsmodels_nile_mle):
    post = Kalman(progress=False).fit(nile_model(), nile)
    ref = statsmodels_nile_mle
    # The optimum is flat along the level variance: agree to 1e-9 in the log-likelihood and 1e-4 relative in
    # the variances (both optimisers stop on gradient tolerances, ~1e-5 apart in the level variance).
    assert post.log_evidence.method.value == "exact"
    assert abs(post.log_evidence.value - ref["llf"]) <= 1e-9 * abs(ref["llf"])
    assert post.hyperparameters["observation_cov"].shape == (1, 1)
    assert post.hyperparameters["transition_cov"].shape == (1,)  # a diagonal covariance: its variances
    assert abs(float(post.hyperparameters["observation_cov"][0, 0]) / ref["observation_var"] - 1) < 1e-4
    assert abs(float(post.hyperparameters["transition_cov"][0]) / ref["level_var"] - 1) < 1e-4
    assert post.diagnostics["converged"]
    # statsmodels' log-likelihood at our optimum equals our evidence there.
    ours = [float(post.hyperparameters["observation_cov"][0, 0]), float(post.hyperparameters["transition_cov"][0])]
    assert abs(ref["model"].loglike(np.array(ours)) - post.log_evidence.value) <= 1e-10 * abs(ref["llf"])


def test_em_increases_the_evidence_and_approaches_the_mle(nile, statsmodels_nile_mle):
    with pytest.warns(ConvergenceWarning, match="EM"):  # 60 iterations: close, not converged
        post = Kalman(learning="em", num_steps=60, progress=False).fit(nile_model(), nile)
    assert post.diagnostics["converged"] is False and post.diagnostics["num_iterations"] == 60
    trace = post.loss_trace  # negative log evidence per EM iteration
    assert (trace[1:] <= trace[:-1] + 1e-9).all(), "EM must never lower the evidence"
    # EM is slow near the optimum; after 60 iterations it is within 0.05 nats of the MLE.
    assert post.log_evidence.value > statsmodels_nile_mle["llf"] - 0.05
    assert post.log_evidence.value <= statsmodels_nile_mle["llf"] + 1e-9


def test_adam_learns_too(nile, statsmodels_nile_mle):
    with pytest.warns(ConvergenceWarning, match="learning='lbfgs'"):
        post = Kalman(learning="adam", num_steps=60, lr=0.1, progress=False).fit(nile_model(), nile)
    assert post.loss_trace[-1] < post.loss_trace[0]


def test_posterior_exposes_smoothed_states_and_round_trips(nile, tmp_path):
    post = Kalman(progress=False, num_steps=0).fit(
        local_level(initial_mean=NILE_INITIAL_MEAN, initial_cov=NILE_INITIAL_VAR, transition_cov=torch.eye(1, dtype=DT) * 1469.0, observation_cov=15099.0),
        nile,
    )
    states = post.latent_distribution
    assert isinstance(states, SmoothedStates)
    assert states.smoothed_means.shape == (100, 1) and states.filtered_covs.shape == (100, 1, 1)
    # The smoothed variance is never above the filtered one.
    assert (states.smoothed_covs <= states.filtered_covs + 1e-9).all()
    assert post.samples(7)["states"].shape == (7, 100, 1)
    # Posterior predictive: states from the smoothing posterior, observations redrawn (y left out).
    predictive = post.predict(num_steps=100, num_samples=5)
    assert predictive["obs"].shape == (5, 100, 1)
    assert not torch.isnan(predictive["obs"]).any()
    assert (predictive["obs"] - nile).abs().mean() > 10.0
    post.save(tmp_path / "nile.pt")
    loaded = Posterior.load(tmp_path / "nile.pt")
    assert isinstance(loaded.latent_distribution, SmoothedStates)
    assert torch.equal(loaded.latent_distribution.smoothed_means, states.smoothed_means)
    assert loaded.log_evidence == post.log_evidence


def test_batch_evidence_is_the_sum_over_series():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 25, 1, dtype=DT, generator=g).cumsum(1)
    y[1, 3] = float("nan")
    model = local_level(initial_mean=0.0, initial_cov=4.0, transition_cov=torch.eye(1, dtype=DT), observation_cov=0.5)
    post = Kalman(progress=False).fit(model, y)
    singles = [Kalman(progress=False).fit(model, y[b]).log_evidence.value for b in range(3)]
    assert abs(post.log_evidence.value - sum(singles)) < 1e-9 * abs(sum(singles))
    assert post.samples(4)["states"].shape == (4, 3, 25, 1)
    assert post.predict(num_samples=2)["obs"].shape == (2, 3, 25, 1)


def test_learned_full_matrices_and_controls_improve_the_evidence():
    g = torch.Generator().manual_seed(1)
    steps = 80
    u = torch.randn(steps, 1, dtype=DT, generator=g)
    x = torch.zeros(steps, 2, dtype=DT)
    for t in range(1, steps):
        x[t] = 0.8 * x[t - 1] + torch.tensor([1.0, -0.5], dtype=DT) * u[t - 1] + 0.3 * torch.randn(2, dtype=DT, generator=g)
    y = x @ torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=DT).T + 0.2 * torch.randn(steps, 2, dtype=DT, generator=g)
    model = LinearGaussianSSM(
        0.8 * torch.eye(2, dtype=DT), torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=DT), None, None,
        torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT),
    )
    post = Kalman(progress=False, num_steps=60).fit(model, y, u)
    assert sorted(post.hyperparameters) == ["control_matrix", "observation_cov", "transition_cov"]
    assert torch.allclose(post.hyperparameters["control_matrix"][:, 0], torch.tensor([1.0, -0.5], dtype=DT), atol=0.15)
    # Learned covariances are positive definite.
    assert (torch.linalg.eigvalsh(post.hyperparameters["transition_cov"]) > 0).all()
    assert post.loss_trace[-1] < post.loss_trace[0]


def test_local_linear_trend_evidence_compares_with_local_level(nile):
    level = Kalman(progress=False).fit(nile_model(), nile)
    # The Nile has no slope: its variance runs to 0, reported as a boundary (statsmodels' MLE is 0 too).
    with pytest.warns(HyperparameterBoundaryWarning, match=r"transition_cov\[1\] -> 0"):
        trend = Kalman(progress=False, num_steps=60, on_boundary="clip").fit(
            local_linear_trend(initial_mean=torch.tensor([NILE_INITIAL_MEAN, 0.0], dtype=DT), initial_cov=NILE_INITIAL_VAR), nile
        )
    assert trend.hyperparameters["transition_cov"].shape == (2,)
    assert trend.diagnostics["boundary"] == {"transition_cov[1]": "0"}
    # Both are exact evidences of type-II fits; a slope adds little to the Nile (it is nearly level).
    assert abs(trend.log_evidence.value - level.log_evidence.value) < 10


# ----------------------------------------------------------- device discipline
@FEW_STEPS
@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("learning", ["lbfgs", "em"])
def test_device_discipline_meta_default(method, learning):
    y = noisy_walk(40)
    model = local_level(initial_mean=0.0, initial_cov=10.0)
    with default_device("meta"):
        post = Kalman(progress=False, method=method, learning=learning, num_steps=5).fit(model, y)
        assert post.samples(3)["states"].device.type == "cpu"
    assert post.latent_distribution.smoothed_means.device.type == "cpu"
    assert all(v.device.type == "cpu" for v in post.hyperparameters.values())


@FEW_STEPS
def test_float32_fit():
    y = noisy_walk(40, dtype=torch.float32)
    post = Kalman(progress=False, num_steps=10).fit(local_level(initial_mean=0.0, initial_cov=10.0, dtype=torch.float32), y)
    assert post.latent_distribution.smoothed_means.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in post.hyperparameters.values())


@pytest.mark.gpu
def test_fit_on_gpu():
    y = torch.randn(64, 1, dtype=DT, device="cuda").cumsum(0)
    post = Kalman(progress=False, num_steps=20).fit(local_level(initial_mean=0.0, initial_cov=10.0), y)
    assert post.latent_distribution.smoothed_means.device.type == "cuda"
    assert post.samples(3)["states"].device.type == "cuda"


# ------------------------------------------------------------------ bad input
def test_rejects_models_without_state_space_form():
    def plain_model(y):
        return y

    with pytest.raises(UnsupportedModelError, match="state_space_form"):
        Kalman(progress=False).fit(plain_model, torch.randn(10, 1, dtype=DT))


def test_linear_regression_as_a_constant_state_equals_exact():
    from bmm_ppl.inference import Exact
    from bmm_ppl.models import polynomial_features

    x = torch.linspace(-1, 1, 40, dtype=DT)
    y = torch.sin(3 * x) + 0.1 * torch.cos(17 * x)
    model = BayesianLinearRegression(polynomial_features(3), alpha=0.5, beta=50.0)
    ours, exact = Kalman(progress=False).fit(model, x, y), Exact().fit(model, x, y)
    assert abs(ours.log_evidence.value - exact.log_evidence.value) < 1e-9 * abs(exact.log_evidence.value)
    assert torch.allclose(ours.latent_distribution.loc, exact.latent_distribution.loc, atol=1e-9)
    assert torch.allclose(ours.latent_distribution.covariance_matrix, exact.latent_distribution.covariance_matrix, atol=1e-10)
    with pytest.raises(UnsupportedModelError, match="fixed alpha and beta"):
        Kalman(progress=False).fit(BayesianLinearRegression(polynomial_features(3)), x, y)


def test_rejects_hyperpriors():
    import pyro.distributions as dist

    model = local_level(initial_mean=0.0, initial_cov=1.0, observation_cov=dist.InverseGamma(torch.tensor(2.0, dtype=DT), torch.tensor(1.0, dtype=DT)))
    with pytest.raises(UnsupportedModelError, match="observation_cov"):
        Kalman(progress=False).fit(model, torch.randn(10, 1, dtype=DT))


def test_em_refuses_missing_data():
    y = torch.randn(20, 1, dtype=DT)
    y[3] = float("nan")
    with pytest.raises(UnsupportedModelError, match="missing"):
        Kalman(learning="em", progress=False).fit(local_level(initial_mean=0.0, initial_cov=1.0), y)


@pytest.mark.parametrize(
    "option, value, match",
    [("learning", "newton", "learning"), ("method", "fft", "method"), ("num_steps", -1, "num_steps")],
)
def test_rejects_bad_options(option, value, match):
    with pytest.raises(ValueError, match=match):
        Kalman(**{option: value})


def test_bad_data_is_named():
    model = local_level(initial_mean=0.0, initial_cov=1.0)
    with pytest.raises(ValueError, match="y must be"):
        Kalman(progress=False).fit(model, torch.randn(10, dtype=DT))
    with pytest.raises(ValueError, match="infinite"):
        Kalman(progress=False).fit(model, torch.tensor([[1.0], [float("inf")]], dtype=DT))
    with pytest.raises(ValueError, match="controls"):
        Kalman(progress=False).fit(model, torch.randn(10, 1, dtype=DT), torch.full((10, 1), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="controls"):
        Kalman(progress=False).fit(model, torch.randn(10, 1, dtype=DT), torch.randn(9, 1, dtype=DT))
    with pytest.raises(ValueError, match="observation_matrix"):
        Kalman(progress=False).fit(model, torch.randn(10, 2, dtype=DT))  # a 1-output model given 2 outputs


def test_divergence_is_reported():
    y = torch.randn(30, 1, dtype=DT)
    y[10] = 1e200  # squares overflow: the evidence is not finite
    with pytest.raises(DivergenceError):
        Kalman(progress=False, num_steps=0).fit(local_level(initial_mean=0.0, initial_cov=1.0, transition_cov=1.0, observation_cov=1.0), y)


@FEW_STEPS
def test_fit_leaves_the_global_param_store_alone():
    import pyro

    pyro.param("observation_cov", torch.ones(3, 3))
    post = Kalman(progress=False, num_steps=5).fit(local_level(initial_mean=0.0, initial_cov=1.0), noisy_walk(30))
    assert list(pyro.get_param_store().keys()) == ["observation_cov"]
    assert pyro.param("observation_cov").shape == (3, 3)
    assert post.hyperparameters["observation_cov"].shape == (1, 1)
