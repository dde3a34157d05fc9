"""What regression models hand exact engines: the conjugate structure they integrate in closed form.

:class:`IsotropicRegressionForm` is the isotropic-prior model with its precisions as hyperparameter
specs (``Exact`` learns them by type-II through one SVD); :class:`GaussianPriorRegressionForm` is a
regression under any Gaussian prior (the multi-task priors), with its values resolved.
"""

from __future__ import annotations

import dataclasses

import torch

from bmm_ppl.contracts.hyperparameters import HyperparameterSpec


@dataclasses.dataclass(frozen=True)
class IsotropicRegressionForm:
    """The conjugate structure of a linear-Gaussian model: ``w ~ N(0, alpha^-1 I)``,
    ``y | w ~ N(design @ w, beta^-1 I)``. Engines that integrate exactly read it.

    Attributes:
        design: Tensor[n, d], the features of the inputs.
        targets: Tensor[n], the observations.
        alpha: the prior precision as a resolved hyperparameter spec.
        beta: the noise precision as a resolved hyperparameter spec.
        weight_site: the name of the weight site in the Pyro program.
        obs_site: the name of the observation site in the Pyro program.
    """

    design: torch.Tensor
    targets: torch.Tensor
    alpha: HyperparameterSpec
    beta: HyperparameterSpec
    weight_site: str = "w"
    obs_site: str = "obs"


@dataclasses.dataclass(frozen=True)
class GaussianPriorRegressionForm:
    """``theta ~ N(prior_mean, prior_covariance)``, ``y ~ N(design @ theta, diag(noise_variance))``.

    Attributes:
        design: Tensor[n, P].
        targets: Tensor[n].
        prior_mean: Tensor[P].
        prior_covariance: Tensor[P, P].
        noise_variance: Tensor[n].
        weight_site: the latent site holding ``theta`` (flattened).
    """

    design: torch.Tensor
    targets: torch.Tensor
    prior_mean: torch.Tensor
    prior_covariance: torch.Tensor
    noise_variance: torch.Tensor
    weight_site: str = "W"
