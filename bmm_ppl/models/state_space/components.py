"""Builders for structural time-series models (local level, local linear trend, seasonal).

Each returns a :class:`LinearGaussianSSM` whose state noise variances are learned as a diagonal
``transition_cov`` (one variance per stochastic component) unless given, exactly as statsmodels'
``UnobservedComponents`` parameterises them.
"""

from __future__ import annotations

import torch

from bmm_ppl.models.state_space.linear_gaussian import LinearGaussianSSM, diagonal


def structural_model(
    trend: bool = False,
    seasonal_period: int | None = None,
    *,
    transition_cov=None,
    observation_cov=None,
    initial_mean=None,
    initial_cov=None,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> LinearGaussianSSM:
    """A univariate structural model: a level, optionally a slope (``trend``) and a dummy seasonal.

    State order: level, [slope], [season_1 .. season_{s-1}]. The state noise has one variance per
    component (level, [slope], [season]), loaded onto the states by a fixed ``transition_noise_loading``.

    Args:
        trend: add a stochastic slope (local linear trend).
        seasonal_period: s >= 2 for a stochastic dummy seasonal with s - 1 states.
        transition_cov: the component variances, Tensor[k, k] fixed, or learned diagonal by default.
        observation_cov: Tensor[1, 1] fixed, or learned by default.
        initial_mean: the mean of the state at the first observation, learned by default.
        initial_cov: the covariance of the state at the first observation, learned by default.
        dtype: the dtype of the fixed structural matrices.
        device: the device of the fixed structural matrices.

    Examples:
        >>> structural_model(trend=True, seasonal_period=4).state_dim
        5
    """
    device = torch.device("cpu") if device is None else torch.device(device)  # fixed matrices follow the data at fit time
    blocks_f, loadings, h = [], [], []
    new = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    level = new(1, 1) + 1.0
    if trend:
        blocks_f.append(torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=dtype, device=device))
        loadings.append(torch.eye(2, dtype=dtype, device=device))
        h.append(torch.tensor([[1.0, 0.0]], dtype=dtype, device=device))
    else:
        blocks_f.append(level)
        loadings.append(new(1, 1) + 1.0)
        h.append(new(1, 1) + 1.0)
    if seasonal_period is not None:
        s = int(seasonal_period)
        if s < 2:
            raise ValueError(f"seasonal_period must be at least 2, got {seasonal_period}")
        f = new(s - 1, s - 1)
        f[0, :] = -1.0
        if s > 2:
            f[1:, :-1] = torch.eye(s - 2, dtype=dtype, device=device)
        blocks_f.append(f)
        load = new(s - 1, 1)
        load[0, 0] = 1.0
        loadings.append(load)
        row = new(1, s - 1)
        row[0, 0] = 1.0
        h.append(row)
    return LinearGaussianSSM(
        torch.block_diag(*blocks_f),
        torch.cat(h, dim=-1),
        diagonal() if transition_cov is None else transition_cov,
        observation_cov,
        initial_mean,
        initial_cov,
        transition_noise_loading=torch.block_diag(*loadings),
    )


def local_level(**kwargs) -> LinearGaussianSSM:
    """``y_t = mu_t + eps_t``, ``mu_{t+1} = mu_t + eta_t``; keywords as :func:`structural_model`.

    Examples:
        >>> local_level(initial_mean=torch.zeros(1, dtype=torch.float64)).state_dim
        1
    """
    return structural_model(trend=False, seasonal_period=None, **kwargs)


def local_linear_trend(**kwargs) -> LinearGaussianSSM:
    """Level and slope, each with its own noise variance; keywords as :func:`structural_model`."""
    return structural_model(trend=True, seasonal_period=None, **kwargs)


def seasonal(period: int, **kwargs) -> LinearGaussianSSM:
    """A local level plus a stochastic dummy seasonal of the given period; keywords as :func:`structural_model`."""
    return structural_model(trend=False, seasonal_period=period, **kwargs)
