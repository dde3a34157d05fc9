"""Inference engines; each returns a :class:`Posterior`."""

from bmm_ppl.inference.bridge import bridge_sampling
from bmm_ppl.inference.errors import (
    ChainDiagnosticsWarning,
    ConvergenceWarning,
    DivergenceError,
    HyperparameterBoundaryError,
    HyperparameterBoundaryWarning,
    UnsupportedModelError,
)
from bmm_ppl.inference.evidence import Evidence, EvidenceMethod, NonFiniteEvidenceError
from bmm_ppl.inference.exact.engine import Exact, OnBoundary
from bmm_ppl.inference.exact.gp_evidence import GPEvidence
from bmm_ppl.inference.hmc import HMC, NUTS, DivergentTransitionWarning
from bmm_ppl.inference.svi.guides import GuideLatents, StoredDrawLatents  # registers the "draws" kind for loading
from bmm_ppl.inference.svi.iwae import iwae_bound
from bmm_ppl.inference.kalman import Kalman, SmoothedStates  # registers the smoothed-states kind for loading
from bmm_ppl.inference.laplace import Curvature, HessianStructure, Laplace
from bmm_ppl.inference.latents import DiagonalGaussianLatents, GaussianLatents, LatentDistribution
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.sgmcmc import SGLD, polynomial_decay
from bmm_ppl.inference.svi.engine import SVI

__all__ = [
    "Curvature",
    "DiagonalGaussianLatents",
    "HessianStructure",
    "Laplace",
    "ChainDiagnosticsWarning",
    "ConvergenceWarning",
    "DivergenceError",
    "DivergentTransitionWarning",
    "Evidence",
    "NonFiniteEvidenceError",
    "EvidenceMethod",
    "Exact",
    "GPEvidence",
    "GaussianLatents",
    "GuideLatents",
    "HMC",
    "NUTS",
    "SGLD",
    "bridge_sampling",
    "polynomial_decay",
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
