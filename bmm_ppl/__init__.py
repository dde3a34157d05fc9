"""bmm_ppl: Bayesian multimodeling on Pyro — choose, combine and compress models by Bayesian inference."""

from bmm_ppl._version import __version__
from bmm_ppl.inference import Evidence, Exact, Posterior
from bmm_ppl.selection import Comparison, compare

__all__ = ["Comparison", "Evidence", "Exact", "Posterior", "__version__", "compare"]
