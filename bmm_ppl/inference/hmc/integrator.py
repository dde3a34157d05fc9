"""Hamiltonian dynamics over a batch of chains: the leapfrog step and the kinetic energy.

Shapes: ``z, r, grad: Tensor[C, D]`` (C chains, D unconstrained dimensions), ``potential: Tensor[C]``,
``inv_mass: Tensor[C, D]`` (a diagonal inverse mass matrix per chain), ``step_size: Tensor[C]`` (signed
for integration backwards in time).
"""

from __future__ import annotations

import dataclasses
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


def kinetic_energy(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """``0.5 r^T M^-1 r``: Tensor[C]."""
    return 0.5 * (r * r * inv_mass).sum(-1)


def sample_momentum(z: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """``r ~ N(0, M)`` with ``M = diag(1 / inv_mass)``: Tensor[C, D] on ``z``'s device and dtype."""
    return torch.randn(z.shape, dtype=z.dtype, device=z.device) * inv_mass.rsqrt()


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
    z_new = point.z + eps * inv_mass * r_half
    if active is not None:
        z_new = torch.where(active.unsqueeze(-1), z_new, safe_z)
    potential, grad = potential_and_grad(z_new)
    r_new = r_half - 0.5 * eps * grad
    return PhasePoint(z_new, r_new, potential, grad)
