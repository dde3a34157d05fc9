"""Invariance-augmented Gaussian processes: kernels averaged over input transformations, whose
invariance ranges are learned through the marginal likelihood (van der Wilk et al., 2018)."""

from bmm_ppl.models.invariance import _gpytorch  # noqa: F401  (first: quiet GPyTorch import)
from bmm_ppl.models.invariance.deep import FeatureKernel
from bmm_ppl.models.invariance.gp import GPRegression, InvariantExactGP, InvariantSVGP, kernel_matrix
from bmm_ppl.models.invariance.interdomain import InterDomainInvariantSVGP
from bmm_ppl.models.invariance.kernels import Estimator, InvariantKernel, uniform_log_density
from bmm_ppl.models.invariance.transforms import (
    AffineImageTransform,
    FiniteGroup,
    FunctionTransform,
    PermutationGroup,
    Transform,
    rot90_group,
)

__all__ = [
    "AffineImageTransform",
    "Estimator",
    "FeatureKernel",
    "FiniteGroup",
    "FunctionTransform",
    "GPRegression",
    "InterDomainInvariantSVGP",
    "InvariantExactGP",
    "InvariantKernel",
    "InvariantSVGP",
    "kernel_matrix",
    "PermutationGroup",
    "rot90_group",
    "Transform",
    "uniform_log_density",
]
