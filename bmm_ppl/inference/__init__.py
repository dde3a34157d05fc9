"""Inference engines; each returns a :class:`Posterior`."""

from bmm_ppl.inference.errors import (
    DivergenceError,
    HyperparameterBoundaryError,
    HyperparameterBoundaryWarning,
    UnsupportedModelError,
)
from bmm_ppl.inference.evidence import Evidence, EvidenceMethod
from bmm_ppl.inference.exact import Exact, OnBoundary
from bmm_ppl.inference.gp_evidence import GPEvidence
from bmm_ppl.inference.guides import GuideLatents, StoredDrawLatents  # registers the "draws" kind for loading
from bmm_ppl.inference.iwae import iwae_bound
from bmm_ppl.inference.kalman import Kalman, SmoothedStates  # registers the smoothed-states kind for loading
from bmm_ppl.inference.latents import GaussianLatents, LatentDistribution
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.svi import SVI

__all__ = [
    "DivergenceError",
    "Evidence",
    "EvidenceMethod",
    "Exact",
    "GPEvidence",
    "GaussianLatents",
    "GuideLatents",
    "SVI",
    "StoredDrawLatents",
    "iwae_bound",
    "HyperparameterBoundaryError",
    "HyperparameterBoundaryWarning",
    "Kalman",
    "LatentDistribution",
    "SmoothedStates",
    "OnBoundary",
    "Posterior",
    "UnsupportedModelError",
]
