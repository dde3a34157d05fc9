"""Models as Pyro programs, and builders for the common ones."""

from bmm_ppl.models.bnn import BayesianNeuralNetwork, Likelihood, WeightPrior
from bmm_ppl.models.features import IdentityFeatures, PolynomialFeatures, RBFFeatures, polynomial_features, rbf_features
from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior, Learned, as_hyperparameter, hyperparameter_site
from bmm_ppl.models.linear_regression import BayesianLinearRegression
from bmm_ppl.models.state_space import (
    ContinuousTimeSSM,
    DeepMarkovModel,
    LinearGaussianSSM,
    diagonal,
    local_level,
    local_linear_trend,
    seasonal,
    structural_model,
)
from bmm_ppl.models.multitask import (
    HierarchicalTasks,
    IndependentTasks,
    MultiTaskRegression,
    RelatedTasks,
    SharedTask,
    TaskStructure,
    task_correlation,
)

__all__ = [
    "BayesianLinearRegression",
    "ContinuousTimeSSM",
    "DeepMarkovModel",
    "LinearGaussianSSM",
    "diagonal",
    "local_level",
    "local_linear_trend",
    "seasonal",
    "structural_model",
    "BayesianNeuralNetwork",
    "Likelihood",
    "WeightPrior",
    "HierarchicalTasks",
    "IndependentTasks",
    "MultiTaskRegression",
    "RelatedTasks",
    "SharedTask",
    "TaskStructure",
    "task_correlation",
    "Fixed",
    "Hyperprior",
    "IdentityFeatures",
    "Learned",
    "PolynomialFeatures",
    "RBFFeatures",
    "as_hyperparameter",
    "hyperparameter_site",
    "polynomial_features",
    "rbf_features",
]


_INVARIANCE_EXPORTS = ("InvariantKernel", "AffineImageTransform", "FunctionTransform", "FiniteGroup", "GPRegression")


def __getattr__(name):
    # The invariant-kernel models import GPyTorch: load them only when asked for.
    if name in _INVARIANCE_EXPORTS:
        from bmm_ppl.models import invariance

        return getattr(invariance, name)
    raise AttributeError(f"module 'bmm_ppl.models' has no attribute {name!r}")
