"""Inference engines; each returns a :class:`Posterior`."""

from bmm_ppl.inference.errors import (
    DivergenceError,
    HyperparameterBoundaryError,
    HyperparameterBoundaryWarning,
    UnsupportedModelError,
)
from bmm_ppl.inference.evidence import Evidence, EvidenceMethod
from bmm_ppl.inference.exact import Exact, OnBoundary
from bmm_ppl.inference.latents import GaussianLatents, LatentDistribution
from bmm_ppl.inference.posterior import Posterior

__all__ = [
    "DivergenceError",
    "Evidence",
    "EvidenceMethod",
    "Exact",
    "GaussianLatents",
    "HyperparameterBoundaryError",
    "HyperparameterBoundaryWarning",
    "LatentDistribution",
    "OnBoundary",
    "Posterior",
    "UnsupportedModelError",
]
