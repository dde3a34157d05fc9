"""Analysis of fitted posteriors: ArviZ conversion, diagnostics, plots and uncertainty decomposition."""

from bmm_ppl.analysis.arviz_convert import from_groups, model_layout, to_arviz
from bmm_ppl.analysis.predictive_checks import loo_pit
from bmm_ppl.analysis.diagnostics import max_rhat, min_ess, summary
from bmm_ppl.analysis.plots import plot_pair, plot_posterior, plot_predictive_band, plot_trace
from bmm_ppl.analysis.uncertainty import (
    decompose_classification,
    decompose_regression,
    plot_uncertainty,
    uncertainty_decomposition,
)

__all__ = [
    "decompose_classification",
    "decompose_regression",
    "from_groups",
    "loo_pit",
    "max_rhat",
    "min_ess",
    "model_layout",
    "plot_pair",
    "plot_posterior",
    "plot_predictive_band",
    "plot_trace",
    "plot_uncertainty",
    "summary",
    "to_arviz",
    "uncertainty_decomposition",
]
