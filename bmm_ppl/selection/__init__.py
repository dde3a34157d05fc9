"""Model selection: ranking by evidence, Bayesian model averaging, hyperparameter optimisation."""

from bmm_ppl.selection.bilevel import (
    BilevelProblem,
    BilevelResult,
    HyperparameterOptimiser,
    Implicit,
    Unrolled,
    per_parameter_weight_decay,
)
from bmm_ppl.selection.comparison import Comparison, IncompatibleEvidenceError, compare
from bmm_ppl.selection.hypergradients import InverseHVP, implicit_hypergradient, unrolled_hypergradient
from bmm_ppl.selection.training_speed import TrainingSpeed

__all__ = [
    "BilevelProblem",
    "BilevelResult",
    "Comparison",
    "HyperparameterOptimiser",
    "Implicit",
    "IncompatibleEvidenceError",
    "InverseHVP",
    "TrainingSpeed",
    "Unrolled",
    "compare",
    "implicit_hypergradient",
    "per_parameter_weight_decay",
    "unrolled_hypergradient",
]
