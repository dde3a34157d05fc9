"""The Laplace family: a Gaussian at the mode with the curvature as precision, and the Laplace evidence."""

from bmm_ppl.inference.laplace.engine import Laplace
from bmm_ppl.inference.laplace.predictive import linearised_predictive, probit_probabilities
from bmm_ppl.inference.laplace.structures import Curvature, HessianStructure, KFACApproximation

__all__ = ["Curvature", "HessianStructure", "KFACApproximation", "Laplace", "linearised_predictive", "probit_probabilities"]
