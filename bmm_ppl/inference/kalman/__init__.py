"""Exact Kalman filtering, smoothing and type-II learning for linear-Gaussian state-space models."""

from bmm_ppl.inference.kalman.engine import FilterMethod, Kalman, Learning, filter_and_smooth, log_likelihood
from bmm_ppl.inference.kalman.filtering import FilterResult, SmootherResult, kalman_filter, rts_smoother
from bmm_ppl.inference.kalman.latents import SmoothedStates
from bmm_ppl.inference.kalman.nonlinear import extended_kalman_filter, unscented_kalman_filter
from bmm_ppl.inference.kalman.parallel import associative_scan, parallel_kalman_filter, parallel_rts_smoother
from bmm_ppl.inference.kalman.steady_state import steady_state_log_likelihood

__all__ = [
    "FilterMethod",
    "FilterResult",
    "Kalman",
    "Learning",
    "SmoothedStates",
    "SmootherResult",
    "associative_scan",
    "extended_kalman_filter",
    "filter_and_smooth",
    "kalman_filter",
    "log_likelihood",
    "parallel_kalman_filter",
    "parallel_rts_smoother",
    "rts_smoother",
    "steady_state_log_likelihood",
    "unscented_kalman_filter",
]
