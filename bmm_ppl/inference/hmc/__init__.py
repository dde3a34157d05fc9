"""Hamiltonian Monte Carlo: a functional core (leapfrog, NUTS/HMC transitions, Stan-style adaptation)
batched over chains, and the ``NUTS`` / ``HMC`` engines that wrap it."""

from bmm_ppl.inference.hmc.engine import HMC, NUTS, DivergentTransitionWarning
from bmm_ppl.inference.hmc.kernels import HMCInfo, hmc_step
from bmm_ppl.inference.hmc.nuts_kernel import NUTSInfo, NUTSKernel, nuts_step

__all__ = ["HMC", "NUTS", "DivergentTransitionWarning", "HMCInfo", "NUTSInfo", "NUTSKernel", "hmc_step", "nuts_step"]
