"""Analysis of fitted posteriors: ArviZ conversion, diagnostics and plots."""

from bmm_ppl.analysis.arviz_convert import from_groups, to_arviz

__all__ = ["from_groups", "to_arviz"]
