"""Hamiltonian dynamics over a batch of chains: the leapfrog step and the kinetic energy.

Shapes: ``z, r, grad: Tensor[C, D]`` (C chains, D unconstrained dimensions), ``potential: Tensor[C]``,
``step_size: Tensor[C]`` (signed for integration backwards in time), and the inverse mass matrix
(the metric) per chain: ``inv_mass: Tensor[C, D]`` for a diagonal one, ``Tensor[C, D, D]`` (symmetric
positive definite) for a dense one. Every function here takes either.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable

import torch

PotentialAndGrad = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass
class PhasePoint:
    """A point of the trajectory: position ``z``, momentum ``r``, potential and its gradient at ``z``."""

    z: torch.Tensor
    r: torch.Tensor
    potential: torch.Tensor
    grad: torch.Tensor

    def where(self, mask: torch.Tensor, other: "PhasePoint") -> "PhasePoint":
        """Per chain: this point where ``mask: Tensor[C]`` holds, else ``other``."""
        col = mask.unsqueeze(-1)
        return PhasePoint(
            torch.where(col, self.z, other.z),
            torch.where(col, self.r, other.r),
            torch.where(mask, self.potential, other.potential),
            torch.where(col, self.grad, other.grad),
        )


def is_dense(inv_mass: torch.Tensor) -> bool:
    """Whether ``inv_mass`` is a dense ``Tensor[C, D, D]`` (else a diagonal ``Tensor[C, D]``)."""
    return inv_mass.dim() == 3


def velocity(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """``M^-1 r`` for momenta ``r: Tensor[C, D]`` or ``Tensor[C, K, D]`` (K momenta per chain), same shape.

    Examples:
        >>> velocity(torch.ones(2, 3), torch.full((2, 3), 2.0))[0]
        tensor([2., 2., 2.])
        >>> velocity(torch.ones(2, 3), 2 * torch.eye(3).expand(2, 3, 3))[0]
        tensor([2., 2., 2.])
    """
    if is_dense(inv_mass):  # symmetric: r M^-1 row by row
        return torch.matmul(r.unsqueeze(-2), inv_mass).squeeze(-2) if r.dim() == 2 else torch.matmul(r, inv_mass)
    return r * inv_mass if r.dim() == 2 else r * inv_mass.unsqueeze(-2)


def kinetic_energy(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """``0.5 r^T M^-1 r``: Tensor[C]."""
    return 0.5 * (r * velocity(r, inv_mass)).sum(-1)


def sample_momentum(z: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """``r ~ N(0, M)``: Tensor[C, D] on ``z``'s device and dtype. Diagonal: ``r = eps / sqrt(M^-1)``;
    dense, with ``M^-1 = L L^T``: ``r = L^-T eps``, whose covariance is ``(L L^T)^-1 = M``."""
    noise = torch.randn(z.shape, dtype=z.dtype, device=z.device)
    if is_dense(inv_mass):
        upper = _cholesky_transposed(inv_mass)
        return torch.linalg.solve_triangular(upper, noise.unsqueeze(-1), upper=True).squeeze(-1)
    return noise * inv_mass.rsqrt()


_last_factor: list = [None, None]  # (weak reference to the last dense metric, its transposed Cholesky factor)


def _cholesky_transposed(inv_mass: torch.Tensor) -> torch.Tensor:
    """``L^T`` with ``inv_mass = L L^T``, factorised once per metric: the engines keep one metric tensor
    between adaptation windows (and never change it in place), so each transition reuses the factor."""
    reference, factor = _last_factor
    if reference is not None and reference() is inv_mass:
        return factor
    factor = torch.linalg.cholesky(inv_mass).transpose(-1, -2)
    _last_factor[:] = [weakref.ref(inv_mass), factor]
    return factor


def leapfrog(
    point: PhasePoint,
    step_size: torch.Tensor,
    inv_mass: torch.Tensor,
    potential_and_grad: PotentialAndGrad,
    active: torch.Tensor | None = None,
    safe_z: torch.Tensor | None = None,
) -> PhasePoint:
    """One leapfrog step of every chain (``step_size: Tensor[C]``, negative to go backwards).

    Chains outside ``active: Tensor[C]`` are evaluated at ``safe_z`` instead of their new position, so that
    a chain that already left the typical set (diverged) cannot poison the batched potential call; their
    results are discarded by the caller.
    """
    eps = step_size.unsqueeze(-1)
    r_half = point.r - 0.5 * eps * point.grad
    z_new = point.z + eps * velocity(r_half, inv_mass)
    if active is not None:
        z_new = torch.where(active.unsqueeze(-1), z_new, safe_z)
    potential, grad = potential_and_grad(z_new)
    r_new = r_half - 0.5 * eps * grad
    return PhasePoint(z_new, r_new, potential, grad)
