"""The bilevel optimiser: ridge penalty against a fine grid search, a Pyro model's prior precision
against the closed-form MAP hypergradient, nn.Modules, early stopping, devices and bad inputs."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference.errors import DivergenceError, UnsupportedModelError
from bmm_ppl.models import BayesianLinearRegression, polynomial_features
from bmm_ppl.selection.bilevel import (
    BilevelProblem,
    HyperparameterOptimiser,
    Implicit,
    Unrolled,
    per_parameter_weight_decay,
)
from bmm_ppl.selection.hypergradients import implicit_hypergradient
from tests.selection.test_hypergradients import ridge_problem

DTYPE = torch.float64


def grid_optimum(closed_form_validation, low=-6.0, high=3.0, num=9001):
    grid = torch.linspace(low, high, num, dtype=DTYPE, device="cpu")
    return float(grid[closed_form_validation(grid).argmin()])


def ridge_bilevel():
    inner, outer, closed_form, d = ridge_problem()

    def validation(log_penalties):
        """The closed-form validation loss at each of Tensor[G] log penalties (batched solves)."""
        w_star = torch.vmap(lambda lp: closed_form(lp)[0])(log_penalties)
        return torch.vmap(lambda w: outer({"w": w}, {}))(w_star)

    problem = BilevelProblem(inner, outer, {"w": torch.zeros(d, dtype=DTYPE, device="cpu")},
                             {"log_penalty": torch.tensor(-2.0, dtype=DTYPE, device="cpu")})
    return problem, validation


@pytest.mark.parametrize(
    "method",
    [Unrolled(num_steps=20, lr=0.3), Implicit(inner_steps=20, inner_lr=0.2, inner_optimiser="sgd", method="cg")],
    ids=["unrolled", "implicit-cg"],
)
def test_ridge_penalty_matches_grid_search(method):
    problem, validation = ridge_bilevel()
    best = grid_optimum(validation)  # -0.686 on this data: an interior optimum, grid spacing 0.001
    result = HyperparameterOptimiser(method, num_steps=80, lr=0.1, progress=False).fit(problem)
    # Adam with step 0.1 hovers within a few hundredths of the optimum; the validation loss is flat
    # there (its value at +-0.05 differs from the minimum by < 1e-3 relative).
    assert abs(float(result.unconstrained["log_penalty"]) - best) < 0.05
    assert result.trajectory["log_penalty"].shape == (81,)
    assert result.outer_trace.shape == (80,) and result.hypergradient_norm.shape == (80,)
    assert float(result.outer_trace[-1]) < float(result.outer_trace[0])
    assert result.num_steps == 80 and not result.stopped_early


def test_early_stopping_returns_best_step():
    problem, validation = ridge_bilevel()
    result = HyperparameterOptimiser(Unrolled(num_steps=20, lr=0.3), num_steps=500, lr=0.1, patience=5, min_delta=1e-6,
                                     progress=False).fit(problem)
    assert result.stopped_early and result.num_steps < 500
    best_step = int(result.outer_trace.argmin())
    assert torch.equal(result.unconstrained["log_penalty"], result.trajectory["log_penalty"][best_step])


# ---------------------------------------------------------------------------------------- Pyro
def pyro_blr_data(device="cpu"):
    generator = torch.Generator().manual_seed(1)
    x = torch.linspace(0, 1, 16, dtype=DTYPE, device="cpu")
    y = torch.sin(2 * torch.pi * x) + 0.3 * torch.randn(16, generator=generator, dtype=DTYPE, device="cpu")
    x, y = x.to(device), y.to(device)
    return (x[::2], y[::2]), (x[1::2], y[1::2])


def closed_form_blr(log_alpha, train, validation, features, beta):
    """MAP weights and validation NLL of Bayesian linear regression as functions of log alpha."""
    design, design_val = features(train[0]), features(validation[0])
    precision = beta * design.T @ design + log_alpha.exp() * torch.eye(design.shape[1], dtype=DTYPE, device=design.device)
    w_map = torch.linalg.solve(precision, beta * design.T @ train[1])
    return w_map, -dist.Normal(design_val @ w_map, beta**-0.5).log_prob(validation[1]).sum()


def test_pyro_prior_precision_hypergradient():
    """BayesianLinearRegression(alpha=None): inner = negative log joint (MAP over w), outer = validation
    NLL at the MAP; the implicit hypergradient equals autograd through the closed-form MAP."""
    features, beta = polynomial_features(3), 11.1
    train, validation = pyro_blr_data()
    model = BayesianLinearRegression(features, alpha=None, beta=beta)
    problem = BilevelProblem.from_pyro(model, train, validation)
    assert sorted(problem.hyperparameters) == ["alpha"]  # unconstrained: log alpha
    log_alpha = torch.tensor(-1.0, dtype=DTYPE, device="cpu").requires_grad_(True)
    w_map, nll = closed_form_blr(log_alpha, train, validation, features, beta)
    (exact,) = torch.autograd.grad(nll, log_alpha)
    result = implicit_hypergradient(problem.inner, problem.outer, {"w": w_map.detach()}, {"alpha": log_alpha.detach()})
    assert float(abs(result.hypergradient["alpha"] / exact - 1)) < 1e-4
    assert float(abs(result.outer_value / nll.detach() - 1)) < 1e-10
    # The optimiser reports alpha itself (through the positive constraint) along the trajectory.
    fitted = HyperparameterOptimiser(Implicit(inner_steps=30, inner_lr=0.05), num_steps=3, lr=0.1, progress=False).fit(problem)
    assert bool((fitted.trajectory["alpha"] > 0).all())
    assert torch.allclose(fitted.hyperparameters["alpha"], fitted.unconstrained["alpha"].exp())


def test_pyro_model_without_params_or_with_unknown_name():
    train, validation = pyro_blr_data()
    with pytest.raises(UnsupportedModelError, match="no pyro.param sites"):
        BilevelProblem.from_pyro(BayesianLinearRegression(polynomial_features(2), 1.0, 1.0), train, validation)
    with pytest.raises(ValueError, match=r"\['gamma'\] are not pyro.param sites"):
        BilevelProblem.from_pyro(BayesianLinearRegression(polynomial_features(2), None, 1.0), train, validation, ["gamma"])


def test_pyro_param_that_only_scales_the_observations_is_not_refused():
    """A noise scale learned as a pyro.param does reach the MAP gradient (it weighs data against prior)."""

    def model(x, y):
        scale = pyro.param("noise", torch.tensor(0.5, dtype=x.dtype, device=x.device), constraint=dist.constraints.positive)
        w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(w * x, scale), obs=y)

    train, validation = pyro_blr_data()
    problem = BilevelProblem.from_pyro(model, train, validation)
    result = implicit_hypergradient(problem.inner, problem.outer, problem.params, problem.hyperparameters)
    assert result.hypergradient["noise"].shape == ()


# ------------------------------------------------------------------------------------- nn.Module
def test_module_per_parameter_weight_decay():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(40, 4, dtype=DTYPE)
    y = x[:, :1].sin()
    forward = lambda p, inputs: torch.func.functional_call(net, p, (inputs,))
    log_decays = {name: torch.full_like(p, -4.0) for name, p in net.named_parameters()}
    problem = BilevelProblem.from_module(
        net,
        inner=lambda p, h: (forward(p, x[:20]) - y[:20]).square().mean() + per_parameter_weight_decay(p, h),
        outer=lambda p, h: (forward(p, x[20:]) - y[20:]).square().mean(),
        hyperparameters=log_decays,
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = HyperparameterOptimiser(Unrolled(num_steps=10, lr=0.1, momentum=0.9, truncate=5), num_steps=5, lr=0.05,
                                     progress=False).fit(problem)
    assert {k: v.shape for k, v in result.hyperparameters.items()} == {k: p.shape for k, p in net.named_parameters()}
    assert result.trajectory["0.weight"].shape == (6, 8, 4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the module is untouched


# -------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    problem, _ = ridge_bilevel()
    with pytest.raises(TypeError, match="hypergradient must be Unrolled"):
        HyperparameterOptimiser("implicit")
    with pytest.raises(ValueError, match="num_steps"):
        HyperparameterOptimiser(Unrolled(), num_steps=0)
    with pytest.raises(ValueError, match="patience"):
        HyperparameterOptimiser(Unrolled(), patience=0)
    with pytest.raises(ValueError, match="inner_optimiser='lbfgs'"):
        Implicit(inner_optimiser="lbfgs")
    with pytest.raises(TypeError, match="problem must be a BilevelProblem"):
        HyperparameterOptimiser(Unrolled(), progress=False).fit({"inner": None})
    unused = BilevelProblem(problem.inner, problem.outer, problem.params,
                            {**problem.hyperparameters, "augmentation": torch.tensor(0.1, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"\['augmentation'\] do not reach the inner objective"):
        HyperparameterOptimiser(Unrolled(), num_steps=2, progress=False).fit(unused)
    with pytest.raises(DivergenceError):
        HyperparameterOptimiser(Unrolled(num_steps=500, lr=50.0), num_steps=2, progress=False).fit(problem)


def test_progress_bar_runs(capsys):
    problem, _ = ridge_bilevel()
    HyperparameterOptimiser(Unrolled(num_steps=3), num_steps=2, patience=3, progress=True).fit(problem)
    assert "hyperparameters" in capsys.readouterr().err


# ------------------------------------------------------------------------------- device discipline
def test_device_discipline(meta_default_device):
    train, validation = pyro_blr_data()
    problem = BilevelProblem.from_pyro(BayesianLinearRegression(polynomial_features(3), None, 11.1), train, validation)
    for method in (Implicit(inner_steps=5, inner_lr=0.05), Unrolled(num_steps=5, lr=0.01, momentum=0.5, truncate=3)):
        result = HyperparameterOptimiser(method, num_steps=2, patience=5, progress=False).fit(problem)
        assert result.hyperparameters["alpha"].device.type == "cpu"
        assert result.params["w"].device.type == "cpu"
    ridge, _ = ridge_bilevel()
    result = HyperparameterOptimiser(Implicit(inner_steps=5, inner_optimiser="sgd", inner_lr=0.1), num_steps=2, progress=False).fit(ridge)
    assert result.trajectory["log_penalty"].device.type == "cpu"


@pytest.mark.gpu
def test_on_gpu():
    train, validation = pyro_blr_data(device="cuda")
    problem = BilevelProblem.from_pyro(BayesianLinearRegression(polynomial_features(3), None, 11.1), train, validation)
    result = HyperparameterOptimiser(Implicit(inner_steps=5, inner_lr=0.05), num_steps=2, progress=False).fit(problem)
    assert result.hyperparameters["alpha"].device.type == "cuda"


def test_pyro_prior_precision_optimum_matches_grid_with_exact_inner_solver():
    """With the MAP solved exactly (``inner_solver``), Adam on the implicit hypergradient finds the
    validation-NLL minimiser of a fine grid over log alpha (spacing 0.005)."""
    features, beta = polynomial_features(3), 11.1
    train, validation = pyro_blr_data()
    problem = BilevelProblem.from_pyro(BayesianLinearRegression(features, alpha=None, beta=beta), train, validation)
    grid = torch.linspace(-8.0, 4.0, 2401, dtype=DTYPE, device="cpu")
    curve = torch.stack([closed_form_blr(g, train, validation, features, beta)[1] for g in grid])
    best = float(grid[curve.argmin()])

    def exact_map(problem, params, hypers):
        return {"w": closed_form_blr(hypers["alpha"], train, validation, features, beta)[0]}

    # The validation NLL is flat in log alpha on the small-alpha side (it tends to least squares), so
    # start within a few units of the optimum and take small steps.
    problem.hyperparameters = {"alpha": torch.tensor(-4.0, dtype=DTYPE, device="cpu")}
    result = HyperparameterOptimiser(Implicit(inner_solver=exact_map), num_steps=150, lr=0.1, progress=False).fit(problem)
    found = result.unconstrained["alpha"]
    # Flat near the optimum: the location agrees to 0.2 in log alpha, the objective to 1e-3 nats.
    assert abs(float(found) - best) < 0.2
    assert float(closed_form_blr(found, train, validation, features, beta)[1] - curve.min()) < 1e-3


def test_unrolled_learning_rate_is_a_hyperparameter():
    """With ``Unrolled(lr="lr")`` the inner step size is tuned with the penalty: after 10 unrolled steps
    from zero the weights are far from converged, so a larger step lowers the validation loss."""
    problem, _ = ridge_bilevel()
    problem.hyperparameters = {**problem.hyperparameters, "lr": torch.tensor(0.02, dtype=DTYPE, device="cpu")}
    result = HyperparameterOptimiser(Unrolled(num_steps=10, lr="lr"), num_steps=15, lr=0.01, progress=False).fit(problem)
    assert float(result.hyperparameters["lr"]) > 0.02
    assert float(result.outer_trace[-1]) < float(result.outer_trace[0])


def test_pyro_negative_elbo_inner_objective():
    """objective="elbo": mean-field Gaussian on the mean of y_i ~ N(mu, 1), mu ~ N(0, 1/alpha) (exact
    family in 1-D). The implicit hypergradient at the converged ELBO optimum matches central finite
    differences of the re-solved problem (base noise fixed, so everything is deterministic)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.zeros(12, dtype=DTYPE)
    y = 0.8 + torch.randn(12, generator=generator, dtype=DTYPE)
    model = BayesianLinearRegression(polynomial_features(0), alpha=None, beta=1.0)
    problem = BilevelProblem.from_pyro(model, (x[:6], y[:6]), (x[6:], y[6:]), objective="elbo", num_particles=2)
    assert sorted(problem.params) == ["w.loc", "w.log_scale"]
    solver = Implicit(inner_steps=300, inner_lr=0.05, inner_optimiser="sgd")

    def solved_outer(log_alpha):
        hypers = {"alpha": log_alpha}
        return problem.outer(solver.train(problem, dict(problem.params), hypers), hypers)

    log_alpha = torch.tensor(0.5, dtype=DTYPE)
    result = solver.hypergradient(problem, dict(problem.params), {"alpha": log_alpha}, check=True)
    eps = 1e-4
    numeric = (solved_outer(log_alpha + eps) - solved_outer(log_alpha - eps)) / (2 * eps)
    assert float(abs(result.hypergradient["alpha"] / numeric - 1)) < 1e-4
    with pytest.raises(ValueError, match="objective='vi' is not one of 'map', 'elbo'"):
        BilevelProblem.from_pyro(model, (x[:6], y[:6]), (x[6:], y[6:]), objective="vi")
