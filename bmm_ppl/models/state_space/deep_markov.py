"""A deep Markov model (Krishnan, Shalit & Sontag, 2017): neural transition and emission, amortised guide.

``z_t ~ N(z_{t-1} + f(z_{t-1}), diag(s(z_{t-1})^2))`` and ``y_t ~ N(g(z_t), diag(r(z_t)^2))``, with ``z_{-1}`` a
learned vector. The guide runs a GRU backwards over the observations and combines its state with the
previous latent, ``q(z_t | z_{t-1}, y_{t:T})``, so SVI (``Trace_ELBO``) trains both. NaN observation entries
are masked out of the likelihood and read as zeros by the guide.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


class DeepMarkovModel(nn.Module):
    """A deep Markov model over ``y: Tensor[B, T, p]``; use ``dmm.model`` and ``dmm.guide`` with Pyro's SVI.

    Args:
        obs_dim: p, the observation size.
        state_dim: the latent size.
        hidden_dim: width of the networks and the GRU.

    Sites: ``"z_t"`` (Tensor[B, state_dim]) and ``"y_t"`` (Tensor[B, p]) for each t, in a plate ``"series"``.

    Examples:
        >>> dmm = DeepMarkovModel(obs_dim=2, state_dim=3, hidden_dim=8)
        >>> with pyro.get_param_store().scope():
        ...     trace = pyro.poutine.trace(dmm.guide).get_trace(torch.randn(4, 5, 2))
        >>> trace.nodes["z_4"]["value"].shape
        torch.Size([4, 3])
    """

    def __init__(self, obs_dim: int, state_dim: int, hidden_dim: int = 32):
        super().__init__()
        self.state_dim = state_dim
        self.transition = _mlp(state_dim, hidden_dim, 2 * state_dim)
        self.emission = _mlp(state_dim, hidden_dim, 2 * obs_dim)
        self.encoder = nn.GRU(obs_dim, hidden_dim, batch_first=True)
        self.combiner = _mlp(state_dim + hidden_dim, hidden_dim, 2 * state_dim)
        self.z_initial = nn.Parameter(torch.zeros(state_dim))
        self.z_guide_initial = nn.Parameter(torch.zeros(state_dim))

    @staticmethod
    def _check(y: torch.Tensor) -> None:
        if not isinstance(y, torch.Tensor) or y.dim() != 3:
            raise ValueError(f"y must be Tensor[B, T, p], got {getattr(y, 'shape', type(y).__name__)}")

    def model(self, y: torch.Tensor) -> None:
        self._check(y)
        pyro.module("deep_markov_model", self)
        observed = ~torch.isnan(y)
        filled = torch.where(observed, y, torch.zeros_like(y))
        with pyro.plate("series", y.shape[0], dim=-1):
            z = self.z_initial.to(y).expand(y.shape[0], self.state_dim)
            for t in pyro.markov(range(y.shape[1])):
                step, raw_scale = self.transition(z).chunk(2, dim=-1)
                z = pyro.sample(f"z_{t}", dist.Normal(z + step, softplus(raw_scale) + 1e-4).to_event(1))
                loc, raw_scale = self.emission(z).chunk(2, dim=-1)
                likelihood = dist.Normal(loc, softplus(raw_scale) + 1e-4).mask(observed[:, t]).to_event(1)
                pyro.sample(f"y_{t}", likelihood, obs=filled[:, t])

    def guide(self, y: torch.Tensor) -> None:
        self._check(y)
        pyro.module("deep_markov_model", self)
        filled = torch.nan_to_num(y, nan=0.0)
        # Backwards GRU: its state at t summarises y_{t:T}.
        summary, _ = self.encoder(filled.flip(1))
        summary = summary.flip(1)
        with pyro.plate("series", y.shape[0], dim=-1):
            z = self.z_guide_initial.to(y).expand(y.shape[0], self.state_dim)
            for t in pyro.markov(range(y.shape[1])):
                loc, raw_scale = self.combiner(torch.cat([z, summary[:, t]], dim=-1)).chunk(2, dim=-1)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, softplus(raw_scale) + 1e-4).to_event(1))
