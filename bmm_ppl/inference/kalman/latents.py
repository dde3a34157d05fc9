"""The smoothing posterior over a state trajectory, as a :class:`LatentDistribution` a Posterior draws from."""

from __future__ import annotations

import torch

from bmm_ppl.inference.kalman.filtering import backward_sampling_factors, sample_backward, FilterResult
from bmm_ppl.inference.latents import LATENT_DISTRIBUTIONS, LatentDistribution

_TENSORS = (
    "filtered_means",
    "filtered_covs",
    "predicted_means",
    "predicted_covs",
    "smoothed_means",
    "smoothed_covs",
    "gains",
)


class SmoothedStates(LatentDistribution):
    """``p(x_{1:T} | y_{1:T})`` of a linear-Gaussian state-space model, with its filtered and smoothed moments.

    Draws are joint trajectories (forward filtering, backward sampling), not independent marginals.

    Attributes:
        filtered_means: Tensor[*batch, T, n] (``x_t | y_{1:t}``).
        filtered_covs: Tensor[*batch, T, n, n] (``x_t | y_{1:t}``).
        predicted_means: ``x_t | y_{1:t-1}``, shaped as ``filtered_means``.
        predicted_covs: ``x_t | y_{1:t-1}``, shaped as ``filtered_covs``.
        smoothed_means: ``x_t | y_{1:T}``, shaped as ``filtered_means``.
        smoothed_covs: ``x_t | y_{1:T}``, shaped as ``filtered_covs``.
        gains: Tensor[*batch, T-1, n, n], the RTS gains.
        site: the name of the trajectory site in the model (``"states"``).

    Examples:
        >>> from bmm_ppl.inference.kalman.filtering import kalman_filter, rts_smoother
        >>> from bmm_ppl.models.state_space import LinearGaussianParams
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> f = kalman_filter(p, torch.zeros(5, 1)); s = rts_smoother(p, f)
        >>> SmoothedStates.from_results(f, s).sample(3)["states"].shape
        torch.Size([3, 5, 1])
    """

    kind = "kalman-smoothed-states"

    def __init__(self, site: str = "states", **tensors: torch.Tensor):
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"SmoothedStates needs {missing}")
        self.site = site
        for name in _TENSORS:
            setattr(self, name, tensors[name])
        self._factors = None

    @classmethod
    def from_results(cls, filtered: FilterResult, smoothed, site: str = "states") -> "SmoothedStates":
        return cls(
            site,
            filtered_means=filtered.filtered_means,
            filtered_covs=filtered.filtered_covs,
            predicted_means=filtered.predicted_means,
            predicted_covs=filtered.predicted_covs,
            smoothed_means=smoothed.smoothed_means,
            smoothed_covs=smoothed.smoothed_covs,
            gains=smoothed.gains,
        )

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        if self._factors is None:
            filtered = FilterResult(
                self.filtered_means.new_zeros(()), self.filtered_means, self.filtered_covs, self.predicted_means, self.predicted_covs
            )
            self._factors = backward_sampling_factors(filtered, self.gains)
        return {self.site: sample_backward(*self._factors, int(num_samples))}

    @property
    def site_shapes(self) -> dict[str, tuple]:
        return {self.site: tuple(self.smoothed_means.shape)}

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return {self.site: self.smoothed_means}

    def state_dict(self) -> dict:
        state = {"kind": self.kind, "site": self.site, "loc": self.smoothed_means}
        state.update({name: getattr(self, name) for name in _TENSORS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "SmoothedStates":
        return cls(state["site"], **{name: state[name] for name in _TENSORS})

    def to(self, device=None, dtype=None) -> "SmoothedStates":
        return SmoothedStates(self.site, **{name: getattr(self, name).to(device=device, dtype=dtype) for name in _TENSORS})


LATENT_DISTRIBUTIONS.setdefault(SmoothedStates.kind, SmoothedStates)
