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


class ShrunkCovariance:
    """Per-chain covariance of a window of draws ``Tensor[C, D]``, for a dense mass matrix: the sample
    covariance, measured in the coordinates that the current metric whitens, with its correlations there
    shrunk toward zero (variances kept) by the Schafer-Strimmer (2005) intensity.

    A covariance from ``n`` draws has rank below ``n``, and for ``n`` not much larger than ``D`` its small
    eigenvalues are far too small (Marchenko-Pastur), which would force a tiny step size. The intensity
    ``lambda = sum_{i != j} Var(r_ij) / sum_{i != j} r_ij^2`` over the sample correlations ``r_ij`` (so
    it does not depend on the coordinates' scales; clipped to [0, 1]) is estimated from the draws
    themselves: near 1 where the sample correlations are noise (short windows), near 0 where they are
    clear. Shrinking in the current metric's whitened coordinates ``u = L^-1 z`` (``M^-1 = L L^T``; the
    identity at first) keeps the structure already learnt: a strong correlation found by an earlier
    window is not shrunk away, only the noise around it. The draws of the window are kept
    (``C * n * D`` numbers).

    Args:
        like: Tensor[C, D], for shapes.
        inv_mass: the current metric, Tensor[C, D, D] (or diagonal Tensor[C, D]); ``None``: the identity.

    Example:
        >>> estimate = ShrunkCovariance(torch.zeros(1, 2))
        >>> for z in torch.randn(400, 1, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]]):
        ...     estimate.update(z)
        >>> covariance, intensity = estimate.shrunk_covariance()
        >>> covariance.shape, bool(intensity[0] < 0.05)
        (torch.Size([1, 2, 2]), True)
    """

    def __init__(self, like: torch.Tensor, inv_mass: torch.Tensor | None = None):
        self.draws: list[torch.Tensor] = []
        if inv_mass is not None and inv_mass.dim() == 2:
            inv_mass = torch.diag_embed(inv_mass)
        self.factor = None if inv_mass is None else torch.linalg.cholesky(inv_mass)  # (C, D, D) lower

    @property
    def count(self) -> int:
        return len(self.draws)

    def update(self, z: torch.Tensor) -> None:
        self.draws.append(z)

    def shrunk_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(covariance: Tensor[C, D, D], intensity: Tensor[C])``."""
        draws = torch.stack(self.draws, dim=1)  # (C, n, D)
        n = draws.shape[1]
        centred = draws - draws.mean(1, keepdim=True)
        if self.factor is not None:  # u = L^-1 z, row by row
            centred = torch.linalg.solve_triangular(self.factor, centred.transpose(-1, -2), upper=False).transpose(-1, -2)
        covariance = centred.transpose(-1, -2) @ centred / max(n - 1, 1)
        # On the standardised draws: Var(r_ij) = n / (n-1)^3 * sum_k (w_kij - mean_k w_kij)^2, with
        # w_kij = x_ki * x_kj and r_ij their sample correlation.
        scale = covariance.diagonal(dim1=-2, dim2=-1).sqrt().clamp(min=torch.finfo(draws.dtype).tiny)
        standardised = centred / scale.unsqueeze(-2)
        correlation = covariance / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
        squares = standardised * standardised
        sum_w2 = squares.transpose(-1, -2) @ squares
        mean_w = correlation * (n - 1) / n
        variance_of_entries = (sum_w2 - n * mean_w * mean_w).clamp(min=0) * n / max(n - 1, 1) ** 3
        off_diagonal = 1 - torch.eye(draws.shape[-1], dtype=draws.dtype, device=draws.device)
        numerator = (variance_of_entries * off_diagonal).sum((-1, -2))
        denominator = (correlation * correlation * off_diagonal).sum((-1, -2))
        intensity = torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(draws.dtype).tiny),
                                torch.ones_like(numerator)).clamp(0.0, 1.0)
        shrunk = covariance * (1 - intensity[:, None, None] * off_diagonal)
        if self.factor is not None:  # back: L S_u L^T
            shrunk = self.factor @ shrunk @ self.factor.transpose(-1, -2)
        return shrunk, intensity

    def regularised_variance(self) -> torch.Tensor:
        """Stan's regularisation of the shrunk covariance: ``n/(n+5) Sigma + 1e-3 * 5/(n+5) I``:
        Tensor[C, D, D] (symmetric)."""
        n = self.count
        covariance, _ = self.shrunk_covariance()
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
