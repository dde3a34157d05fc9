"""Pure tensor kernels of the Laplace approximation: curvature from Jacobians, the log determinant and
the evidence. No Pyro here: the engine hands in Jacobians, likelihood Hessians and prior precisions.

Shapes: ``n`` data points, ``K`` outputs per point, ``P`` parameters.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bmm_ppl.inference.laplace.structures import HessianStructure


def output_hessian_blocks(log_likelihood_of_output: Callable[[torch.Tensor], torch.Tensor],
                          output: torch.Tensor) -> torch.Tensor:
    """``Lambda_i = -d^2 log p(y_i | f_i) / d f_i^2`` for every point, from ``K`` Hessian-vector products.

    The log-likelihood must be a sum of per-point terms (observations conditionally independent given the
    output), so its Hessian in ``f`` is block diagonal: the product with ``e_k`` set for every point at
    once gives column ``k`` of every block. Differentiable in whatever ``log_likelihood_of_output``
    closes over (a noise scale).

    Args:
        log_likelihood_of_output: ``Tensor[n, *output_shape] -> scalar``.
        output: ``Tensor[n, *output_shape]`` (the point).

    Returns:
        Tensor[n, K, K] with ``K = prod(output_shape)``.

    Examples:
        >>> y = torch.tensor([0.5, -1.0])
        >>> blocks = output_hessian_blocks(lambda f: torch.distributions.Normal(f, 0.5).log_prob(y).sum(), torch.zeros(2))
        >>> blocks.squeeze(-1).squeeze(-1)
        tensor([4., 4.])
    """
    n = output.shape[0]
    flat = output.detach().reshape(n, -1)
    size = flat.shape[1]

    def of_flat(f):
        return log_likelihood_of_output(f.reshape(output.shape))

    gradient = torch.func.grad(of_flat)
    directions = torch.eye(size, dtype=flat.dtype, device=flat.device).unsqueeze(1).expand(size, n, size)

    def column(direction):
        return -torch.func.jvp(gradient, (flat,), (direction,))[1]

    try:  # all K Hessian-vector products in one vectorised pass
        return torch.func.vmap(column)(directions).permute(1, 2, 0)  # [n, K(row), K(column k)]
    except RuntimeError:  # a program vmap cannot run (data-dependent control flow): one product per column
        return torch.stack([column(direction) for direction in directions], dim=-1)


def gauss_newton(jacobian: torch.Tensor, blocks: torch.Tensor, structure: HessianStructure) -> torch.Tensor:
    """``sum_i J_i^T Lambda_i J_i``, whole (``Tensor[P, P]``) or its diagonal (``Tensor[P]``).

    Args:
        jacobian: Tensor[n, K, P].
        blocks: Tensor[n, K, K].

    Examples:
        >>> J = torch.tensor([[[1.0, 2.0]]]); L = torch.tensor([[[3.0]]])
        >>> gauss_newton(J, L, HessianStructure.FULL), gauss_newton(J, L, HessianStructure.DIAG)
        (tensor([[ 3.,  6.],
                [ 6., 12.]]), tensor([ 3., 12.]))
    """
    weighted = torch.einsum("nkl,nlp->nkp", blocks, jacobian)
    if structure is HessianStructure.FULL:
        return torch.einsum("nkp,nkq->pq", jacobian, weighted)
    return torch.einsum("nkp,nkp->p", jacobian, weighted)


def empirical_fisher(gradients: torch.Tensor, structure: HessianStructure) -> torch.Tensor:
    """``sum_i g_i g_i^T`` from per-point gradients ``Tensor[n, P]`` (whole or diagonal)."""
    if structure is HessianStructure.FULL:
        return gradients.T @ gradients
    return gradients.pow(2).sum(0)


def posterior_precision(curvature: torch.Tensor, prior_precision: torch.Tensor, structure: HessianStructure) -> torch.Tensor:
    """The curvature plus the (diagonal, ``Tensor[P]``) prior precision."""
    if structure is HessianStructure.FULL:
        return curvature + torch.diag_embed(prior_precision)
    return curvature + prior_precision


def laplace_log_evidence(log_joint_at_mode: torch.Tensor, log_det_precision: torch.Tensor, num_parameters: int) -> torch.Tensor:
    """``log p(y) ~= log p(y, theta*) + P/2 log 2 pi - 1/2 log det H`` (MacKay 1992; Immer et al. 2021, eq. 3).

    Examples:
        >>> abs(float(laplace_log_evidence(torch.tensor(0.0), torch.tensor(0.0), 2)) - math.log(2 * math.pi)) < 1e-6
        True
    """
    return log_joint_at_mode + 0.5 * num_parameters * math.log(2 * math.pi) - 0.5 * log_det_precision


__all__ = ["empirical_fisher", "gauss_newton", "laplace_log_evidence", "output_hessian_blocks", "posterior_precision"]
