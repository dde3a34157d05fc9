"""Distillation of Bayesian predictions into one network: Hinton's loss, ``distill`` from a Posterior, an
ensemble or a module, Bayesian Dark Knowledge, and data-free distillation from activation records."""

from bmm_ppl.distillation.dark_knowledge import BayesianDarkKnowledge, DarkKnowledgeResult
from bmm_ppl.distillation.data_free import (
    ActivationStatistics,
    record_activation_statistics,
    statistics_of,
    synthesize_inputs,
)
from bmm_ppl.distillation.student import DistillationResult, GaussianPerturbation, agreement, distill
from bmm_ppl.distillation.losses import (
    gaussian_distillation_loss,
    hinton_loss,
    mixture_moments,
    tempered_probabilities,
)
from bmm_ppl.distillation.teachers import (
    EnsembleTeacher,
    ModuleTeacher,
    PosteriorTeacher,
    Task,
    Teacher,
    TeacherPrediction,
    as_teacher,
)

__all__ = [
    "ActivationStatistics",
    "BayesianDarkKnowledge",
    "DarkKnowledgeResult",
    "DistillationResult",
    "EnsembleTeacher",
    "GaussianPerturbation",
    "ModuleTeacher",
    "PosteriorTeacher",
    "Task",
    "Teacher",
    "TeacherPrediction",
    "agreement",
    "as_teacher",
    "distill",
    "gaussian_distillation_loss",
    "hinton_loss",
    "mixture_moments",
    "record_activation_statistics",
    "statistics_of",
    "synthesize_inputs",
    "tempered_probabilities",
]
