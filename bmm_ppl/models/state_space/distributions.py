"""The two distributions a linear-Gaussian state-space model is written with, as Pyro sample sites.

``GaussMarkovChain`` is the prior over a whole state trajectory (one site, event ``(T, n)``), and
``LinearGaussianObservations`` the observations given that trajectory (event ``(T, p)``, NaN entries
missing). Writing each as one site keeps the program short, lets any engine see the states as one
latent, and lets the posterior's draws of the states be substituted in one piece.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from bmm_ppl.contracts.state_space import LinearGaussianParams, masked_observation, psd_sqrt, symmetrise


def _mv(matrix, vector):
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _time_indexed(matrix: torch.Tensor, steps: int, time_varying_dim: int) -> torch.Tensor:
    return matrix[:steps] if matrix.dim() == time_varying_dim else matrix.expand((steps,) + matrix.shape)


def _mvn_log_prob(residual: torch.Tensor, cov: torch.Tensor, name: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if cov.device.type != "meta" and bool((info > 0).any()):
        raise ValueError(
            f"{name} is singular, so the trajectory has no density; the Kalman engine integrates such "
            f"models exactly, other engines need a positive-definite {name}"
        )
    whitened = torch.linalg.solve_triangular(chol, residual.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (residual.shape[-1] * math.log(2 * math.pi) + log_det + whitened.pow(2).sum(-1))


class GaussMarkovChain(dist.TorchDistribution):
    """The prior ``x_0 ~ N(m0, P0)``, ``x_{t+1} ~ N(F_t x_t + c_t, Q_t)`` of a trajectory: event ``(T, n)``.

    Args:
        params: the model's matrices (observation ones are ignored).
        num_steps: T.
        batch_shape: the series' batch shape (transition offsets may carry it).

    Examples:
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> GaussMarkovChain(p, 5).sample().shape
        torch.Size([5, 1])
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, params: LinearGaussianParams, num_steps: int, batch_shape=torch.Size(), validate_args=None):
        self.params = params
        self.num_steps = int(num_steps)
        super().__init__(torch.Size(batch_shape), torch.Size((self.num_steps, params.state_dim)), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return GaussMarkovChain(self.params, self.num_steps, batch_shape)

    def rsample(self, sample_shape=torch.Size()):
        p = self.params
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        noise = p.initial_mean.new_empty(shape).normal_()
        f = _time_indexed(p.transition_matrix, self.num_steps, 3)
        q_sqrt = psd_sqrt(_time_indexed(p.transition_cov, self.num_steps, 3))
        state = p.initial_mean + _mv(psd_sqrt(p.initial_cov), noise[..., 0, :])
        states = [state]
        for t in range(self.num_steps - 1):
            state = _mv(f[t], state) + _mv(q_sqrt[t], noise[..., t + 1, :])
            if p.transition_offset is not None:
                state = state + p.transition_offset[..., t, :]
            states.append(state)
        return torch.stack(states, dim=-2)

    def log_prob(self, value):
        p = self.params
        f = _time_indexed(p.transition_matrix, self.num_steps - 1, 3)
        q = _time_indexed(p.transition_cov, self.num_steps - 1, 3)
        log_prob = _mvn_log_prob(value[..., 0, :] - p.initial_mean, p.initial_cov, "initial_cov")
        if self.num_steps > 1:
            predicted = _mv(f, value[..., :-1, :])
            if p.transition_offset is not None:
                predicted = predicted + p.transition_offset[..., : self.num_steps - 1, :]
            log_prob = log_prob + _mvn_log_prob(value[..., 1:, :] - predicted, q, "transition_cov").sum(-1)
        return log_prob


class LinearGaussianObservations(dist.TorchDistribution):
    """``y_t ~ N(H_t x_t + d_t, R_t)`` for a whole trajectory: event ``(T, p)``; NaN entries of the value are
    missing and contribute nothing to ``log_prob``.

    Args:
        params: the model's matrices (transition ones are ignored).
        states: Tensor[..., T, n].

    Examples:
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> y = torch.tensor([[0.5], [float("nan")]])
        >>> LinearGaussianObservations(p, torch.zeros(2, 1)).log_prob(y).shape
        torch.Size([])
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, params: LinearGaussianParams, states: torch.Tensor, validate_args=None):
        self.params = params
        self.states = states
        steps = states.shape[-2]
        self._h = _time_indexed(params.observation_matrix, steps, 3)
        self._r = _time_indexed(params.observation_cov, steps, 3)
        mean = _mv(self._h, states)
        if params.observation_offset is not None:
            mean = mean + params.observation_offset
        self.mean_ = mean
        super().__init__(mean.shape[:-2], mean.shape[-2:], validate_args=False)

    @property
    def mean(self):
        return self.mean_

    def expand(self, batch_shape, _instance=None):
        states = self.states.expand(torch.Size(batch_shape) + self.states.shape[-2:])
        return LinearGaussianObservations(self.params, states)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.mean_.shape
        noise = self.mean_.new_empty(shape).normal_()
        return self.mean_ + _mv(psd_sqrt(self._r), noise)

    def log_prob(self, value):
        base, h, r, num_observed = masked_observation(value, self._h, self._r, self.params.observation_offset)
        residual = base - _mv(h, self.states)
        # Masked components have residual 0 and unit variance: remove their log(2 pi) / 2.
        missing = value.shape[-1] - num_observed
        per_step = _mvn_log_prob(residual, symmetrise(r), "observation_cov") + 0.5 * missing * math.log(2 * math.pi)
        return per_step.sum(-1)
