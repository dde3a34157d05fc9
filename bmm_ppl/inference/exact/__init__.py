"""Exact engines: conjugate and Gaussian-prior regression (``Exact``) and GP evidence (``GPEvidence``).

``isotropic_prior`` integrates ``w ~ N(0, alpha^-1 I)`` regression through one SVD (type-II over alpha
and beta is cheap); ``general_prior`` integrates a regression under any Gaussian prior (the multi-task
priors); ``type2`` maximises the evidence and reports boundary optima.
"""

from bmm_ppl.inference.exact.engine import Exact, OnBoundary
from bmm_ppl.inference.exact.gp_evidence import GPEvidence

__all__ = ["Exact", "GPEvidence", "OnBoundary"]
