"""Warm-up adaptation of SGLD's preconditioner from its own gradients, as ``init`` / ``update`` / ``final``
functions (NumPyro's ``welford_covariance`` style), and the Stein-identity check of the draws.

Where the gradient is linear in the position (a Gaussian posterior, and near the mode of any smooth
one), ``g = H (z - m)``: regressing the gradients of a window of draws on their positions gives the
curvature ``H = Cov(z)^-1 Cov(z, g)`` whatever the spread of the draws (a chain that has not yet mixed
still gives the slope), and minibatch noise in ``g`` leaves the slope unbiased. ``M = H^-1`` is then the
preconditioner that whitens the posterior.

Stein's identity ``E[(z - E z) grad U(z)^T] = I`` holds for any smooth posterior (integration by parts):
its mean diagonal over the draws (``diagnostics["stein_variance_ratio"]``, invariant under linear changes
of coordinates) is 1 for exact draws and ``1 / (1 - eps/2)`` for SGLD's stationary law on a Gaussian
target (whitened step ``eps``), so it estimates the variance inflation that the discretisation causes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MomentSums(NamedTuple):
    """Running sums over a window: count, ``sum z``, ``sum g`` (``Tensor[D]``), ``sum z z^T``, ``sum z g^T``
    (``Tensor[D, D]`` dense, ``Tensor[D]`` diagonal), pooled over chains."""

    count: int
    z: torch.Tensor
    g: torch.Tensor
    zz: torch.Tensor
    zg: torch.Tensor


def curvature_init(like: torch.Tensor, dense: bool) -> MomentSums:
    """Empty sums for draws shaped like ``like: Tensor[C, D]``."""
    dim = like.shape[-1]
    vector = like.new_zeros(dim)
    matrix = like.new_zeros(dim, dim) if dense else like.new_zeros(dim)
    return MomentSums(0, vector, vector.clone(), matrix, matrix.clone())


def curvature_update(sums: MomentSums, z: torch.Tensor, grad: torch.Tensor) -> MomentSums:
    """Adds the draws ``z`` and their gradients ``grad`` (``Tensor[C, D]``) of one step."""
    if sums.zz.dim() == 2:
        zz, zg = sums.zz + z.T @ z, sums.zg + z.T @ grad
    else:
        zz, zg = sums.zz + (z * z).sum(0), sums.zg + (z * grad).sum(0)
    return MomentSums(sums.count + z.shape[0], sums.z + z.sum(0), sums.g + grad.sum(0), zz, zg)


def _centred(sums: MomentSums) -> tuple[torch.Tensor, torch.Tensor]:
    n = sums.count
    mean_z, mean_g = sums.z / n, sums.g / n
    if sums.zz.dim() == 2:
        return sums.zz / n - torch.outer(mean_z, mean_z), sums.zg / n - torch.outer(mean_z, mean_g)
    return sums.zz / n - mean_z * mean_z, sums.zg / n - mean_z * mean_g


def curvature_final(sums: MomentSums) -> tuple[torch.Tensor, torch.Tensor]:
    """The preconditioner ``M = H^-1`` from the regression slope ``H = Cov(z)^-1 Cov(z, g)``, made
    symmetric positive definite (eigenvalues of ``H`` replaced by their absolute values, floored at
    ``1e-8`` of the largest). Returns ``(M, factor)``: dense ``Tensor[D, D]`` and its Cholesky factor, or
    diagonal ``Tensor[D]`` and its square root."""
    cov_zz, cov_zg = _centred(sums)
    if cov_zz.dim() == 2:
        dim = cov_zz.shape[0]
        jitter = 1e-10 * cov_zz.diagonal().clamp(min=0).mean().clamp(min=torch.finfo(cov_zz.dtype).tiny)
        eye = torch.eye(dim, dtype=cov_zz.dtype, device=cov_zz.device)
        slope = torch.linalg.solve(cov_zz + jitter * eye, cov_zg)
        values, vectors = torch.linalg.eigh(0.5 * (slope + slope.T))
        values = values.abs()
        values = values.clamp(min=1e-8 * values.max().clamp(min=torch.finfo(values.dtype).tiny))
        inverse = (vectors / values) @ vectors.T
        inverse = 0.5 * (inverse + inverse.T)
        return inverse, torch.linalg.cholesky(inverse)
    slope = (cov_zg / cov_zz.clamp(min=torch.finfo(cov_zz.dtype).tiny)).abs()
    slope = slope.clamp(min=1e-8 * slope.max().clamp(min=torch.finfo(slope.dtype).tiny))
    return slope.reciprocal(), slope.rsqrt()


def stein_variance_ratio(sums: MomentSums) -> torch.Tensor:
    """The diagonal of ``Cov(z, grad U)`` over the draws, ``Tensor[D]``: 1 per coordinate for exact draws
    (Stein's identity), above 1 where the sampler's spread is inflated (by about that factor in variance
    on a near-Gaussian posterior)."""
    _, cov_zg = _centred(sums)
    return cov_zg.diagonal() if cov_zg.dim() == 2 else cov_zg
