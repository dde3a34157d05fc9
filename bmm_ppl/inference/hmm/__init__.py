"""Discrete-state hidden Markov models: exact evidence, posterior marginals and the Viterbi path."""

from bmm_ppl.inference.hmm.forward_backward import hmm_forward, hmm_posterior_marginals, viterbi

__all__ = ["hmm_forward", "hmm_posterior_marginals", "viterbi"]
