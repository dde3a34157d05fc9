"""Exact inference for ``w ~ N(0, alpha^-1 I)``, ``y | w ~ N(Phi w, beta^-1 I)`` through the SVD of ``Phi``.

With the thin SVD ``Phi = U diag(s) V^T`` (r = min(n, d) singular values) every quantity is a sum over
r terms, stable for n >> d and d >> n alike (it never forms the n x n marginal covariance or inverts
the d x d posterior precision), and cheap to re-evaluate for new ``(alpha, beta)``; that makes type-II
optimisation exact and fast. With ``z = U^T y``, ``e = |y - U z|^2`` and ``a_i = alpha + beta s_i^2``::

    log p(y) = -1/2 [ n log 2pi + sum log a_i - r log alpha - n log beta
                      + sum alpha beta z_i^2 / a_i + beta e ]

(the marginal covariance ``beta^-1 I + alpha^-1 Phi Phi^T`` has eigenvalues ``a_i / (alpha beta)`` along
``U`` and ``1 / beta`` elsewhere). Targets may carry trailing batch dimensions: ``y: Tensor[n, *batch]``.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class SpectralData:
    """The SVD of the design and the projections of the targets onto it.

    Attributes:
        left: Tensor[n, r] (U).
        singular: Tensor[r] (s).
        right: Tensor[d, r] (V).
        projected: Tensor[r, *batch], ``U^T y``.
        residual_sq: Tensor[*batch], ``|y - U U^T y|^2``.
        num_data: n.
        num_features: d.
    """

    left: torch.Tensor
    singular: torch.Tensor
    right: torch.Tensor
    projected: torch.Tensor
    residual_sq: torch.Tensor
    num_data: int
    num_features: int


def spectral_data(design: torch.Tensor, targets: torch.Tensor) -> SpectralData:
    """Decomposes ``design: Tensor[n, d]`` and projects ``targets: Tensor[n, *batch]``.

    Examples:
        >>> phi = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, dtype=torch.float64)
        >>> spectral_data(phi, y).singular.shape
        torch.Size([3])
    """
    left, singular, right_t = torch.linalg.svd(design, full_matrices=False)
    flat = targets.reshape(targets.shape[0], -1)
    projected = left.T @ flat
    residual_sq = (flat - left @ projected).pow(2).sum(0)
    batch = targets.shape[1:]
    return SpectralData(
        left=left,
        singular=singular,
        right=right_t.T,
        projected=projected.reshape((singular.shape[0],) + batch),
        residual_sq=residual_sq.reshape(batch),
        num_data=design.shape[0],
        num_features=design.shape[1],
    )


def _per_target(values: torch.Tensor, data: SpectralData) -> torch.Tensor:
    # Tensor[r] -> Tensor[r, 1, ..., 1] to broadcast against projected: Tensor[r, *batch].
    return values.reshape(values.shape + (1,) * (data.projected.dim() - 1))


def log_evidence(data: SpectralData, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``log p(y | alpha, beta)``: Tensor[*batch] (alpha and beta are scalars)."""
    n, r = data.num_data, data.singular.shape[0]
    sq = _per_target(data.singular.pow(2), data)
    a = alpha + beta * sq
    quadratic = (alpha * beta * data.projected.pow(2) / a).sum(0) + beta * data.residual_sq
    log_det_terms = torch.log(a).sum(0) - r * torch.log(alpha) - n * torch.log(beta)
    return -0.5 * (n * math.log(2 * math.pi) + log_det_terms + quadratic)


def posterior_mean(data: SpectralData, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Posterior mean of the weights, Tensor[d, *batch]."""
    s = _per_target(data.singular, data)
    coefficients = beta * s * data.projected / (alpha + beta * s.pow(2))
    flat = data.right @ coefficients.reshape(coefficients.shape[0], -1)
    return flat.reshape((data.num_features,) + data.projected.shape[1:])


def posterior_scale_factor(data: SpectralData, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A symmetric square root ``F`` (Tensor[d, d]) of the posterior covariance, ``Sigma = F F^T``.

    ``Sigma = V diag(1 / a) V^T + alpha^-1 (I - V V^T)``, whose square root has the same form with
    ``a^-1/2`` and ``alpha^-1/2``.
    """
    v = data.right
    eye = torch.eye(data.num_features, dtype=v.dtype, device=v.device)
    inside = v * (alpha + beta * data.singular.pow(2)).rsqrt()
    return inside @ v.T + alpha.rsqrt() * (eye - v @ v.T)


def effective_num_parameters(data: SpectralData, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """MacKay's ``gamma = sum beta s^2 / (alpha + beta s^2)``: how many weights the data determine."""
    sq = data.singular.pow(2)
    return (beta * sq / (alpha + beta * sq)).sum()
