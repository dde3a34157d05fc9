"""Stochastic variational inference: the engine, its functional core, guides, data handling and the
importance-weighted bound."""

from bmm_ppl.inference.svi.engine import SVI
from bmm_ppl.inference.svi.guides import GuideLatents, StoredDrawLatents
from bmm_ppl.inference.svi.iwae import iwae_bound

__all__ = ["SVI", "GuideLatents", "StoredDrawLatents", "iwae_bound"]
