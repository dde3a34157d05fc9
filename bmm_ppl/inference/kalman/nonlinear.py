"""Extended and unscented Kalman filters for ``x_{t+1} = f(x_t) + w_t``, ``y_t = h(x_t) + v_t``.

Both give Gaussian approximations of the filtering distributions and an *approximate* log evidence
(the sum of the approximate innovation likelihoods); on a linear model both equal the Kalman filter
exactly, which the tests check. The EKF linearises with Jacobians from ``torch.func.jacrev``; the UKF
propagates the scaled sigma points of Julier & Uhlmann / van der Merwe. Same conventions as
:func:`~bmm_ppl.inference.kalman.filtering.kalman_filter`: ``y: Tensor[*batch, T, p]``, NaN = missing,
the initial state at the first observation. ``f`` and ``h`` map ``Tensor[..., n]`` to ``Tensor[..., n]`` /
``Tensor[..., p]`` and must broadcast over leading dimensions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import jacrev, vmap

from bmm_ppl.inference.kalman.filtering import FilterResult
from bmm_ppl.contracts.state_space import symmetrise


def _jacobian(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    jac = vmap(jacrev(fn))(flat)
    return jac.reshape(x.shape[:-1] + jac.shape[-2:])


def _masked_update(mean, cov, y, predicted_y, s, cross):
    """Conditions on the observed components of ``y`` given the predicted observation mean ``predicted_y``,
    its covariance ``s`` and the state--observation cross-covariance ``cross`` (Tensor[..., n, p])."""
    observed = ~torch.isnan(y)
    weight = observed.to(y.dtype)
    innovation = torch.where(observed, y - predicted_y, torch.zeros_like(y))
    s = s * (weight.unsqueeze(-1) * weight.unsqueeze(-2)) + torch.diag_embed(1.0 - weight)
    cross = cross * weight.unsqueeze(-2)
    chol = torch.linalg.cholesky(symmetrise(s))
    gain = torch.cholesky_solve(cross.mT, chol).mT
    mean = mean + (gain @ innovation.unsqueeze(-1)).squeeze(-1)
    cov = symmetrise(cov - gain @ s @ gain.mT)
    whitened = torch.linalg.solve_triangular(chol, innovation.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
    log_likelihood = -0.5 * (weight.sum(-1) * math.log(2 * math.pi) + log_det + whitened.pow(2).sum(-1))
    return mean, cov, log_likelihood


def _run(predict, observe, initial_mean, initial_cov, y) -> FilterResult:
    batch = y.shape[:-2]
    mean = initial_mean.expand(batch + initial_mean.shape[-1:])
    cov = initial_cov.expand(batch + initial_cov.shape[-2:])
    total = y.new_zeros(batch)
    out = {k: [] for k in ("fm", "fc", "pm", "pc")}
    for t in range(y.shape[-2]):
        if t > 0:
            mean, cov = predict(mean, cov)
        out["pm"].append(mean)
        out["pc"].append(cov)
        mean, cov, step = _masked_update(mean, cov, y[..., t, :], *observe(mean, cov))
        total = total + step
        out["fm"].append(mean)
        out["fc"].append(cov)
    stack = lambda v: torch.stack(v, dim=len(batch))  # noqa: E731
    return FilterResult(total, stack(out["fm"]), stack(out["fc"]), stack(out["pm"]), stack(out["pc"]))


def extended_kalman_filter(
    transition_fn: Callable, observation_fn: Callable, transition_cov: torch.Tensor, observation_cov: torch.Tensor,
    initial_mean: torch.Tensor, initial_cov: torch.Tensor, y: torch.Tensor,
) -> FilterResult:
    """The EKF; ``log_likelihood`` is the approximate log evidence.

    Examples:
        >>> e = torch.eye(1, dtype=torch.float64)
        >>> r = extended_kalman_filter(torch.sin, lambda x: x, e, e, torch.zeros(1, dtype=torch.float64), e, torch.zeros(4, 1, dtype=torch.float64))
        >>> r.filtered_means.shape
        torch.Size([4, 1])
    """

    def predict(mean, cov):
        jac = _jacobian(transition_fn, mean)
        return transition_fn(mean), symmetrise(jac @ cov @ jac.mT + transition_cov)

    def observe(mean, cov):
        jac = _jacobian(observation_fn, mean)
        return observation_fn(mean), jac @ cov @ jac.mT + observation_cov, cov @ jac.mT

    return _run(predict, observe, initial_mean, initial_cov, y)


def sigma_points(mean: torch.Tensor, cov: torch.Tensor, alpha: float, beta: float, kappa: float):
    """The 2n + 1 scaled sigma points (Tensor[2n+1, ..., n]) with mean and covariance weights."""
    n = mean.shape[-1]
    lam = alpha**2 * (n + kappa) - n
    chol = torch.linalg.cholesky(symmetrise((n + lam) * cov))
    offsets = chol.mT  # rows are the columns of the factor
    points = torch.cat([mean.unsqueeze(0), (mean.unsqueeze(-2) + offsets).movedim(-2, 0), (mean.unsqueeze(-2) - offsets).movedim(-2, 0)])
    w_mean = mean.new_full((2 * n + 1,), 1.0 / (2 * (n + lam)))
    w_cov = w_mean.clone()
    w_mean[0] = lam / (n + lam)
    w_cov[0] = lam / (n + lam) + (1 - alpha**2 + beta)
    return points, w_mean, w_cov


def _weighted(points, w_mean, w_cov, other=None):
    shape = (-1,) + (1,) * (points.dim() - 1)
    mean = (w_mean.reshape(shape) * points).sum(0)
    centred = points - mean
    if other is None:
        cov = (w_cov.reshape(shape + (1,)) * centred.unsqueeze(-1) * centred.unsqueeze(-2)).sum(0)
        return mean, cov
    other_centred = other - (w_mean.reshape(shape) * other).sum(0)
    return mean, (w_cov.reshape(shape + (1,)) * other_centred.unsqueeze(-1) * centred.unsqueeze(-2)).sum(0)


def unscented_kalman_filter(
    transition_fn: Callable, observation_fn: Callable, transition_cov: torch.Tensor, observation_cov: torch.Tensor,
    initial_mean: torch.Tensor, initial_cov: torch.Tensor, y: torch.Tensor,
    alpha: float = 1.0, beta: float = 2.0, kappa: float = 0.0,
) -> FilterResult:
    """The UKF; ``log_likelihood`` is the approximate log evidence. The defaults (``alpha=1``, ``kappa=0``)
    keep all weights non-negative but the centre's covariance weight.

    Examples:
        >>> e = torch.eye(1, dtype=torch.float64)
        >>> r = unscented_kalman_filter(torch.sin, lambda x: x, e, e, torch.zeros(1, dtype=torch.float64), e, torch.zeros(4, 1, dtype=torch.float64))
        >>> r.filtered_covs.shape
        torch.Size([4, 1, 1])
    """

    def predict(mean, cov):
        points, w_mean, w_cov = sigma_points(mean, cov, alpha, beta, kappa)
        new_mean, new_cov = _weighted(transition_fn(points), w_mean, w_cov)
        return new_mean, symmetrise(new_cov + transition_cov)

    def observe(mean, cov):
        points, w_mean, w_cov = sigma_points(mean, cov, alpha, beta, kappa)
        outputs = observation_fn(points)
        predicted_y, s = _weighted(outputs, w_mean, w_cov)
        _, cross = _weighted(outputs, w_mean, w_cov, other=points)
        return predicted_y, s + observation_cov, cross

    return _run(predict, observe, initial_mean, initial_cov, y)
