"""Bayesian linear regression over a feature map, as a Pyro program."""

from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch

from bmm_ppl.models.features import IdentityFeatures, PolynomialFeatures, RBFFeatures
from bmm_ppl.contracts.hyperparameters import as_hyperparameter, hyperparameter_site
from bmm_ppl.contracts.regression_forms import IsotropicRegressionForm
from bmm_ppl.validation import (
    as_real_valued,
    check_nonempty,
    check_same_device,
    check_same_float_dtype,
    check_same_length,
    check_tensor,
)

# Feature maps of real inputs: an integer x would make them compute in integers (powers that overflow,
# RBF centres truncated), so they get x as floating point.
_REAL_INPUT_FEATURES = (IdentityFeatures, PolynomialFeatures, RBFFeatures)


class BayesianLinearRegression:
    """Bayesian linear regression ``y = phi(x) @ w + eps`` as a Pyro program ``model(x, y=None)``.

    ``w ~ N(0, alpha^-1 I)`` and ``eps ~ N(0, beta^-1)``. Each precision is fixed (a number), learned by
    type-II maximisation of the evidence (``None``: a ``pyro.param`` site named ``"alpha"`` /
    ``"beta"``) or given a hyperprior (a distribution: a ``pyro.sample`` site).

    Args:
        features: a feature map ``x -> Tensor[n, d]`` (e.g. ``polynomial_features(3)``); by default the
            raw inputs with a constant.
        alpha: prior precision of the weights.
        beta: noise precision.

    Sites: ``"w"``: Tensor[d]; ``"obs"``: Tensor[n] in a plate ``"data"``; and ``"alpha"``, ``"beta"``
    where learned or given hyperpriors.

    Examples:
        >>> from bmm_ppl.models import polynomial_features
        >>> model = BayesianLinearRegression(polynomial_features(3), alpha=5e-3, beta=None)
        >>> trace = pyro.poutine.trace(model).get_trace(torch.linspace(0, 1, 10))
        >>> trace.nodes["obs"]["value"].shape
        torch.Size([10])
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor] | None = None, alpha=None, beta=None):
        self.features = features if features is not None else IdentityFeatures()
        self.alpha = as_hyperparameter("alpha", alpha)
        self.beta = as_hyperparameter("beta", beta)

    def _checked_data(self, x: torch.Tensor, y: torch.Tensor | None):
        """The design ``features(x)`` (floating point) and the targets ``y`` (floating point or ``None``).

        Integer or boolean ``x`` and ``y`` are real numbers here: they are converted to the floating dtype
        of the other argument (the default float dtype when neither is floating). The built-in feature
        maps get floating inputs; a custom feature map gets ``x`` as given (it may index a table) and an
        integer design it returns is converted.
        """
        check_tensor("x", x, dim=(1, 2))
        if y is not None:
            check_tensor("y", y, dim=1)
            check_same_length(x=x, y=y)
            check_same_device(x=x, y=y)
        check_nonempty("x", x)
        dtype = check_same_float_dtype(x=x, y=y) or torch.get_default_dtype()
        if isinstance(self.features, _REAL_INPUT_FEATURES):
            x = as_real_valued("x", x, dtype)
        y = None if y is None else as_real_valued("y", y, dtype)
        design = self.features(x)
        if not isinstance(design, torch.Tensor) or design.dim() != 2 or design.shape[0] != x.shape[0]:
            shape = tuple(design.shape) if isinstance(design, torch.Tensor) else type(design).__name__
            raise ValueError(f"features(x) must be Tensor[n, d] with n = len(x), got {shape}")
        design = as_real_valued("features(x)", design, dtype)
        if y is not None and design.dtype != y.dtype:
            raise ValueError(
                f"features(x) is {design.dtype} but y is {y.dtype}; the feature map must keep the dtype of the data"
            )
        return design, y

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        design, y = self._checked_data(x, y)
        alpha = hyperparameter_site("alpha", self.alpha, like=design)
        beta = hyperparameter_site("beta", self.beta, like=design)
        num_features = design.shape[-1]
        prior_scale = alpha.rsqrt().unsqueeze(-1).expand(alpha.shape + (num_features,))
        w = pyro.sample("w", dist.Normal(torch.zeros_like(prior_scale), prior_scale).to_event(1))
        # w is Tensor[d], or Tensor[S, 1, d] under a plate of posterior draws left of "data".
        mean = (design * w).sum(-1)
        with pyro.plate("data", design.shape[0], dim=-1, device=x.device):
            mean = pyro.deterministic("mean", mean)  # the output a Laplace GGN differentiates to
            return pyro.sample("obs", dist.Normal(mean, beta.rsqrt()), obs=y)

    def conjugate_form(self, x: torch.Tensor, y: torch.Tensor) -> IsotropicRegressionForm:
        """The structure that exact engines integrate; see :class:`IsotropicRegressionForm`."""
        if y is None:
            raise ValueError("y is required: the evidence is of observed data")
        design, y = self._checked_data(x, y)
        return IsotropicRegressionForm(design, y, self.alpha, self.beta)

    def __repr__(self) -> str:
        return f"BayesianLinearRegression({self.features!r}, alpha={self.alpha}, beta={self.beta})"
