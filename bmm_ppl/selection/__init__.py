"""Model selection: ranking by evidence and Bayesian model averaging."""

from bmm_ppl.selection.compare import Comparison, IncompatibleEvidenceError, compare

__all__ = ["Comparison", "IncompatibleEvidenceError", "compare"]
