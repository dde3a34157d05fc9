"""Warm-up adaptation as in Stan: dual-averaging step size and windowed diagonal or dense mass matrix,
per chain.

All state is tensors over chains (``Tensor[C]`` / ``Tensor[C, D]``) on the chains' device; nothing here
synchronises with the host except :func:`find_reasonable_step_size`, which runs once per window.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bmm_ppl.inference.hmc.integrator import PhasePoint, kinetic_energy, leapfrog, sample_momentum


@dataclasses.dataclass
class DualAveraging:
    """Nesterov dual averaging of ``log step_size`` toward a target acceptance (Hoffman & Gelman 2014).

    Args:
        step_size: Tensor[C] the initial step size; ``mu = log(10 * step_size)``.
        target: the target mean acceptance probability.
    """

    step_size: torch.Tensor
    target: float = 0.8
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75

    def __post_init__(self):
        self.mu = torch.log(10 * self.step_size)
        self.log_step = torch.log(self.step_size)
        self.log_step_avg = torch.zeros_like(self.step_size)
        self.error_avg = torch.zeros_like(self.step_size)
        self.t = 0

    def update(self, accept_prob: torch.Tensor) -> torch.Tensor:
        """Takes the acceptance of the last transition (Tensor[C]); returns the next step size Tensor[C]."""
        self.t += 1
        eta = 1.0 / (self.t + self.t0)
        accept = torch.nan_to_num(accept_prob, nan=0.0)
        self.error_avg = (1 - eta) * self.error_avg + eta * (self.target - accept)
        self.log_step = self.mu - math.sqrt(self.t) / self.gamma * self.error_avg
        weight = self.t ** (-self.kappa)
        self.log_step_avg = weight * self.log_step + (1 - weight) * self.log_step_avg
        return torch.exp(self.log_step)

    def final_step_size(self) -> torch.Tensor:
        """The averaged step size to sample with after warm-up: Tensor[C]."""
        return torch.exp(self.log_step_avg)


class WelfordVariance:
    """Running per-chain mean and variance of draws ``Tensor[C, D]`` (Welford's algorithm)."""

    def __init__(self, like: torch.Tensor):
        self.count = 0
        self.mean = torch.zeros_like(like)
        self.m2 = torch.zeros_like(like)

    def update(self, z: torch.Tensor) -> None:
        self.count += 1
        delta = z - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (z - self.mean)

    def regularised_variance(self) -> torch.Tensor:
        """Stan's shrunk estimate ``n/(n+5) var + 1e-3 * 5/(n+5)``: Tensor[C, D]."""
        n = self.count
        variance = self.m2 / max(n - 1, 1)
        return (n / (n + 5.0)) * variance + 1e-3 * (5.0 / (n + 5.0))


class WelfordCovariance:
    """Running per-chain mean and covariance of draws ``Tensor[C, D]`` (Welford's algorithm), for a dense
    mass matrix.

    Example:
        >>> estimate = WelfordCovariance(torch.zeros(1, 2))
        >>> for z in torch.tensor([[[0.0, 0.0]], [[1.0, 2.0]], [[2.0, 4.0]]]):
        ...     estimate.update(z)
        >>> estimate.m2[0] / (estimate.count - 1)
        tensor([[1., 2.],
                [2., 4.]])
    """

    def __init__(self, like: torch.Tensor):
        self.count = 0
        self.mean = torch.zeros_like(like)
        self.m2 = like.new_zeros(like.shape + like.shape[-1:])

    def update(self, z: torch.Tensor) -> None:
        self.count += 1
        delta = z - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta.unsqueeze(-1) * (z - self.mean).unsqueeze(-2)

    def regularised_variance(self) -> torch.Tensor:
        """Stan's shrunk estimate ``n/(n+5) Sigma + 1e-3 * 5/(n+5) I``: Tensor[C, D, D] (symmetric)."""
        n = self.count
        covariance = self.m2 / max(n - 1, 1)
        covariance = 0.5 * (covariance + covariance.transpose(-1, -2))
        eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        return (n / (n + 5.0)) * covariance + 1e-3 * (5.0 / (n + 5.0)) * eye


def adaptation_windows(warmup_steps: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25) -> list[tuple[int, int]]:
    """Stan's slow-adaptation windows ``[(start, end), ...]`` (end exclusive) for the mass matrix.

    Example:
        >>> adaptation_windows(1000)
        [(75, 100), (100, 150), (150, 250), (250, 450), (450, 950)]
    """
    if warmup_steps < 20:
        return []
    if init_buffer + term_buffer + base_window > warmup_steps:
        init_buffer = int(0.15 * warmup_steps)
        term_buffer = int(0.1 * warmup_steps)
        base_window = warmup_steps - init_buffer - term_buffer
    windows, start, size = [], init_buffer, base_window
    end_of_slow = warmup_steps - term_buffer
    while start < end_of_slow:
        end = start + size
        if end + 2 * size > end_of_slow:  # the next window would not fit: stretch this one
            end = end_of_slow
        windows.append((start, end))
        start, size = end, 2 * size
    return windows


def find_reasonable_step_size(
    point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor, potential_and_grad, max_iterations: int = 50
) -> torch.Tensor:
    """Per chain, doubles or halves ``step_size`` until one leapfrog step's acceptance crosses 1/2
    (Hoffman & Gelman 2014, Algorithm 4): Tensor[C]."""
    log_half = math.log(0.5)
    r = sample_momentum(point.z, inv_mass)
    start = PhasePoint(point.z, r, point.potential, point.grad)
    energy0 = point.potential + kinetic_energy(r, inv_mass)

    def log_accept(eps):
        new = leapfrog(start, eps, inv_mass, potential_and_grad)
        delta = energy0 - (new.potential + kinetic_energy(new.r, inv_mass))
        return torch.nan_to_num(delta, nan=-math.inf)

    eps = step_size.clone()
    direction = torch.where(log_accept(eps) > log_half, 1.0, -1.0).to(eps.dtype)
    done = torch.zeros_like(eps, dtype=torch.bool)
    for _ in range(max_iterations):
        candidate = eps * torch.pow(torch.full_like(eps, 2.0), direction)
        accept = log_accept(candidate)
        crossed = torch.where(direction > 0, accept <= log_half, accept > log_half)
        # Going up, stop at the last step size still above 1/2; going down, at the first one above it.
        eps = torch.where(done | (crossed & (direction > 0)), eps, candidate)
        done = done | crossed
        if bool(done.all()):
            break
    return eps
