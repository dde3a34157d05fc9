"""Warm-up adaptation as in Stan: dual-averaging step size and windowed diagonal or dense mass matrix,
per chain, each as ``(init, update, final)`` functions over NamedTuple states (NumPyro's style).

All state is tensors over chains (``Tensor[C]`` / ``Tensor[C, D]``) on the chains' device; nothing here
synchronises with the host except :func:`find_reasonable_step_size`, which runs once per window.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bmm_ppl.inference.hmc.integrator import PhasePoint, kinetic_energy, leapfrog, sample_momentum


class DualAveragingState(NamedTuple):
    """Nesterov dual averaging of ``log step_size``, per chain (every field ``Tensor[C]`` except ``t``)."""

    log_step: torch.Tensor  # the current iterate: the step size of the next transition is exp(log_step)
    log_step_avg: torch.Tensor  # the weighted average the warm-up ends with
    error_avg: torch.Tensor  # the running mean of target - acceptance
    mu: torch.Tensor  # the shrinkage point log(10 * initial step size)
    t: int


def dual_averaging(target: float = 0.8, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75):
    """Dual-averaging step-size adaptation toward a target mean acceptance (Hoffman & Gelman 2014), as
    ``(init, update, final)`` functions (NumPyro's ``dual_averaging`` style).

    ``init(step_size: Tensor[C]) -> state``; ``update(state, accept_prob: Tensor[C]) -> state`` (the next
    step size is ``state.log_step.exp()``); ``final(state) -> Tensor[C]``, the averaged step size to sample
    with.

    Examples:
        >>> init, update, final = dual_averaging(target=0.8)
        >>> state = init(torch.ones(2))
        >>> for _ in range(50):
        ...     state = update(state, torch.full((2,), 0.99))  # too easy: the step grows
        >>> bool((state.log_step.exp() > 1).all()), final(state).shape
        (True, torch.Size([2]))
    """

    def init(step_size: torch.Tensor) -> DualAveragingState:
        zeros = torch.zeros_like(step_size)
        return DualAveragingState(torch.log(step_size), zeros, zeros.clone(), torch.log(10 * step_size), 0)

    def update(state: DualAveragingState, accept_prob: torch.Tensor) -> DualAveragingState:
        t = state.t + 1
        eta = 1.0 / (t + t0)
        accept = torch.nan_to_num(accept_prob, nan=0.0)
        error_avg = (1 - eta) * state.error_avg + eta * (target - accept)
        log_step = state.mu - math.sqrt(t) / gamma * error_avg
        weight = t ** (-kappa)
        log_step_avg = weight * log_step + (1 - weight) * state.log_step_avg
        return DualAveragingState(log_step, log_step_avg, error_avg, state.mu, t)

    def final(state: DualAveragingState) -> torch.Tensor:
        return torch.exp(state.log_step_avg)

    return init, update, final


class WelfordState(NamedTuple):
    """Running per-chain mean and sum of squared deviations of draws ``Tensor[C, D]``."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor


def welford_variance():
    """The diagonal metric's estimator, as ``(init, update, final)`` functions (NumPyro's
    ``welford_covariance(diagonal=True)`` style): Welford's running variance of a window's draws, per chain.

    ``init(like: Tensor[C, D], inv_mass=None) -> state`` (``inv_mass`` unused, for a common signature with
    :func:`shrunk_covariance_estimator`); ``update(state, z: Tensor[C, D]) -> state``; ``final(state)``:
    Stan's regularised estimate ``n/(n+5) var + 1e-3 * 5/(n+5)``, Tensor[C, D].

    Examples:
        >>> init, update, final = welford_variance()
        >>> state = init(torch.zeros(1, 2))
        >>> for z in torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]]):
        ...     state = update(state, z)
        >>> final(state)
        tensor([[0.5721, 0.0007]])
    """

    def init(like: torch.Tensor, inv_mass: torch.Tensor | None = None) -> WelfordState:
        return WelfordState(0, torch.zeros_like(like), torch.zeros_like(like))

    def update(state: WelfordState, z: torch.Tensor) -> WelfordState:
        count = state.count + 1
        delta = z - state.mean
        mean = state.mean + delta / count
        return WelfordState(count, mean, state.m2 + delta * (z - mean))

    def final(state: WelfordState) -> torch.Tensor:
        n = state.count
        variance = state.m2 / max(n - 1, 1)
        return (n / (n + 5.0)) * variance + 1e-3 * (5.0 / (n + 5.0))

    return init, update, final


class WindowDraws(NamedTuple):
    """A window's draws (each ``Tensor[C, D]``) and the current metric's lower Cholesky factor
    ``Tensor[C, D, D]`` (``None``: the identity)."""

    draws: tuple
    factor: torch.Tensor | None


def shrunk_covariance(window: WindowDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chain covariance of a window of draws for a dense mass matrix: the sample covariance, measured
    in the coordinates that the current metric whitens, with its correlations there shrunk toward zero
    (variances kept) by the Schafer-Strimmer (2005) intensity. Returns ``(covariance: Tensor[C, D, D],
    intensity: Tensor[C])``.

    A covariance from ``n`` draws has rank below ``n``, and for ``n`` not much larger than ``D`` its small
    eigenvalues are far too small (Marchenko-Pastur), which would force a tiny step size. The intensity
    ``lambda = sum_{i != j} Var(r_ij) / sum_{i != j} r_ij^2`` over the sample correlations ``r_ij`` (so
    it does not depend on the coordinates' scales; clipped to [0, 1]) is estimated from the draws
    themselves: near 1 where the sample correlations are noise (short windows), near 0 where they are
    clear. Shrinking in the current metric's whitened coordinates ``u = L^-1 z`` (``M^-1 = L L^T``; the
    identity at first) keeps the structure already learnt: a strong correlation found by an earlier
    window is not shrunk away, only the noise around it.

    Examples:
        >>> init, update, final = shrunk_covariance_estimator()
        >>> window = init(torch.zeros(1, 2))
        >>> for z in torch.randn(400, 1, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]]):
        ...     window = update(window, z)
        >>> covariance, intensity = shrunk_covariance(window)
        >>> covariance.shape, bool(intensity[0] < 0.05)
        (torch.Size([1, 2, 2]), True)
    """
    draws = torch.stack(window.draws, dim=1)  # (C, n, D)
    n = draws.shape[1]
    centred = draws - draws.mean(1, keepdim=True)
    if window.factor is not None:  # u = L^-1 z, row by row
        centred = torch.linalg.solve_triangular(window.factor, centred.transpose(-1, -2), upper=False).transpose(-1, -2)
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
    if window.factor is not None:  # back: L S_u L^T
        shrunk = window.factor @ shrunk @ window.factor.transpose(-1, -2)
    return shrunk, intensity


def shrunk_covariance_estimator():
    """The dense metric's estimator, as ``(init, update, final)`` functions: ``init(like: Tensor[C, D],
    inv_mass=None)`` (the current metric, ``Tensor[C, D, D]`` or diagonal ``Tensor[C, D]``, sets the
    coordinates of the shrinkage); ``update(state, z)`` keeps the draw (``C * n * D`` numbers per window);
    ``final(state)``: Stan's regularisation of :func:`shrunk_covariance`,
    ``n/(n+5) Sigma + 1e-3 * 5/(n+5) I``, Tensor[C, D, D] (symmetric)."""

    def init(like: torch.Tensor, inv_mass: torch.Tensor | None = None) -> WindowDraws:
        if inv_mass is not None and inv_mass.dim() == 2:
            inv_mass = torch.diag_embed(inv_mass)
        return WindowDraws((), None if inv_mass is None else torch.linalg.cholesky(inv_mass))

    def update(state: WindowDraws, z: torch.Tensor) -> WindowDraws:
        return WindowDraws(state.draws + (z,), state.factor)

    def final(state: WindowDraws) -> torch.Tensor:
        n = len(state.draws)
        covariance, _ = shrunk_covariance(state)
        covariance = 0.5 * (covariance + covariance.transpose(-1, -2))
        eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        return (n / (n + 5.0)) * covariance + 1e-3 * (5.0 / (n + 5.0)) * eye

    return init, update, final


def adaptation_windows(warmup_steps: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25) -> list[tuple[int, int]]:
    """Stan's slow-adaptation windows ``[(start, end), ...]`` (end exclusive) for the mass matrix.

    Examples:
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
