"""SVI against the exact oracle, IWAE, minibatching, divergence, bad inputs, devices and persistence."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from bmm_ppl.inference import DivergenceError, Exact, Posterior
from bmm_ppl.inference.svi.guides import GuideLatents, StoredDrawLatents, resolve_guide
from bmm_ppl.inference.svi.iwae import iwae_bound
from bmm_ppl.inference.svi.engine import SVI
from bmm_ppl.inference.program.minibatch import ScaleInPlate
from bmm_ppl.inference.svi import core as svi_core
from bmm_ppl.models import BayesianLinearRegression, polynomial_features


def sine_data(dtype=torch.float64, n=40):
    """40 noisy points of sin(pi x) on [-1, 1]: the type-II optimum of a cubic fit is interior."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, n, dtype=dtype, device="cpu")
    y = torch.sin(math.pi * x) + 0.2 * torch.randn(n, generator=g, dtype=dtype, device="cpu")
    return x, y


CUBIC = BayesianLinearRegression(polynomial_features(3))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These fits are thousands of tiny steps: intra-op threads only add contention on a shared CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def exact_cubic():
    x, y = sine_data()
    return Exact().fit(CUBIC, x, y)


@pytest.fixture(scope="module")
def svi_cubic():
    pyro.set_rng_seed(1)
    x, y = sine_data()
    return SVI("mvn", progress=False).fit(CUBIC, x, y)  # the default optimiser settings


def test_full_rank_svi_reaches_exact_type2_evidence(svi_cubic, exact_cubic):
    # The full-rank guide contains the exact Gaussian posterior, so the maximal ELBO equals the maximal
    # evidence; what is left is optimiser noise (measured 0.005-0.009 nats over seeds 0-2) and the
    # Monte-Carlo error of the final estimate (stderr ~0.002). The bar: 0.05 nats, 5%.
    evidence = svi_cubic.log_evidence
    assert evidence.method.value == "elbo"
    assert evidence.stderr < 0.01
    gap = exact_cubic.log_evidence.value - evidence.value
    assert -3 * evidence.stderr < gap < 0.05
    for name in ("alpha", "beta"):
        ratio = float(svi_cubic.hyperparameters[name] / exact_cubic.hyperparameters[name])
        assert abs(ratio - 1) < 0.05, (name, ratio)
    # the default route for this small full-batch model: L-BFGS on the sample-average ELBO, to convergence
    assert svi_cubic.diagnostics["optimizer"] == "lbfgs" and svi_cubic.diagnostics["converged"]
    assert svi_cubic.loss_trace.shape == (svi_cubic.diagnostics["evaluations"],)
    # The posterior itself: mean and covariance of w against the exact Gaussian.
    draws = svi_cubic.samples(4000)["w"]
    exact_q = exact_cubic.latent_distribution
    sd = exact_q.covariance_matrix.diagonal().sqrt()
    # |mean - truth| < 4 sd / sqrt(4000) + optimiser error (0.05 sd)
    assert ((draws.mean(0) - exact_q.loc).abs() / sd < 4 / math.sqrt(4000) + 0.05).all()


def test_iwae_lies_between_elbo_and_exact(exact_cubic):
    # A mean-field guide on the correlated cubic posterior leaves a clear ELBO gap; IWAE with K=200
    # must close part of it and stay below the exact evidence (each up to 3 Monte-Carlo stderrs).
    x, y = sine_data()
    post = SVI("normal", num_steps=800, progress=False).fit(CUBIC, x, y)
    elbo = post.log_evidence
    iwae = iwae_bound(post, num_particles=200, num_estimates=20)
    exact = exact_cubic.log_evidence.value
    assert iwae.method.value == "iwae" and iwae.is_lower_bound
    assert exact - elbo.value > 0.3  # the gap this test is about exists
    assert iwae.value > elbo.value + 3 * (elbo.stderr + iwae.stderr)
    assert iwae.value < exact + 3 * iwae.stderr


def test_minibatch_scaling_is_unbiased():
    # With a point-mass guide the -ELBO is deterministic, so an epoch of minibatch losses averages to
    # the full-data loss exactly (up to round-off).
    x, y = sine_data()
    w = torch.tensor([0.1, 2.0, -0.3, -1.0], dtype=torch.float64)

    def guide(x, y=None):
        pyro.sample("w", dist.Delta(w, event_dim=1))

    model = BayesianLinearRegression(polynomial_features(3), alpha=1.0, beta=4.0)
    full = svi_core.elbo_loss(model, guide, (x, y), {}, 1, 1)
    scaled = ScaleInPlate("data", 40 / 10)(model)
    order = torch.randperm(40)
    batches = [svi_core.elbo_loss(scaled, guide, (x[i], y[i]), {}, 1, 1) for i in order.split(10)]
    assert torch.allclose(torch.stack(batches).mean(), full, rtol=1e-12)


def test_minibatch_fit_is_scaled(exact_cubic):
    # Unscaled minibatches would underweight the likelihood 4-fold: beta would land far from the exact
    # optimum and the training loss far from the full-data ELBO.
    x, y = sine_data()
    post = SVI("mvn", num_steps=1000, batch_size=10, progress=False).fit(CUBIC, x, y)
    beta_ratio = float(post.hyperparameters["beta"] / exact_cubic.hyperparameters["beta"])
    assert abs(beta_ratio - 1) < 0.25
    assert abs(post.loss_trace[-500:].mean() + post.log_evidence.value) < 3.0


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ConvergenceWarning")  # 100 steps: guide kinds, not convergence
def test_guides_by_name_class_instance_and_function():
    x, y = sine_data()
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=None)

    def my_guide(x, y=None):
        loc = pyro.param("my_loc", x.new_zeros(2))
        pyro.sample("w", dist.Normal(loc, 0.1).to_event(1))

    for guide in ("normal", "mvn", "lowrank", "delta", AutoNormal, AutoMultivariateNormal(model), my_guide):
        post = SVI(guide, num_steps=100, evidence_particles=200, progress=False).fit(model, x, y)
        assert post.samples(7)["w"].shape == (7, 2)
        assert sorted(post.hyperparameters) == ["beta"]  # guide params are not hyperparameters
        if guide == "delta":
            assert post.log_evidence is None
        else:
            assert post.log_evidence.method.value == "elbo"
    with pytest.raises(ValueError, match="guide='gaussian' is not one of"):
        resolve_guide("gaussian", model)
    with pytest.raises(TypeError, match="guide must be"):
        resolve_guide(3, model)


def test_param_store_is_isolated():
    x, y = sine_data()
    pyro.param("alpha", torch.tensor(123.0))
    post = SVI("normal", num_steps=100, evidence_particles=100, progress=False).fit(CUBIC, x, y)
    assert float(pyro.param("alpha").detach()) == 123.0
    assert set(pyro.get_param_store().keys()) == {"alpha"}
    assert float(post.hyperparameters["alpha"]) != 123.0
    # Sampling later runs the guide in the fit's own store, whatever the global one holds.
    pyro.param("AutoNormal.locs.w", torch.full((4,), 1e6, dtype=torch.float64))
    assert post.samples(100)["w"].abs().max() < 1e3


def test_nan_loss_raises_divergence_naming_the_step():
    x, y = sine_data()
    calls = [0]

    def model(x, y):
        calls[0] += 1
        w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
        bad = torch.nan if calls[0] > 150 else 0.0
        pyro.factor("poison", w * 0 + bad)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)

    # Pyro's validation would reject the NaN factor itself; switch it off to see the engine's own check.
    # The model has a Python side effect (a call counter), so it must run eagerly: a captured graph
    # replays the tensor operations of the one recorded call.
    with pyro.validation_enabled(False), pytest.raises(DivergenceError, match=r"diverged at step 1[0-9][0-9]"):
        SVI("normal", num_steps=500, optimizer="adam", jit=False, progress=False).fit(model, x, y)


def test_exploding_optimiser_raises_divergence():
    x, y = sine_data()
    with pytest.raises(DivergenceError, match="diverged"):
        SVI("normal", num_steps=300, lr=1e12, optimizer="sgd", progress=False).fit(CUBIC, x, y)


def test_bad_inputs_name_the_problem():
    x, y = sine_data()
    with pytest.raises(ValueError, match="NaN"):
        SVI(num_steps=10, progress=False).fit(CUBIC, x, torch.where(x > 0.5, torch.nan, y))
    with pytest.raises(ValueError, match="batch_size=50 is larger than the data"):
        SVI(num_steps=10, batch_size=50, progress=False).fit(CUBIC, x, y)
    with pytest.raises(ValueError, match="share it"):
        SVI(num_steps=10, batch_size=5, progress=False).fit(CUBIC, x, y[:30])
    with pytest.raises(ValueError, match="batch_size must be"):
        SVI(batch_size=0)
    with pytest.raises(ValueError, match="num_steps"):
        SVI(num_steps=0)
    with pytest.raises(ValueError, match="optimizer='adamx'"):
        SVI(optimizer="adamx")

    def partial_guide(x, y=None):
        pyro.sample("not_w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"does not sample the model's latent site\(s\) \['w'\]"):
        SVI(partial_guide, num_steps=10, progress=False).fit(CUBIC, x, y)


def test_save_and_load(tmp_path):
    x, y = sine_data()
    post = SVI("mvn", num_steps=300, evidence_particles=200, progress=False).fit(CUBIC, x, y)
    assert isinstance(post.latent_distribution, GuideLatents)
    path = tmp_path / "svi.pt"
    post.save(path)
    loaded = Posterior.load(path, model=CUBIC, args=(x, y))
    assert isinstance(loaded.latent_distribution, StoredDrawLatents)
    assert loaded.log_evidence == post.log_evidence
    assert loaded.engine == "SVI"
    for name, value in post.hyperparameters.items():
        assert torch.equal(loaded.hyperparameters[name], value)
    assert torch.equal(loaded.loss_trace, post.loss_trace)
    saved = post.latent_distribution.materialise().draws["w"]
    assert torch.allclose(loaded.samples(4000)["w"].mean(0), saved.mean(0))
    assert loaded.predict(x, num_samples=20)["obs"].shape == (20, 40)
    with pytest.raises(ValueError, match="needs a posterior fitted by SVI"):
        iwae_bound(loaded)


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ConvergenceWarning")  # 200 steps: dtypes, not convergence
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_dtypes(dtype):
    x, y = sine_data(dtype)
    post = SVI("normal", num_steps=200, evidence_particles=200, progress=False).fit(CUBIC, x, y)
    assert post.samples(5)["w"].dtype == dtype
    assert post.hyperparameters["beta"].dtype == dtype


def test_jit_matches_closed_form_evidence():
    # z ~ N(0, 1), x_i ~ N(z, 1): log p(x) in closed form; the full-rank guide is exact.
    g = torch.Generator().manual_seed(3)
    data = 0.7 + torch.randn(20, generator=g, dtype=torch.float64)

    def model(data):
        z = pyro.sample("z", dist.Normal(data.new_zeros(()), 1.0))
        with pyro.plate("data", 20):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    n = 20
    cov = torch.eye(n, dtype=torch.float64) + torch.ones(n, n, dtype=torch.float64)
    exact = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(data)
    post = SVI("mvn", num_steps=800, jit=True, progress=False).fit(model, data)
    assert post.diagnostics["jit"] == "graph"
    assert 0 <= float(exact) - post.log_evidence.value < 0.05


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ConvergenceWarning")  # 150 steps: graph against eager, not convergence
@pytest.mark.parametrize("batch_size", [None, 20])
def test_captured_gradients_follow_the_eager_run(batch_size):
    # Same seed, same random numbers: the captured loss-and-gradient graph retraces the eager run (the
    # type-II hyperparameters included) up to floating-point rounding.
    x, y = sine_data(torch.float64)
    runs = {}
    for jit in (False, True):
        pyro.set_rng_seed(5)
        # Adam: steps that follow each other one by one (L-BFGS's line search may branch on a rounding)
        runs[jit] = SVI("mvn", num_steps=150, optimizer="adam", batch_size=batch_size, evidence_particles=50, jit=jit,
                        progress=False).fit(CUBIC, x, y)
    assert runs[True].diagnostics["jit"] == "graph" and runs[False].diagnostics["jit"] == "none"
    torch.testing.assert_close(runs[True].loss_trace, runs[False].loss_trace, rtol=1e-6, atol=1e-6)
    for name in ("alpha", "beta"):
        torch.testing.assert_close(runs[True].hyperparameters[name], runs[False].hyperparameters[name], rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ConvergenceWarning")  # 30 steps: the fallback, not convergence
def test_jit_falls_back_to_eager_steps_for_pyro_module_parameters():
    # pyro.module writes the store's values back into the nn.Module: the graph capture must not run.
    net = torch.nn.Linear(1, 1).double()
    x, y = sine_data(torch.float64)

    def model(x, y):
        pyro.module("net", net)
        scale = pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(net(x.unsqueeze(-1)).squeeze(-1), scale), obs=y)

    post = SVI("normal", num_steps=30, evidence_particles=10, jit=True, progress=False).fit(model, x, y)
    assert post.diagnostics["jit"] == "none"
    assert isinstance(net.weight, torch.nn.Parameter)


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ConvergenceWarning")  # 50 steps: devices, not convergence
def test_device_discipline(meta_default_device):
    x, y = sine_data(torch.float32)
    for guide in ("normal", "mvn"):
        post = SVI(guide, num_steps=50, batch_size=20, evidence_particles=50, progress=False).fit(CUBIC, x, y)
        assert post.samples(3)["w"].device.type == "cpu"
        assert post.hyperparameters["alpha"].device.type == "cpu"
        assert post.loss_trace.device.type == "cpu"


@pytest.mark.gpu
def test_on_gpu():
    x, y = sine_data(torch.float32)
    post = SVI("mvn", num_steps=300, device="cuda", progress=False).fit(CUBIC, x, y)
    assert post.samples(3)["w"].device.type == "cuda"
    assert post.hyperparameters["beta"].device.type == "cuda"
    assert post.predict(x.cuda(), num_samples=4)["obs"].device.type == "cuda"


def test_score_function_gradient_for_a_discrete_latent():
    # z ~ Bernoulli(0.3), x_i ~ N(2z - 1, 1): the guide family holds the exact posterior, so the fitted
    # probability and the ELBO reach it. With 20 particles per step and averaging, the optimiser noise
    # in q is ~0.01 (measured); the final ELBO has stderr < 0.01.
    data = torch.tensor([0.9, 0.2, 1.4, -0.1, 0.6], dtype=torch.float64)

    def model(data):
        z = pyro.sample("z", dist.Bernoulli(data.new_tensor(0.3)))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(2 * z - 1, 1.0), obs=data)

    def guide(data):
        prob = pyro.param("q_prob", data.new_tensor(0.5), constraint=dist.constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(prob))

    joint = torch.stack([
        math.log(0.7) + dist.Normal(-1.0, 1.0).log_prob(data).sum(),
        math.log(0.3) + dist.Normal(1.0, 1.0).log_prob(data).sum(),
    ])
    exact_evidence = float(torch.logsumexp(joint, 0))
    exact_prob = float(torch.softmax(joint, 0)[1])
    post = SVI(guide, num_steps=600, lr=0.05, num_particles=20, progress=False).fit(model, data)
    assert abs(float(post.samples(20000)["z"].mean()) - exact_prob) < 0.03
    assert abs(post.log_evidence.value - exact_evidence) < 0.05


@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.ConvergenceWarning")  # 120 steps: the bar, not convergence
@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_progress_bar_runs(capsys, optimizer):
    x, y = sine_data()
    post = SVI("normal", num_steps=120, optimizer=optimizer, evidence_particles=50, progress=True).fit(CUBIC, x, y)
    assert post.loss_trace.shape == ((120,) if optimizer == "adam" else (post.diagnostics["evaluations"],))
    assert "SVI" in capsys.readouterr().err


def test_streaming_from_a_dataloader(exact_cubic):
    # Batches of 16, 16 and 8 rows: each is scaled by 40 / its own length. The final ELBO is summed
    # over one pass with shared particles, so it must bound the exact evidence (3 stderrs) and, with
    # a full-rank guide, come within 1 nat of it after 1000 noisy steps.
    x, y = sine_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    post = SVI("mvn", num_steps=1000, progress=False).fit(CUBIC, loader)
    exact = exact_cubic.log_evidence.value
    assert post.log_evidence.value < exact + 3 * post.log_evidence.stderr
    assert post.log_evidence.value > exact - 1.0
    assert abs(float(post.hyperparameters["beta"] / exact_cubic.hyperparameters["beta"]) - 1) < 0.25
    assert post.diagnostics["num_data"] == 40
    assert post.predict(x, num_samples=3)["obs"].shape == (3, 40)
    assert post.diagnostics.get("jit", "none") == "none"  # varying batch shapes: the steps ran eagerly
