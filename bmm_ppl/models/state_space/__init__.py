"""State-space models as Pyro programs; the ``Kalman`` engine integrates the linear-Gaussian ones exactly."""

from bmm_ppl.models.state_space.continuous import ContinuousTimeSSM, Discretisation, discretise
from bmm_ppl.models.state_space.components import local_level, local_linear_trend, seasonal, structural_model
from bmm_ppl.models.state_space.deep_markov import DeepMarkovModel
from bmm_ppl.models.state_space.distributions import GaussMarkovChain, LinearGaussianObservations
from bmm_ppl.models.state_space.linear_gaussian import (
    LearnedMatrix,
    LinearGaussianSSM,
    check_covariance,
    diagonal,
)
from bmm_ppl.contracts.state_space import LinearGaussianParams

__all__ = [
    "ContinuousTimeSSM",
    "DeepMarkovModel",
    "Discretisation",
    "GaussMarkovChain",
    "LearnedMatrix",
    "LinearGaussianObservations",
    "LinearGaussianParams",
    "LinearGaussianSSM",
    "check_covariance",
    "diagonal",
    "discretise",
    "local_level",
    "local_linear_trend",
    "seasonal",
    "structural_model",
]
