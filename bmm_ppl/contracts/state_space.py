"""The matrices of a linear-Gaussian state-space model, and the small matrix helpers models and engines share.

Convention (statsmodels / Durbin--Koopman): the initial state describes the time of the first
observation::

    x_0 ~ N(initial_mean, initial_cov)
    y_t = H_t x_t + d_t + v_t,        v_t ~ N(0, R_t)
    x_{t+1} = F_t x_t + c_t + w_t,    w_t ~ N(0, Q_t)

Matrices are shared by a batch of series and are time-invariant (``[n, n]``) or time-varying
(``[T, n, n]``; entry ``t`` of a transition quantity maps ``x_t`` to ``x_{t+1}``, so its last entry is
unused). NaN entries of the observations are missing (see :func:`masked_observation`).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior


@dataclasses.dataclass(frozen=True)
class LinearGaussianParams:
    """The matrices of a linear-Gaussian state-space model (shapes above; ``n`` states, ``p`` outputs).

    Attributes:
        transition_matrix: Tensor[n, n] or Tensor[T, n, n] (``F``).
        observation_matrix: Tensor[p, n] or Tensor[T, p, n] (``H``).
        transition_cov: Tensor[n, n] or Tensor[T, n, n] (``Q``, the covariance of the state noise).
        observation_cov: Tensor[p, p] or Tensor[T, p, p] (``R``).
        initial_mean: Tensor[n], initial_cov: Tensor[n, n]: the state at the first observation.
        transition_offset: ``None`` or Tensor[*batch, T, n] (``c_t``, e.g. ``B u_t``).
        observation_offset: ``None`` or Tensor[*batch, T, p] (``d_t``, e.g. ``D u_t``).
    """

    transition_matrix: torch.Tensor
    observation_matrix: torch.Tensor
    transition_cov: torch.Tensor
    observation_cov: torch.Tensor
    initial_mean: torch.Tensor
    initial_cov: torch.Tensor
    transition_offset: torch.Tensor | None = None
    observation_offset: torch.Tensor | None = None

    @property
    def state_dim(self) -> int:
        return self.initial_mean.shape[-1]

    @property
    def obs_dim(self) -> int:
        return self.observation_matrix.shape[-2]


def symmetrise(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.mT)


def masked_observation(
    y: torch.Tensor, observation_matrix: torch.Tensor, observation_cov: torch.Tensor, offset: torch.Tensor | None
):
    """Applies the missing-data convention to one or all time steps.

    Args:
        y: Tensor[..., p] with NaN where missing.
        observation_matrix: Tensor[..., p, n].
        observation_cov: Tensor[..., p, p].
        offset: ``None`` or Tensor[..., p].

    Returns:
        ``(residual_base, H, R, num_observed)``: ``y - d`` with zeros where missing, the masked ``H`` and
        ``R``, and the number of observed components, all broadcast over the leading dimensions.
    """
    observed = ~torch.isnan(y)
    base = y if offset is None else y - offset
    base = torch.where(observed, base, torch.zeros_like(base))
    weight = observed.to(y.dtype)
    h = observation_matrix * weight.unsqueeze(-1)
    pair = weight.unsqueeze(-1) * weight.unsqueeze(-2)
    r = observation_cov * pair + torch.diag_embed(1.0 - weight)
    return base, h, r, weight.sum(-1)


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """A symmetric square root of a positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh(symmetrise(cov))
    return (vectors * values.clamp_min(0.0).sqrt().unsqueeze(-2)) @ vectors.mT


@dataclasses.dataclass(frozen=True)
class LearnedMatrix:
    """A matrix learned by type-II, starting from ``init`` (``None``: a default scaled to the data).

    ``diagonal=True`` (covariances only) learns the variances alone: the ``pyro.param`` is then the
    vector of diagonal entries.
    """

    init: Union[torch.Tensor, float, None] = None
    diagonal: bool = False


MatrixSpec = Union[Fixed, LearnedMatrix, Hyperprior]


@dataclasses.dataclass(frozen=True)
class StateSpaceForm:
    """The linear-Gaussian structure of a model run on data, which the ``Kalman`` engine integrates.

    Attributes:
        params: the matrices (learned ones as the current ``pyro.param`` values).
        observations: Tensor[*batch, T, p], NaN where missing.
        specs: ``{argument: spec}`` for each argument of :class:`LinearGaussianSSM`.
        transition_noise_loading: Tensor[n, k], so that the state noise covariance is ``L Q L^T``.
        states_site: the name of the trajectory site.
        obs_site: the name of the observation site.
    """

    params: LinearGaussianParams
    observations: torch.Tensor
    specs: dict
    transition_noise_loading: torch.Tensor
    states_site: str = "states"
    obs_site: str = "obs"
