"""Data entry at the engines' boundary: integer data, empty data and dtype mixes (issue 15, point 4).

Integer inputs and targets of regression models are real numbers: they are converted to a floating dtype
and never drag a fixed hyperparameter into the integer dtype (``beta=1.9`` once ran as 1). Integer
arguments that are genuinely integer (task labels, class labels, counts) pass unchanged. Empty data and
float32/float64 mixes are refused before any computation, with a ``ValueError`` naming the argument.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from bmm_ppl.inference import HMC, NUTS, SGLD, SVI, Exact
from bmm_ppl.models import BayesianLinearRegression, BayesianNeuralNetwork, Fixed, Learned, hyperparameter_site
from bmm_ppl.models import IdentityFeatures, polynomial_features, rbf_features
from bmm_ppl.models.multitask import IndependentTasks, MultiTaskRegression
from bmm_ppl.validation import as_real_valued, check_same_float_dtype, prepare_data

F64 = torch.float64


def integer_data():
    x = torch.arange(10)
    y = (0.3 * x + 1 + torch.sin(3.0 * x)).to(F64)
    return x, y


# ------------------------------------------------------------- integer inputs
def test_fixed_hyperparameter_keeps_its_value_under_integer_data():
    beta = hyperparameter_site("beta", Fixed(1.9), like=torch.arange(3))
    assert beta.dtype == torch.get_default_dtype()
    assert abs(float(beta) - 1.9) < 1e-6
    init = hyperparameter_site("alpha", Learned(0.25), like=torch.arange(3))
    assert init.is_floating_point() and abs(float(init.detach()) - 0.25) < 1e-7


def test_integer_x_runs_the_model_with_beta_1_9():
    x, _ = integer_data()
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.9)
    trace = poutine.trace(model).get_trace(x)
    noise_sd = trace.nodes["obs"]["fn"].scale
    assert noise_sd.is_floating_point()
    torch.testing.assert_close(noise_sd, torch.tensor(1.9).rsqrt().expand(10))


def test_exact_evidence_with_integer_x_equals_float_x():
    x, y = integer_data()
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.9)
    with_float = Exact().fit(model, x.to(F64), y).log_evidence.value
    with_integer = Exact().fit(model, x, y).log_evidence.value
    assert abs(with_integer - with_float) < 1e-10
    # The test can fail: the truncated beta = 1 of the old code gives an evidence 0.85 nats away.
    truncated = Exact().fit(BayesianLinearRegression(polynomial_features(1), 1.0, 1.0), x.to(F64), y).log_evidence.value
    assert abs(truncated - with_float) > 0.5


def test_exact_with_integer_x_and_y_uses_the_default_float_dtype():
    x, y = integer_data()
    y_int = y.round().long()
    model = BayesianLinearRegression(polynomial_features(2), alpha=1.0, beta=1.9)
    default = torch.get_default_dtype()
    expected = Exact().fit(model, x.to(default), y_int.to(default)).log_evidence.value
    got = Exact().fit(model, x, y_int)
    assert abs(got.log_evidence.value - expected) < 1e-10
    assert got.samples(3)["w"].dtype == default
    # type-II learning from integer data: the learned values are floating and match the float fit
    learned = BayesianLinearRegression(polynomial_features(2), alpha=None, beta=None)
    a = Exact().fit(learned, x, y).hyperparameters
    b = Exact().fit(learned, x.to(F64), y).hyperparameters
    torch.testing.assert_close(a["beta"], b["beta"], rtol=1e-10, atol=0)


def test_builtin_feature_maps_get_floating_inputs():
    # polynomial features of an integer x would be integer powers (which overflow int64 beyond
    # 2**63: 200**9 does), RBF centres would be truncated to integers.
    x = torch.arange(0, 201, 50)
    y = torch.linspace(0, 1, 5, dtype=F64)
    for features in (polynomial_features(9), rbf_features(torch.tensor([0.25, 0.75], dtype=F64) * 200, 30.0),
                     IdentityFeatures()):
        model = BayesianLinearRegression(features, alpha=1.0, beta=1.9)
        design, _ = model._checked_data(x, y)
        torch.testing.assert_close(design, features(x.to(F64)), rtol=1e-12, atol=0)


def test_custom_feature_map_may_take_integer_inputs():
    table = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=F64)
    model = BayesianLinearRegression(lambda index: table[index], alpha=1.0, beta=2.0)
    index = torch.tensor([0, 1, 2, 2, 1])
    y = torch.tensor([0.1, 1.1, 1.9, 2.2, 0.8], dtype=F64)
    got = Exact().fit(model, index, y).log_evidence.value
    expected = Exact().fit(BayesianLinearRegression(lambda design: design, 1.0, 2.0), table[index], y).log_evidence.value
    assert abs(got - expected) < 1e-12


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(SVI(guide="mvn", num_steps=150, evidence_particles=100, progress=False), id="SVI"),
        pytest.param(NUTS(num_samples=40, warmup_steps=40, progress=False), id="NUTS"),
        pytest.param(SGLD(num_samples=200, warmup_steps=100, progress=False), id="SGLD"),
    ],
)
# The short runs are compared with each other, not judged on their accuracy: their convergence and
# chain checks are beside the point here.
@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ConvergenceWarning")
@pytest.mark.filterwarnings("ignore::bmm_ppl.inference.errors.ChainDiagnosticsWarning")
def test_iterative_engines_give_the_same_fit_for_integer_and_float_x(engine):
    # Same seed, same float64 design: the runs must agree to rounding (not to a tolerance in Monte-Carlo
    # error); with beta truncated to 1 the posterior of w would be wider and the draws different.
    x, y = integer_data()
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.9)
    draws, evidences = [], []
    for inputs in (x.to(F64), x):
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        post = engine.fit(model, inputs, y)
        draws.append(post.samples(40)["w"])  # right after the fit: fresh draws take the same RNG path
        evidences.append(post.log_evidence)
    torch.testing.assert_close(draws[1], draws[0], rtol=1e-10, atol=1e-10)
    if evidences[0] is not None:
        assert abs(evidences[1].value - evidences[0].value) < 1e-10


def test_integer_arguments_that_are_integers_pass_unchanged():
    task = torch.tensor([0, 1, 1, 0])
    counts = torch.tensor([3, 0, 7, 2])
    args, kwargs = prepare_data((torch.ones(4, dtype=F64), task), {"y": counts})
    assert args[1].dtype == torch.long and kwargs["y"].dtype == torch.long
    assert torch.equal(args[1], task) and torch.equal(kwargs["y"], counts)


def test_multitask_task_labels_still_work_through_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, generator=g, dtype=F64)
    task = torch.arange(40) % 2
    y = torch.where(task == 0, 1 + 2 * x, -1 + x) + 0.1 * torch.randn(40, generator=g, dtype=F64)
    model = MultiTaskRegression(IndependentTasks(prior_precision=1.0), 2, noise_variance=0.01)
    post = Exact().fit(model, x, task, y)
    assert post.samples(5)["W"].shape == (5, 4)


def test_multitask_with_integer_inputs_equals_float_inputs():
    # noise_variance=0.5 once ran as the integer 0 under an integer x (and the solve failed on dtypes).
    g = torch.Generator().manual_seed(1)
    x = torch.arange(40) % 7
    task = torch.arange(40) % 2
    y = torch.where(task == 0, 1 + 2 * x, -1 + x).to(F64) + 0.1 * torch.randn(40, generator=g, dtype=F64)
    model = MultiTaskRegression(IndependentTasks(prior_precision=1.0), 2, noise_variance=0.5)
    expected = Exact().fit(model, x.to(F64), task, y).log_evidence.value
    assert abs(Exact().fit(model, x, task, y).log_evidence.value - expected) < 1e-10
    with pytest.raises(ValueError, match="y must be real-valued targets in a floating dtype, got torch.int64"):
        Exact().fit(model, x.to(F64), task, y.round().long())


def test_poisson_counts_stay_integer_under_nuts():
    def counts_model(rate_scale, counts):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", counts.shape[0]):
            pyro.sample("obs", dist.Poisson(rate * rate_scale), obs=counts)

    counts = torch.tensor([3, 0, 7, 2, 4, 5])
    scale = torch.ones(6, dtype=F64)
    # 300 draws gave a bulk ESS of 78-167 over seeds (Pyro's own NUTS: 65-180), under the 100 the chain
    # check asks for; 1000 draws give 290-400.
    post = NUTS(num_samples=1000, warmup_steps=300, progress=False).fit(counts_model, scale, counts)
    # Gamma(2, 1) prior, Poisson counts: the posterior is Gamma(2 + 21, 1 + 6), mean 23/7 = 3.29,
    # sd sqrt(23)/7 = 0.685. Tolerance: 5 sd/sqrt(ESS) with ESS >= 100 (else NUTS warns) is 0.34.
    assert abs(float(post.samples()["rate"].mean()) - 23 / 7) < 0.34


# ----------------------------------------------------------- refused up front
ENGINES = [
    pytest.param(lambda: Exact(), id="Exact"),
    pytest.param(lambda: SVI(num_steps=10, progress=False), id="SVI"),
    pytest.param(lambda: NUTS(num_samples=10, warmup_steps=10, progress=False), id="NUTS"),
    pytest.param(lambda: HMC(num_samples=10, warmup_steps=10, progress=False), id="HMC"),
    pytest.param(lambda: SGLD(num_samples=10, warmup_steps=100, progress=False), id="SGLD"),
]


@pytest.mark.parametrize("make_engine", ENGINES)
def test_empty_data_are_refused_naming_the_argument(make_engine):
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.9)
    empty = torch.zeros(0, dtype=F64)
    with pytest.raises(ValueError, match=r"argument 0 is empty \(shape \(0,\)\)"):
        make_engine().fit(model, empty, empty)
    with pytest.raises(ValueError, match=r"x is empty"):
        make_engine().fit(model, x=empty, y=empty)


@pytest.mark.parametrize("make_engine", ENGINES)
def test_float32_float64_mix_is_refused_naming_both(make_engine):
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.9)
    x = torch.linspace(0, 1, 8, dtype=torch.float32)
    y = torch.linspace(0, 1, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"argument 0 is float32, y is float64"):
        make_engine().fit(model, x, y=y)


def test_prepare_data_names_arguments_after_the_model_signature():
    model = BayesianLinearRegression(polynomial_features(1))
    with pytest.raises(ValueError, match=r"x \(argument 0\) is empty"):
        prepare_data((torch.zeros(0), torch.zeros(0)), {}, model=model)
    with pytest.raises(ValueError, match=r"x \(argument 0\) is float32, y \(argument 1\) is float64"):
        prepare_data((torch.zeros(2), torch.zeros(2, dtype=F64)), {}, model=model)
    # zero columns are not zero rows
    args, _ = prepare_data((torch.zeros(3, 0),), {})
    assert args[0].shape == (3, 0)


def test_model_refuses_mixes_empty_and_complex_data_when_called_directly():
    model = BayesianLinearRegression(polynomial_features(1), alpha=1.0, beta=1.9)
    with pytest.raises(ValueError, match="x is float32, y is float64"):
        model(torch.zeros(3), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="x is empty"):
        model(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="y must be real-valued"):
        model(torch.zeros(3), torch.zeros(3, dtype=torch.complex64))
    # also without targets (a Pyro plate of size 0 would end in ZeroDivisionError)
    with pytest.raises(ValueError, match="x is empty"):
        model(torch.zeros(0))


def test_validation_helpers():
    assert as_real_valued("x", torch.tensor([True, False])).dtype == torch.get_default_dtype()
    assert check_same_float_dtype(a=torch.zeros(1, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="a is float32, b is float64"):
        check_same_float_dtype(a=torch.zeros(1), b=torch.zeros(1, dtype=F64), c=torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------- neural networks' data
def small_net(dtype=torch.float32, outputs=1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, outputs)).to(dtype)


def test_bnn_refuses_integer_x_for_a_network_of_real_inputs():
    model = BayesianNeuralNetwork(small_net(), prior_scale=1.0, noise=0.1)
    with pytest.raises(ValueError, match=r"x is an integer tensor \(torch.int64\) and the network cannot take it"):
        model(torch.arange(5).unsqueeze(-1), torch.zeros(5))


def test_bnn_takes_integer_indices_for_an_embedding():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 1))
    model = BayesianNeuralNetwork(net, prior_scale=1.0, noise=0.5)
    trace = poutine.trace(model).get_trace(torch.tensor([0, 3, 1]), torch.tensor([0.5, -0.2, 1.0]))
    assert trace.nodes["obs"]["value"].shape == (3,)


def test_bnn_gaussian_integer_targets_are_observed_as_real_numbers():
    model = BayesianNeuralNetwork(small_net(F64), prior_scale=1.0, noise=0.3)
    x = torch.linspace(-1, 1, 6, dtype=F64).unsqueeze(-1)
    y = torch.tensor([0, 1, 1, 2, 2, 3])
    trace = poutine.trace(model).get_trace(x, y)
    obs = trace.nodes["obs"]
    assert obs["value"].dtype == F64
    # the noise is the fixed 0.3, not truncated to the integer 0
    torch.testing.assert_close(obs["fn"].scale, torch.tensor(0.3, dtype=F64).expand(6))
    with pytest.raises(ValueError, match="x is float64, y is float32"):
        model(x, y.float())


def test_bnn_categorical_labels_out_of_range_are_refused():
    model = BayesianNeuralNetwork(small_net(outputs=3), prior_scale=1.0, likelihood="categorical")
    x = torch.linspace(-1, 1, 4).unsqueeze(-1)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\] but the network gives 3 classes"):
        model(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer class labels"):
        model(x, torch.tensor([0.0, 1.0, 2.0, 1.0]))
    trace = poutine.trace(model).get_trace(x, torch.tensor([0, 1, 2, 1]))
    assert trace.nodes["obs"]["value"].dtype == torch.long


def test_gp_refuses_integer_data_naming_the_argument():
    pytest.importorskip("gpytorch")
    import gpytorch

    from bmm_ppl.inference import GPEvidence
    from bmm_ppl.models.invariance import GPRegression

    x = torch.arange(10).unsqueeze(-1)
    y = torch.sin(x[:, 0].to(F64))
    engine = GPEvidence(num_steps=5, progress=False)
    with pytest.raises(ValueError, match="x must be real-valued inputs in a floating dtype, got torch.int64"):
        engine.fit(GPRegression(gpytorch.kernels.RBFKernel()), x, y)
    with pytest.raises(ValueError, match="y must be real-valued targets in a floating dtype, got torch.int64"):
        engine.fit(GPRegression(gpytorch.kernels.RBFKernel()), x.to(F64), y.round().long())
    with pytest.raises(ValueError, match=r"argument 0 is empty \(shape \(0, 1\)\)"):
        engine.fit(GPRegression(gpytorch.kernels.RBFKernel()), x[:0].to(F64), y[:0])
    with pytest.raises(ValueError, match="argument 0 is float32, argument 1 is float64"):
        engine.fit(GPRegression(gpytorch.kernels.RBFKernel()), x.float(), y)
