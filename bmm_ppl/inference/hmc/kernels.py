"""The fixed-length HMC transition over a batch of chains (NUTS lives in :mod:`.nuts_kernel`).

``hmc_step(point, step_size, inv_mass, potential_and_grad, num_steps) -> (point, info)`` over
``Tensor[C, D]`` positions; chains advance independently but share every potential evaluation (one
batched call per leapfrog step). ``info`` holds ``Tensor[C]`` statistics: ``accept_prob``,
``diverging``, ``num_steps``.
"""

from __future__ import annotations

import math

import torch

from bmm_ppl.inference.hmc.integrator import PhasePoint, kinetic_energy, leapfrog, sample_momentum
from bmm_ppl.inference.hmc.nuts_kernel import MAX_ENERGY_ERROR


def hmc_step(
    point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor, potential_and_grad, num_steps: int = 10
) -> tuple[PhasePoint, dict[str, torch.Tensor]]:
    """One HMC transition of every chain: ``num_steps`` leapfrog steps and a Metropolis correction.

    Returns:
        ``(new_point, info)`` with ``info`` = ``{"accept_prob", "diverging", "num_steps"}``, each Tensor[C].
    """
    r0 = sample_momentum(point.z, inv_mass)
    current = PhasePoint(point.z, r0, point.potential, point.grad)
    energy0 = point.potential + kinetic_energy(r0, inv_mass)
    new = current
    diverging = torch.zeros_like(energy0, dtype=torch.bool)
    for _ in range(num_steps):
        new = leapfrog(new, step_size, inv_mass, potential_and_grad, ~diverging, point.z)
        delta = torch.nan_to_num(new.potential + kinetic_energy(new.r, inv_mass) - energy0, nan=math.inf)
        diverging = diverging | (delta > MAX_ENERGY_ERROR)
    delta = torch.nan_to_num(new.potential + kinetic_energy(new.r, inv_mass) - energy0, nan=math.inf)
    accept_prob = torch.where(diverging, torch.zeros_like(delta), torch.clamp(torch.exp(-delta), max=1.0))
    accept = torch.rand_like(accept_prob) < accept_prob
    info = {
        "accept_prob": accept_prob,
        "diverging": diverging,
        "num_steps": torch.full_like(energy0, float(num_steps)),
    }
    return new.where(accept, current), info
