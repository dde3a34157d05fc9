"""What a Gaussian-process model hands an exact GP engine."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class GaussianProcessForm:
    """What an exact GP engine needs: the prior covariance at the data, the noise and the targets.

    Attributes:
        covariance: Tensor[n, n] prior covariance of ``f`` at the inputs (jitter included).
        noise: Tensor[] observation noise variance ``σ²``.
        targets: Tensor[n] or Tensor[n, C] (C independent outputs sharing the kernel).
        latent_site: the name of the site holding ``f`` (shaped like ``targets.T``).
    """

    covariance: torch.Tensor
    noise: torch.Tensor
    targets: torch.Tensor | None
    latent_site: str = "f"
