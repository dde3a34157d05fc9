"""The fixed-length HMC transition over a batch of chains (NUTS lives in :mod:`.nuts_kernel`).

``hmc_step(point, step_size, inv_mass, potential_and_grad, num_steps) -> (point, info)`` over
``Tensor[C, D]`` positions; chains advance independently but share every potential evaluation (one
batched call per leapfrog step). Each chain may take its own number of leapfrog steps (``num_steps:
Tensor[C]``): a chain that has finished is held while the others go on, as NUTS's chains are. ``info`` is
an :class:`HMCInfo` of ``Tensor[C]`` statistics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bmm_ppl.inference.hmc.integrator import PhasePoint, kinetic_energy, leapfrog, sample_momentum
from bmm_ppl.inference.hmc.nuts_kernel import MAX_ENERGY_ERROR


class HMCInfo(NamedTuple):
    """What one HMC transition reports per chain (every field ``Tensor[C]``, ArviZ's sample-stat names)."""

    acceptance_rate: torch.Tensor  # min(1, exp(H0 - H)) of the proposal (0 for a divergence)
    diverging: torch.Tensor  # bool: the energy error passed MAX_ENERGY_ERROR (or became NaN)
    energy: torch.Tensor  # the Hamiltonian at the returned state (its own momentum), for BFMI
    n_steps: torch.Tensor  # leapfrog steps taken


def hmc_step(
    point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor, potential_and_grad,
    num_steps: int | torch.Tensor = 10,
) -> tuple[PhasePoint, HMCInfo]:
    """One HMC transition of every chain: ``num_steps`` leapfrog steps and a Metropolis correction.

    Args:
        point: the current positions (``point.r`` is ignored: momenta are drawn afresh).
        step_size: Tensor[C].
        inv_mass: the inverse mass matrices, ``Tensor[C, D]`` or ``Tensor[C, D, D]``.
        potential_and_grad: ``z: Tensor[C, D] -> (U: Tensor[C], dU/dz: Tensor[C, D])``.
        num_steps: leapfrog steps, one number for every chain or ``Tensor[C]`` (integers >= 1) per chain.

    Returns:
        ``(new_point, info)`` with ``info`` an :class:`HMCInfo`.

    Examples:
        >>> def potential_and_grad(z):
        ...     return 0.5 * (z * z).sum(-1), z
        >>> z = torch.zeros(2, 3)
        >>> point = PhasePoint(z, z, *potential_and_grad(z))
        >>> new, info = hmc_step(point, torch.full((2,), 0.5), torch.ones(2, 3), potential_and_grad,
        ...                      torch.tensor([3.0, 5.0]))
        >>> new.z.shape, info.n_steps.tolist()
        (torch.Size([2, 3]), [3.0, 5.0])
    """
    r0 = sample_momentum(point.z, inv_mass)
    current = PhasePoint(point.z, r0, point.potential, point.grad)
    energy0 = point.potential + kinetic_energy(r0, inv_mass)
    if isinstance(num_steps, torch.Tensor):
        steps = num_steps.to(energy0.dtype)
        longest = int(steps.max())  # one host read per transition
    else:
        steps, longest = torch.full_like(energy0, float(num_steps)), int(num_steps)
    new = current
    diverging = torch.zeros_like(energy0, dtype=torch.bool)
    for s in range(longest):
        moving = ~diverging & (steps > s)
        stepped = leapfrog(new, step_size, inv_mass, potential_and_grad, moving, point.z)
        new = stepped.where(moving, new)
        delta = torch.nan_to_num(new.potential + kinetic_energy(new.r, inv_mass) - energy0, nan=math.inf)
        diverging = diverging | (moving & (delta > MAX_ENERGY_ERROR))
    energy_new = new.potential + kinetic_energy(new.r, inv_mass)
    delta = torch.nan_to_num(energy_new - energy0, nan=math.inf)
    accept_prob = torch.where(diverging, torch.zeros_like(delta), torch.clamp(torch.exp(-delta), max=1.0))
    accept = torch.rand_like(accept_prob) < accept_prob
    info = HMCInfo(
        acceptance_rate=accept_prob,
        diverging=diverging,
        energy=torch.where(accept, energy_new, energy0),
        n_steps=steps,
    )
    return new.where(accept, current), info
