"""Hypergradients against the closed-form derivative of ridge regression's validation loss (float64)."""

import pytest
import torch

from bmm_ppl.inference.errors import DivergenceError
from bmm_ppl.selection.hypergradients import (
    InverseHVP,
    check_hyperparameters_reach,
    implicit_hypergradient,
    unrolled_hypergradient,
)

DTYPE = torch.float64


def ridge_problem(device="cpu", dtype=DTYPE):
    """Ridge regression with penalty exp(log_penalty); returns objectives, the exact optimum and the
    closed-form d(validation loss)/d(log_penalty)."""
    generator = torch.Generator().manual_seed(0)
    n, n_val, d = 30, 30, 10
    x = torch.randn(n, d, generator=generator, dtype=DTYPE, device="cpu")
    w_true = 0.3 * torch.randn(d, generator=generator, dtype=DTYPE, device="cpu")
    y = x @ w_true + torch.randn(n, generator=generator, dtype=DTYPE, device="cpu")
    x_val = torch.randn(n_val, d, generator=generator, dtype=DTYPE, device="cpu")
    y_val = x_val @ w_true + torch.randn(n_val, generator=generator, dtype=DTYPE, device="cpu")
    x, y, x_val, y_val = (t.to(device=device, dtype=dtype) for t in (x, y, x_val, y_val))

    def inner(p, h):
        return ((x @ p["w"] - y) ** 2).mean() + h["log_penalty"].exp() * p["w"].square().sum()

    def outer(p, h):
        return ((x_val @ p["w"] - y_val) ** 2).mean()

    def closed_form(log_penalty):
        penalty = log_penalty.exp()
        hessian = 2 * x.T @ x / n + 2 * penalty * torch.eye(d, dtype=dtype, device=device)
        w_star = torch.linalg.solve(hessian, 2 * x.T @ y / n)
        dw = -torch.linalg.solve(hessian, 2 * penalty * w_star)  # d w*/d log_penalty
        derivative = (2 * x_val.T @ (x_val @ w_star - y_val) / n_val) @ dw
        return w_star, derivative, torch.linalg.eigvalsh(hessian).max()

    return inner, outer, closed_form, d


@pytest.fixture
def ridge():
    return ridge_problem()


def relative_error(a, b):
    return float(abs(a / b - 1))


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_implicit_matches_closed_form(ridge, method):
    inner, outer, closed_form, _ = ridge
    log_penalty = torch.tensor(-0.5, dtype=DTYPE, device="cpu")
    w_star, exact, top = closed_form(log_penalty)
    options = {"num_iterations": 50} if method == "cg" else {"num_iterations": 400, "step_size": float(1 / top)}
    result = implicit_hypergradient(inner, outer, {"w": w_star}, {"log_penalty": log_penalty}, method=method, **options)
    assert relative_error(result.hypergradient["log_penalty"], exact) < 1e-4
    assert float(result.info["residual_norm"]) < 1e-8
    assert result.hypergradient["log_penalty"].shape == log_penalty.shape


@pytest.mark.parametrize("momentum, truncate", [(0.0, None), (0.5, None), (0.0, 150)])
def test_unrolled_matches_closed_form(ridge, momentum, truncate):
    """Differentiating through T converged steps gives the derivative of w*(lambda); the truncated
    variant (the last 150 of 400 steps) too, since earlier steps' influence decays geometrically."""
    inner, outer, closed_form, d = ridge
    log_penalty = torch.tensor(-0.5, dtype=DTYPE, device="cpu")
    w_star, exact, top = closed_form(log_penalty)
    result = unrolled_hypergradient(
        inner, outer, {"w": torch.zeros(d, dtype=DTYPE)}, {"log_penalty": log_penalty},
        num_steps=400, lr=float(1 / top), momentum=momentum, truncate=truncate,
    )
    assert relative_error(result.hypergradient["log_penalty"], exact) < 1e-4
    assert torch.allclose(result.params["w"], w_star, atol=1e-8)
    assert result.info["differentiated_steps"] == (truncate or 400)


def test_short_truncation_is_biased_but_bounded(ridge):
    """Truncation trades bias for memory: 2 differentiated steps miss most of the derivative."""
    inner, outer, closed_form, d = ridge
    log_penalty = torch.tensor(-0.5, dtype=DTYPE, device="cpu")
    _, exact, top = closed_form(log_penalty)
    short = unrolled_hypergradient(inner, outer, {"w": torch.zeros(d, dtype=DTYPE)}, {"log_penalty": log_penalty},
                                   num_steps=400, lr=float(1 / top), truncate=2)
    assert relative_error(short.hypergradient["log_penalty"], exact) > 1e-2


def test_learning_rate_schedule_gets_a_hypergradient():
    """A per-step learning-rate schedule is a hyperparameter; check against finite differences."""
    x = torch.tensor([1.0, 2.0, -1.0], dtype=DTYPE, device="cpu")
    y = torch.tensor([1.0, 3.0, 0.5], dtype=DTYPE, device="cpu")

    def inner(p, h):
        return ((x * p["w"] - y) ** 2).sum()

    def outer(p, h):
        return (p["w"] - 1.0) ** 2

    schedule = torch.full((5,), 0.05, dtype=DTYPE, device="cpu")
    run = lambda s: unrolled_hypergradient(inner, outer, {"w": torch.tensor(0.0, dtype=DTYPE)}, {"lr": s}, num_steps=5, lr="lr")
    result = run(schedule)
    eps = 1e-6
    bump = torch.zeros(5, dtype=DTYPE, device="cpu")
    bump[2] = eps
    numeric = (run(schedule + bump).outer_value - run(schedule - bump).outer_value) / (2 * eps)
    assert result.hypergradient["lr"].shape == (5,)
    assert relative_error(result.hypergradient["lr"][2], numeric) < 1e-6


def test_vector_hyperparameters_keep_their_shape(ridge):
    """Per-coordinate penalties: the hypergradient has the hyperparameter's shape and sums to the
    single-penalty derivative when all penalties are equal (chain rule)."""
    inner_single, outer, closed_form, d = ridge
    log_penalty = torch.tensor(-0.5, dtype=DTYPE, device="cpu")
    w_star, exact, _ = closed_form(log_penalty)
    x_inner = lambda p, h: inner_single(p, {"log_penalty": torch.tensor(0.0, dtype=DTYPE)}) - p["w"].square().sum() + (h["log_penalty"].exp() * p["w"].square()).sum()
    result = implicit_hypergradient(x_inner, outer, {"w": w_star}, {"log_penalty": log_penalty.expand(d).clone()})
    assert result.hypergradient["log_penalty"].shape == (d,)
    assert relative_error(result.hypergradient["log_penalty"].sum(), exact) < 1e-4


def test_float32_close_to_float64():
    inner, outer, closed_form, _ = ridge_problem(dtype=torch.float32)
    log_penalty = torch.tensor(-0.5, dtype=torch.float32)
    w_star, exact, _ = closed_form(log_penalty)
    result = implicit_hypergradient(inner, outer, {"w": w_star}, {"log_penalty": log_penalty})
    assert result.hypergradient["log_penalty"].dtype == torch.float32
    assert relative_error(result.hypergradient["log_penalty"], exact) < 1e-3


# ------------------------------------------------------------------------------------ bad inputs
def test_hyperparameter_not_reaching_inner_objective(ridge):
    inner, outer, closed_form, d = ridge
    hypers = {"log_penalty": torch.tensor(0.0, dtype=DTYPE), "unused": torch.tensor(1.0, dtype=DTYPE)}
    with pytest.raises(ValueError, match=r"\['unused'\] do not reach the inner objective"):
        check_hyperparameters_reach(inner, {"w": torch.zeros(d, dtype=DTYPE)}, hypers)
    with pytest.raises(ValueError, match="unused"):
        implicit_hypergradient(inner, outer, {"w": torch.zeros(d, dtype=DTYPE)}, hypers)
    with pytest.raises(ValueError, match="unused"):
        unrolled_hypergradient(inner, outer, {"w": torch.zeros(d, dtype=DTYPE)}, hypers, num_steps=3, lr=0.1)


def test_nan_hypergradient_raises_divergence(ridge):
    inner, outer, closed_form, d = ridge
    hypers = {"log_penalty": torch.tensor(0.0, dtype=DTYPE)}
    with pytest.raises(DivergenceError, match="unrolled hypergradient"):
        # lr far above 2 / lambda_max: the unrolled iterates explode to inf, then NaN.
        unrolled_hypergradient(inner, outer, {"w": torch.ones(d, dtype=DTYPE)}, hypers, num_steps=300, lr=50.0)
    nan_outer = lambda p, h: outer(p, h) * torch.tensor(float("nan"), dtype=DTYPE, device="cpu")
    with pytest.raises(DivergenceError, match="implicit"):
        implicit_hypergradient(inner, nan_outer, {"w": torch.zeros(d, dtype=DTYPE)}, hypers)


def test_bad_arguments(ridge):
    inner, outer, _, d = ridge
    params = {"w": torch.zeros(d, dtype=DTYPE)}
    hypers = {"log_penalty": torch.tensor(0.0, dtype=DTYPE)}
    with pytest.raises(ValueError, match="method='bfgs' is not one of 'neumann', 'cg'"):
        implicit_hypergradient(inner, outer, params, hypers, method="bfgs")
    with pytest.raises(ValueError, match="step_size"):
        implicit_hypergradient(inner, outer, params, hypers, method=InverseHVP.NEUMANN)
    with pytest.raises(ValueError, match="truncate"):
        unrolled_hypergradient(inner, outer, params, hypers, num_steps=5, lr=0.1, truncate=6)
    with pytest.raises(ValueError, match="momentum"):
        unrolled_hypergradient(inner, outer, params, hypers, num_steps=5, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr='eta' names no hyperparameter"):
        unrolled_hypergradient(inner, outer, params, hypers, num_steps=5, lr="eta")
    with pytest.raises(ValueError, match=r"Tensor\[num_steps=5\]"):
        unrolled_hypergradient(inner, outer, params, {**hypers, "lr": torch.ones(4, dtype=DTYPE)}, num_steps=5, lr="lr", check=False)
    with pytest.raises(TypeError, match="hyperparameters must be a non-empty dict"):
        implicit_hypergradient(inner, outer, params, {})
    with pytest.raises(TypeError, match=r"params\['w'\] must be a floating-point"):
        implicit_hypergradient(inner, outer, {"w": [0.0]}, hypers)
    with pytest.raises(ValueError, match="outer objective must return a scalar"):
        implicit_hypergradient(inner, lambda p, h: p["w"] ** 2, params, hypers)


# ------------------------------------------------------------------------------ device discipline
def test_device_discipline(meta_default_device):
    """Data and hyperparameters on the CPU, default device "meta": any tensor created without taking
    the inputs' device would land on meta and fail when mixed with them."""
    inner, outer, closed_form, d = ridge_problem()
    log_penalty = torch.tensor(-0.5, dtype=DTYPE, device="cpu")
    w_star, exact, top = closed_form(log_penalty)
    for method, options in (("cg", {}), ("neumann", {"step_size": float(1 / top), "num_iterations": 400})):
        result = implicit_hypergradient(inner, outer, {"w": w_star}, {"log_penalty": log_penalty}, method=method, **options)
        assert result.hypergradient["log_penalty"].device.type == "cpu"
        assert relative_error(result.hypergradient["log_penalty"], exact) < 1e-4
    result = unrolled_hypergradient(inner, outer, {"w": torch.zeros(d, dtype=DTYPE, device="cpu")}, {"log_penalty": log_penalty},
                                    num_steps=400, lr=float(1 / top), momentum=0.5, truncate=200)
    assert result.params["w"].device.type == "cpu"
    assert relative_error(result.hypergradient["log_penalty"], exact) < 1e-4


@pytest.mark.gpu
def test_on_gpu():
    inner, outer, closed_form, d = ridge_problem(device="cuda")
    log_penalty = torch.tensor(-0.5, dtype=DTYPE, device="cuda")
    w_star, exact, top = closed_form(log_penalty)
    implicit = implicit_hypergradient(inner, outer, {"w": w_star}, {"log_penalty": log_penalty})
    unrolled = unrolled_hypergradient(inner, outer, {"w": torch.zeros(d, dtype=DTYPE, device="cuda")}, {"log_penalty": log_penalty},
                                      num_steps=400, lr=float(1 / top))
    for result in (implicit, unrolled):
        assert result.hypergradient["log_penalty"].device.type == "cuda"
        assert relative_error(result.hypergradient["log_penalty"], exact) < 1e-4
