"""Hypergradients of a bilevel problem: the derivative of an outer (validation) objective with respect
to continuous hyperparameters, through the inner (training) optimisation.

Both objectives are pure functions ``objective(params, hyperparameters) -> Tensor[]`` of two flat dicts
of tensors, so that :mod:`torch.func` can differentiate them:

- :func:`unrolled_hypergradient` differentiates through ``num_steps`` steps of gradient descent (with
  heavy-ball momentum) on the inner objective (Maclaurin et al. 2015); ``truncate=K`` backpropagates
  through the last ``K`` steps only, so memory is bounded by ``K`` steps (Shaban et al. 2019).
- :func:`implicit_hypergradient` uses the implicit function theorem at an inner optimum ``theta*``:
  ``d outer / d lambda = d_lambda outer - (d_lambda d_theta inner)^T H^-1 d_theta outer`` with
  ``H = d_theta^2 inner``, the inverse-Hessian-vector product by a Neumann series or by conjugate
  gradients (Lorraine et al. 2020). Hessian-vector products are ``torch.func.vjp`` of
  ``torch.func.grad``, linearised once per solve; the mixed term is one more ``torch.func.vjp``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
from torch.func import grad, grad_and_value, vjp

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError

Tensors = dict[str, torch.Tensor]
Objective = Callable[[Tensors, Tensors], torch.Tensor]


class InverseHVP(StrEnum):
    """How :func:`implicit_hypergradient` applies the inverse Hessian of the inner objective."""

    NEUMANN = "neumann"  # alpha * sum_j (I - alpha H)^j v (Lorraine et al. 2020); needs alpha < 2 / lambda_max(H)
    CG = "cg"  # conjugate gradients; needs H positive definite at the inner optimum


@dataclasses.dataclass
class HypergradientResult:
    """A hypergradient and what was computed on the way.

    Attributes:
        hypergradient: ``{name: Tensor shaped like hyperparameters[name]}``, ``d outer / d lambda``.
        params: the inner parameters the hypergradient was taken at (after the unrolled steps for
            :func:`unrolled_hypergradient`), detached.
        outer_value: Tensor[], the outer objective at ``params``.
        info: method-specific numbers as tensors (e.g. ``"residual_norm"`` of the linear solve).
    """

    hypergradient: Tensors
    params: Tensors
    outer_value: torch.Tensor
    info: dict


# ---------------------------------------------------------------------------------- dict arithmetic
def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> Tensors:
    """``alpha * x + y`` for dicts of tensors."""
    return {k: alpha * x[k] + y[k] for k in y}


def _detached(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: v.detach() for k, v in tensors.items()}


# -------------------------------------------------------------------------------------- validation
def check_tensors(name: str, tensors) -> Tensors:
    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError(f"{name} must be a non-empty dict {{name: Tensor}}, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating-point torch.Tensor, got {type(value).__name__}")
    return dict(tensors)


def _check_scalar(name: str, value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the {name} objective must return a scalar Tensor[], got {shape}")
    return value


def _exempt(hypers: Mapping, lr) -> Tensors:
    return {k: v for k, v in hypers.items() if k == lr}


def check_hyperparameters_reach(inner: Objective, params: Mapping, hyperparameters: Mapping, others: Mapping | None = None) -> None:
    """Raises ``ValueError`` naming every hyperparameter that the gradient of ``inner`` with respect to
    the parameters does not depend on: such a hyperparameter cannot change the trained parameters, so its
    "hypergradient" would only be its direct effect on the outer objective — almost always a mistake
    (a misspelt name, a penalty that was never added). The check is structural (autograd reachability),
    done once with ordinary autograd. ``others`` are further hyperparameters passed to ``inner`` but not
    checked (an unrolled learning rate).
    """
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    hypers = {k: v.detach().requires_grad_(True) for k, v in hyperparameters.items()}
    with torch.enable_grad():
        value = _check_scalar("inner", inner(params, {**(others or {}), **hypers}))
        grads = torch.autograd.grad(value, list(params.values()), create_graph=True, allow_unused=True)
        reachable = [g for g in grads if g is not None and g.requires_grad]
        unreached = list(hypers)
        if reachable:
            total = sum(g.sum() for g in reachable)
            mixed = torch.autograd.grad(total, list(hypers.values()), allow_unused=True)
            unreached = [name for name, m in zip(hypers, mixed) if m is None]
    if unreached:
        raise ValueError(
            f"hyperparameters {unreached} do not reach the inner objective's gradient with respect to the "
            f"parameters {sorted(params)}: they cannot change the trained parameters. Use them in the inner "
            "objective (e.g. a penalty or prior scale), or drop them from the hyperparameters"
        )


def _check_finite(hypergradient: Tensors, method: str) -> None:
    # One host synchronisation per hypergradient (an outer step), not per inner step.
    bad = [k for k, v in hypergradient.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise DivergenceError(
            f"the {method} hypergradient of {bad} is not finite: the inner optimisation or the linear solve "
            "diverged. Lower the inner learning rate (unrolled), the Neumann step size, or add damping"
        )


# -------------------------------------------------------------------------------------------- unrolled
def learning_rate_at(lr, hypers: Mapping[str, torch.Tensor], step: int):
    """A number, or the name of a hyperparameter holding a scalar or a per-step schedule Tensor[num_steps]."""
    if isinstance(lr, str):
        value = hypers[lr]
        return value[step] if value.dim() == 1 else value
    return lr


def unrolled_hypergradient(
    inner: Objective,
    outer: Objective,
    params: Mapping[str, torch.Tensor],
    hyperparameters: Mapping[str, torch.Tensor],
    *,
    num_steps: int,
    lr: float | str,
    momentum: float = 0.0,
    truncate: int | None = None,
    check: bool = True,
) -> HypergradientResult:
    """The hypergradient through ``num_steps`` unrolled steps of gradient descent on ``inner``.

    Runs ``v <- momentum * v + grad_theta inner(theta, lambda)``, ``theta <- theta - lr * v`` from
    ``params`` and differentiates ``outer(theta_T, lambda)`` with respect to ``lambda`` through the steps
    (reverse mode, ``torch.func.grad`` over the loop). With ``truncate=K`` the first ``num_steps - K``
    steps run without a graph and only the last ``K`` are differentiated: memory grows with ``K``, not
    ``num_steps``, at the cost of a bias that decays like the inner contraction over ``K`` steps.

    Args:
        inner: ``inner(params, hyperparameters) -> Tensor[]``, the training objective.
        outer: ``outer(params, hyperparameters) -> Tensor[]``, the validation objective.
        params: ``{name: Tensor[...]}`` the starting inner parameters.
        hyperparameters: ``{name: Tensor[...]}`` the point to differentiate at.
        num_steps: T, the number of unrolled steps.
        lr: the inner step size: a number, or the name of a hyperparameter (a scalar, or a per-step
            schedule Tensor[num_steps]) so that the learning rate itself gets a hypergradient.
        momentum: heavy-ball momentum in ``[0, 1)``.
        truncate: backpropagate through the last ``truncate`` steps only (``None``: all).
        check: check once that every hyperparameter reaches the inner gradient.

    Returns:
        a :class:`HypergradientResult` whose ``params`` are ``theta_T``.

    Examples:
        >>> x = torch.tensor([1.0, 2.0]); y = torch.tensor([1.0, 3.0])
        >>> inner = lambda p, h: ((x * p["w"] - y) ** 2).sum() + h["decay"] * p["w"] ** 2
        >>> outer = lambda p, h: (p["w"] - 1.5) ** 2
        >>> r = unrolled_hypergradient(inner, outer, {"w": torch.tensor(0.0)}, {"decay": torch.tensor(0.1)},
        ...                            num_steps=50, lr=0.05)
        >>> r.hypergradient["decay"].shape
        torch.Size([])
    """
    params = check_tensors("params", params)
    hypers = check_tensors("hyperparameters", hyperparameters)
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if isinstance(lr, str):
        if lr not in hypers:
            raise ValueError(f"lr={lr!r} names no hyperparameter; have {sorted(hypers)}")
        if hypers[lr].dim() == 1 and hypers[lr].shape[0] != num_steps:
            raise ValueError(f"the learning-rate schedule {lr!r} must be Tensor[num_steps={num_steps}], got {tuple(hypers[lr].shape)}")
        if hypers[lr].dim() > 1:
            raise ValueError(f"the learning rate {lr!r} must be a scalar or a per-step Tensor[num_steps]")
    elif not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    differentiated = num_steps if truncate is None else int(truncate)
    if not 1 <= differentiated <= num_steps:
        raise ValueError(f"truncate must be between 1 and num_steps={num_steps}, got {truncate}")
    if check:
        # A learning rate reaches the parameters through the update, not through the inner objective.
        penalties = {k: v for k, v in hypers.items() if k != lr}
        if penalties:
            check_hyperparameters_reach(inner, params, penalties, _exempt(hypers, lr))
        _check_scalar("outer", outer(params, hypers))

    inner_grad = grad(inner)

    def descend(theta, velocity, lam, first, last):
        for step in range(first, last):
            g = inner_grad(theta, lam)
            velocity = _axpy(momentum, velocity, g) if momentum else g
            theta = _axpy(-learning_rate_at(lr, lam, step), velocity, theta)
        return theta, velocity

    theta = _detached(params)
    velocity = {k: torch.zeros_like(v) for k, v in theta.items()}
    prefix = num_steps - differentiated
    if prefix:
        with torch.no_grad():
            theta, velocity = descend(theta, velocity, _detached(hypers), 0, prefix)
        theta, velocity = _detached(theta), _detached(velocity)

    def validation_after_steps(lam):
        final, _ = descend(theta, velocity, lam, prefix, num_steps)
        return _check_scalar("outer", outer(final, lam)), final

    hypergradient, (value, final) = grad_and_value(validation_after_steps, has_aux=True)(_detached(hypers))
    _check_finite(hypergradient, "unrolled")
    return HypergradientResult(
        hypergradient=_detached(hypergradient),
        params=_detached(final),
        outer_value=value.detach(),
        info={"differentiated_steps": differentiated},
    )


# -------------------------------------------------------------------------------------------- implicit
def _neumann(hvp, v: Tensors, num_iterations: int, step_size: float) -> Tensors:
    """``step_size * sum_{j=0}^{J} (I - step_size H)^j v``."""
    term, total = dict(v), dict(v)
    for _ in range(num_iterations):
        term = _axpy(-step_size, hvp(term), term)
        total = {k: total[k] + term[k] for k in total}
    return {k: step_size * t for k, t in total.items()}


def _conjugate_gradient(hvp, v: Tensors, num_iterations: int, tol: float) -> Tensors:
    """Solves ``H u = v`` by conjugate gradients, stopping early once ``|r| <= tol |v|``.

    The stopping test reads one number per iteration back to the host; the solve is short (tens of
    iterations) and runs once per outer step.
    """
    u = {k: torch.zeros_like(t) for k, t in v.items()}
    r = dict(v)
    p = dict(v)
    rr = _dot(r, r)
    threshold = (tol**2) * rr
    for _ in range(num_iterations):
        if bool(rr <= threshold):
            break
        hp = hvp(p)
        curvature = _dot(p, hp)
        alpha = rr / curvature
        u = _axpy(alpha, p, u)
        r = _axpy(-alpha, hp, r)
        rr_new = _dot(r, r)
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return u


def implicit_hypergradient(
    inner: Objective,
    outer: Objective,
    params: Mapping[str, torch.Tensor],
    hyperparameters: Mapping[str, torch.Tensor],
    *,
    method: str | InverseHVP = InverseHVP.CG,
    num_iterations: int = 50,
    step_size: float | None = None,
    damping: float = 0.0,
    tol: float = 1e-10,
    check: bool = True,
) -> HypergradientResult:
    """The hypergradient by the implicit function theorem, at an inner optimum ``params``.

    ``d outer / d lambda = d_lambda outer - (d_lambda d_theta inner)^T u`` with ``(H + damping I) u =
    d_theta outer``, ``H`` the inner Hessian in the parameters. Exact when ``params`` is a stationary
    point of ``inner`` and the solve converged; the caller optimises the inner problem first.

    Args:
        inner: the inner objective, ``objective(params, hyperparameters) -> Tensor[]``.
        outer: the outer objective, ``objective(params, hyperparameters) -> Tensor[]``.
        params: ``{name: Tensor[...]}`` (approximately) minimising ``inner`` at ``hyperparameters``.
        hyperparameters: ``{name: Tensor[...]}``.
        method: ``"cg"`` (conjugate gradients) or ``"neumann"`` (truncated Neumann series).
        num_iterations: CG iterations (at most), or Neumann terms.
        step_size: the Neumann step ``alpha``; must satisfy ``alpha < 2 / lambda_max(H)`` (required for
            ``"neumann"``).
        damping: added to the Hessian's diagonal (regularises an ill-conditioned solve).
        tol: CG stops once the residual norm is below ``tol`` times ``|d_theta outer|``.
        check: check once that every hyperparameter reaches the inner gradient.

    Returns:
        a :class:`HypergradientResult`; ``info["residual_norm"]`` is ``|(H + damping) u - d_theta outer|``.

    Examples:
        >>> inner = lambda p, h: (p["w"] - 2.0) ** 2 + h["decay"] * p["w"] ** 2
        >>> outer = lambda p, h: (p["w"] - 1.0) ** 2
        >>> decay = torch.tensor(0.5); w_star = 2.0 / (1 + decay)
        >>> r = implicit_hypergradient(inner, outer, {"w": w_star}, {"decay": decay})
        >>> round(float(r.hypergradient["decay"]), 6)   # d/dd (2/(1+d) - 1)^2 = -4 (2/(1+d) - 1) / (1+d)^2
        -0.592593
    """
    params = check_tensors("params", params)
    hypers = check_tensors("hyperparameters", hyperparameters)
    method = InverseHVP.parse(method, "method")
    num_iterations = int(num_iterations)
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {num_iterations}")
    if method is InverseHVP.NEUMANN and (step_size is None or not step_size > 0):
        raise ValueError(f"method='neumann' needs a positive step_size below 2 / lambda_max(H), got {step_size}")
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    if check:
        check_hyperparameters_reach(inner, params, hypers)
        _check_scalar("outer", outer(params, hypers))
    theta, lam = _detached(params), _detached(hypers)

    (outer_grad_theta, outer_grad_lambda), outer_value = grad_and_value(outer, argnums=(0, 1))(theta, lam)
    _check_scalar("outer", outer_value)
    inner_grad_theta = grad(inner, argnums=0)

    # Reverse-over-reverse: linearise the inner gradient once and reuse it for every Hessian-vector
    # product of the solve (H is symmetric, so the vjp is the hvp).
    _, inner_grad_vjp = vjp(lambda t: inner_grad_theta(t, lam), theta)

    def hvp(vector: Tensors) -> Tensors:
        (product,) = inner_grad_vjp(vector)
        return _axpy(damping, vector, product) if damping else product

    if method is InverseHVP.CG:
        solution = _conjugate_gradient(hvp, outer_grad_theta, num_iterations, tol)
    else:
        solution = _neumann(hvp, outer_grad_theta, num_iterations, step_size)
    residual = _axpy(-1.0, outer_grad_theta, hvp(solution))
    _, mixed_vjp = vjp(lambda h: inner_grad_theta(theta, h), lam)
    (mixed,) = mixed_vjp(solution)
    hypergradient = {k: outer_grad_lambda[k] - mixed[k] for k in lam}
    _check_finite(hypergradient, f"implicit ({method.value})")
    return HypergradientResult(
        hypergradient=_detached(hypergradient),
        params=theta,
        outer_value=outer_value.detach(),
        info={"residual_norm": _dot(residual, residual).sqrt().detach()},
    )
