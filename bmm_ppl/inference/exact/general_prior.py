"""Exact inference for ``theta ~ N(m0, S0)``, ``y ~ N(A theta, diag(v))`` with a general prior covariance.

Two algebraically equal routes, chosen by size: the n x n marginal covariance ``C = diag(v) + A S0 A^T``
when n <= P, and the P x P posterior precision ``S0^-1 + A^T diag(v)^-1 A`` (matrix determinant lemma and
Woodbury) when n > P. Everything is differentiable, so type-II learning is gradient ascent on the exact
evidence.
"""

from __future__ import annotations

import math

import torch


def _marginal_route(form):
    a, s0 = form.design, form.prior_covariance
    a_s0 = a @ s0
    covariance = a_s0 @ a.T + torch.diag(form.noise_variance)
    chol = torch.linalg.cholesky(covariance)
    residual = form.targets - a @ form.prior_mean
    whitened = torch.linalg.solve_triangular(chol, residual.unsqueeze(-1), upper=False)
    log_evidence = -0.5 * (whitened.pow(2).sum() + 2 * chol.diagonal().log().sum() + residual.shape[0] * math.log(2 * math.pi))
    gain = torch.cholesky_solve(a_s0, chol).T  # S0 A^T C^-1: Tensor[P, n]
    mean = form.prior_mean + gain @ residual
    posterior_covariance = s0 - gain @ a_s0
    return log_evidence, mean, posterior_covariance


def _precision_route(form):
    a, v = form.design, form.noise_variance
    prior_chol = torch.linalg.cholesky(form.prior_covariance)
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    prior_precision = torch.cholesky_solve(eye, prior_chol)
    weighted = a / v.unsqueeze(-1)
    precision = prior_precision + a.T @ weighted
    precision_chol = torch.linalg.cholesky(precision)
    residual = form.targets - a @ form.prior_mean
    projected = weighted.T @ residual
    solved = torch.cholesky_solve(projected.unsqueeze(-1), precision_chol).squeeze(-1)
    quadratic = (residual.pow(2) / v).sum() - projected @ solved
    log_det = 2 * precision_chol.diagonal().log().sum() + 2 * prior_chol.diagonal().log().sum() + v.log().sum()
    log_evidence = -0.5 * (quadratic + log_det + residual.shape[0] * math.log(2 * math.pi))
    mean = form.prior_mean + solved
    posterior_covariance = torch.cholesky_solve(eye, precision_chol)
    return log_evidence, mean, posterior_covariance


def exact_solution(form, route: str | None = None):
    """``(log_evidence, posterior_mean: Tensor[P], posterior_covariance: Tensor[P, P])``.

    Args:
        form: a ``GaussianPriorRegressionForm``.
        route: ``"marginal"`` or ``"precision"`` to force one route (for tests); by default the cheaper one.
    """
    n, p = form.design.shape
    if route is None:
        route = "marginal" if n <= p else "precision"
    if route not in ("marginal", "precision"):
        raise ValueError(f"route={route!r} is not one of 'marginal', 'precision'")
    return _marginal_route(form) if route == "marginal" else _precision_route(form)


def psd_square_root(covariance: torch.Tensor) -> torch.Tensor:
    """A factor ``F`` with ``F F^T = covariance``: Cholesky, or a symmetric root when round-off made the
    matrix numerically singular."""
    chol, info = torch.linalg.cholesky_ex(covariance)
    if covariance.device.type == "meta" or not bool(info.any()):
        return chol
    values, vectors = torch.linalg.eigh(0.5 * (covariance + covariance.T))
    return vectors * values.clamp_min(0).sqrt()
