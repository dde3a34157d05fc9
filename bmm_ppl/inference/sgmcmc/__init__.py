"""Stochastic-gradient MCMC: SGLD, preconditioned SGLD and SGHMC updates and the ``SGLD`` engine."""

from bmm_ppl.inference.sgmcmc.engine import SGLD, SGMCMCMethod, polynomial_decay
from bmm_ppl.inference.sgmcmc.kernels import psgld_update, sghmc_update, sgld_update

__all__ = ["SGLD", "SGMCMCMethod", "polynomial_decay", "psgld_update", "sghmc_update", "sgld_update"]
