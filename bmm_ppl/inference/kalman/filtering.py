"""Sequential Kalman filtering with exact log-likelihood, RTS smoothing and posterior sampling.

Plain functions of (params, observations), as in dynamax: the engine and the models only call them.

Convention (statsmodels / Durbin--Koopman): the initial state describes the time of the first
observation::

    x_0 ~ N(initial_mean, initial_cov)
    y_t = H_t x_t + d_t + v_t,        v_t ~ N(0, R_t)
    x_{t+1} = F_t x_t + c_t + w_t,    w_t ~ N(0, Q_t)

Observations are ``Tensor[*batch, T, p]`` and the matrices are shared by the batch, each either
time-invariant (``[n, n]``) or time-varying (``[T, n, n]``: entry ``t`` of a transition quantity maps
``x_t`` to ``x_{t+1}``, so its last entry is unused). NaN entries of ``y`` are missing: the masked
components get a zero row of ``H`` and a unit variance uncorrelated with the rest, which leaves the
update and the likelihood of the observed components exactly as if they had been dropped.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bmm_ppl.contracts.state_space import LinearGaussianParams, masked_observation, psd_sqrt, symmetrise


@dataclasses.dataclass(frozen=True)
class FilterResult:
    """Output of :func:`kalman_filter`.

    Attributes:
        log_likelihood: Tensor[*batch], ``log p(y_{1:T})`` of each series.
        filtered_means: Tensor[*batch, T, n], ``E[x_t | y_{1:t}]``.
        filtered_covs: Tensor[*batch, T, n, n], ``Cov[x_t | y_{1:t}]``.
        predicted_means: Tensor[*batch, T, n], ``E[x_t | y_{1:t-1}]``.
        predicted_covs: Tensor[*batch, T, n, n], ``Cov[x_t | y_{1:t-1}]``.
    """

    log_likelihood: torch.Tensor
    filtered_means: torch.Tensor
    filtered_covs: torch.Tensor
    predicted_means: torch.Tensor
    predicted_covs: torch.Tensor


@dataclasses.dataclass(frozen=True)
class SmootherResult:
    """Output of :func:`rts_smoother`.

    Attributes:
        smoothed_means: Tensor[*batch, T, n], ``E[x_t | y_{1:T}]``.
        smoothed_covs: Tensor[*batch, T, n, n], ``Cov[x_t | y_{1:T}]``.
        gains: Tensor[*batch, T - 1, n, n], the RTS gains ``G_t = P_{t|t} F_t^T P_{t+1|t}^{-1}``.
    """

    smoothed_means: torch.Tensor
    smoothed_covs: torch.Tensor
    gains: torch.Tensor


def at_time(matrix: torch.Tensor, t: int, time_varying_dim: int) -> torch.Tensor:
    """``matrix[t]`` for a time-varying matrix (``matrix.dim() == time_varying_dim``), else ``matrix``."""
    return matrix[t] if matrix.dim() == time_varying_dim else matrix


def gaussian_update(mean, cov, residual_base, h, r, num_observed):
    """One measurement update in Joseph form, with the log-likelihood of the innovation.

    Args:
        mean: Tensor[..., n].
        cov: Tensor[..., n, n].
        residual_base: Tensor[..., p] (``y - d``, masked).
        h: Tensor[..., p, n].
        r: Tensor[..., p, p].
        num_observed: Tensor[...].

    Returns:
        ``(mean, cov, log_likelihood)`` after conditioning on the observation.
    """
    innovation = residual_base - (h @ mean.unsqueeze(-1)).squeeze(-1)
    hp = h @ cov
    s = symmetrise(hp @ h.mT + r)
    chol = torch.linalg.cholesky(s)
    gain = torch.cholesky_solve(hp, chol).mT  # P H^T S^-1
    mean = mean + (gain @ innovation.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    a = eye - gain @ h
    cov = symmetrise(a @ cov @ a.mT + gain @ r @ gain.mT)
    whitened = torch.linalg.solve_triangular(chol, innovation.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
    log_likelihood = -0.5 * (num_observed * math.log(2 * math.pi) + log_det + whitened.pow(2).sum(-1))
    return mean, cov, log_likelihood


def kalman_filter(params: LinearGaussianParams, y: torch.Tensor) -> FilterResult:
    """Runs the Kalman filter over ``y: Tensor[*batch, T, p]`` (NaN = missing) and returns the exact
    log-likelihood with the filtered and one-step predicted moments.

    Examples:
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> kalman_filter(p, torch.zeros(5, 1)).filtered_means.shape
        torch.Size([5, 1])
    """
    steps = y.shape[-2]
    batch = y.shape[:-2]
    mean = params.initial_mean.expand(batch + params.initial_mean.shape[-1:])
    cov = params.initial_cov.expand(batch + params.initial_cov.shape[-2:])
    log_likelihood = y.new_zeros(batch)
    filtered_means, filtered_covs, predicted_means, predicted_covs = [], [], [], []
    for t in range(steps):
        if t > 0:
            f = at_time(params.transition_matrix, t - 1, 3)
            mean = (f @ mean.unsqueeze(-1)).squeeze(-1)
            if params.transition_offset is not None:
                mean = mean + params.transition_offset[..., t - 1, :]
            cov = symmetrise(f @ cov @ f.mT + at_time(params.transition_cov, t - 1, 3))
        predicted_means.append(mean)
        predicted_covs.append(cov)
        offset = None if params.observation_offset is None else params.observation_offset[..., t, :]
        base, h, r, num_observed = masked_observation(
            y[..., t, :], at_time(params.observation_matrix, t, 3), at_time(params.observation_cov, t, 3), offset
        )
        mean, cov, step_log_likelihood = gaussian_update(mean, cov, base, h, r, num_observed)
        log_likelihood = log_likelihood + step_log_likelihood
        filtered_means.append(mean)
        filtered_covs.append(cov)
    stack = lambda values: torch.stack(values, dim=len(batch))  # noqa: E731
    return FilterResult(
        log_likelihood,
        stack(filtered_means),
        stack(filtered_covs),
        stack(predicted_means),
        stack(predicted_covs),
    )


def smoother_gains(params: LinearGaussianParams, filtered: FilterResult) -> torch.Tensor:
    """RTS gains ``G_t = P_{t|t} F_t^T P_{t+1|t}^{-1}`` for t < T, all at once: Tensor[*batch, T-1, n, n]."""
    steps = filtered.filtered_means.shape[-2]
    f = params.transition_matrix
    f = f[: steps - 1] if f.dim() == 3 else f
    cross = f @ filtered.filtered_covs[..., :-1, :, :]  # F_t P_{t|t}
    return torch.linalg.solve(filtered.predicted_covs[..., 1:, :, :], cross).mT


def rts_smoother(params: LinearGaussianParams, filtered: FilterResult) -> SmootherResult:
    """Rauch--Tung--Striebel smoothing of a :func:`kalman_filter` result.

    Examples:
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> rts_smoother(p, kalman_filter(p, torch.zeros(5, 1))).smoothed_covs.shape
        torch.Size([5, 1, 1])
    """
    gains = smoother_gains(params, filtered)
    steps = filtered.filtered_means.shape[-2]
    mean = filtered.filtered_means[..., -1, :]
    cov = filtered.filtered_covs[..., -1, :, :]
    means, covs = [mean], [cov]
    for t in range(steps - 2, -1, -1):
        g = gains[..., t, :, :]
        mean = filtered.filtered_means[..., t, :] + (
            g @ (mean - filtered.predicted_means[..., t + 1, :]).unsqueeze(-1)
        ).squeeze(-1)
        cov = symmetrise(filtered.filtered_covs[..., t, :, :] + g @ (cov - filtered.predicted_covs[..., t + 1, :, :]) @ g.mT)
        means.append(mean)
        covs.append(cov)
    dim = filtered.filtered_means.dim() - 2
    return SmootherResult(torch.stack(means[::-1], dim=dim), torch.stack(covs[::-1], dim=dim), gains)


def backward_sampling_factors(filtered: FilterResult, gains: torch.Tensor):
    """The conditionals ``x_t | x_{t+1}, y_{1:T}`` of the smoothing posterior.

    Returns:
        ``(shift, gains, scales, last_mean, last_scale)``: ``x_t = shift_t + G_t x_{t+1} + scale_t z``
        with ``shift_t = m_{t|t} - G_t m_{t+1|t}`` (Tensor[*batch, T-1, n]), ``scale_t`` a square root of
        ``P_{t|t} - G_t P_{t+1|t} G_t^T``, and ``x_T ~ N(last_mean, last_scale last_scale^T)``.
    """
    shift = filtered.filtered_means[..., :-1, :] - (gains @ filtered.predicted_means[..., 1:, :].unsqueeze(-1)).squeeze(-1)
    conditional = filtered.filtered_covs[..., :-1, :, :] - gains @ filtered.predicted_covs[..., 1:, :, :] @ gains.mT
    return shift, gains, psd_sqrt(conditional), filtered.filtered_means[..., -1, :], psd_sqrt(filtered.filtered_covs[..., -1, :, :])


def sample_backward(shift, gains, scales, last_mean, last_scale, num_samples: int) -> torch.Tensor:
    """Draws ``Tensor[num_samples, *batch, T, n]`` from the smoothing posterior (forward filtering, backward sampling)."""
    noise = last_mean.new_empty((num_samples,) + shift.shape[:-2] + (shift.shape[-2] + 1, shift.shape[-1])).normal_()
    state = last_mean + (last_scale @ noise[..., -1, :].unsqueeze(-1)).squeeze(-1)
    states = [state]
    for t in range(shift.shape[-2] - 1, -1, -1):
        state = (
            shift[..., t, :]
            + (gains[..., t, :, :] @ state.unsqueeze(-1)).squeeze(-1)
            + (scales[..., t, :, :] @ noise[..., t, :].unsqueeze(-1)).squeeze(-1)
        )
        states.append(state)
    return torch.stack(states[::-1], dim=-2)
