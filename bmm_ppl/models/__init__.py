"""Models as Pyro programs, and builders for the common ones."""

from bmm_ppl.models.bnn import BayesianNeuralNetwork, Likelihood, WeightPrior
from bmm_ppl.models.features import IdentityFeatures, PolynomialFeatures, RBFFeatures, polynomial_features, rbf_features
from bmm_ppl.models.hyperparameters import Fixed, Hyperprior, Learned, as_hyperparameter, hyperparameter_site
from bmm_ppl.models.linear_regression import BayesianLinearRegression, LinearGaussianForm
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
    GaussianLinearForm,
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
    "GaussianLinearForm",
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
    "LinearGaussianForm",
    "PolynomialFeatures",
    "RBFFeatures",
    "as_hyperparameter",
    "hyperparameter_site",
    "polynomial_features",
    "rbf_features",
]
