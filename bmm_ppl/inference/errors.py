"""Exceptions and warnings raised by the inference engines."""

from bmm_ppl._enums import StrEnum


class UnsupportedModelError(TypeError):
    """The engine cannot handle the structure of the given model."""


class HyperparameterBoundaryError(RuntimeError):
    """Type-II optimisation ran a hyperparameter off to the boundary of its domain.

    The evidence has no interior maximum: the "optimum" is a limit (for example ``alpha -> inf``,
    i.e. the data prefer a model without signal), so no meaningful point estimate exists.
    """

    def __init__(self, message: str, boundary: dict):
        super().__init__(message)
        self.boundary = boundary


class HyperparameterBoundaryWarning(UserWarning):
    """Issued instead of :class:`HyperparameterBoundaryError` when the engine is asked to clip."""


class OnBoundary(StrEnum):
    """What a type-II engine (``Exact``, ``Kalman``) does when a learned hyperparameter's evidence
    supremum is a limit (a boundary of its domain) rather than an interior optimum."""

    RAISE = "raise"  # raise HyperparameterBoundaryError
    CLIP = "clip"  # warn (HyperparameterBoundaryWarning), and return the fit at the last value reached


class DivergenceError(RuntimeError):
    """Inference diverged (NaN or exploding objective, divergent trajectories)."""


class ConvergenceWarning(UserWarning):
    """An iterative fit (SVI, type-II optimisation, Kalman or GP learning, distillation) stopped before
    its convergence test passed; the message names what to change (more steps, another lr, ...)."""


class ChainDiagnosticsWarning(UserWarning):
    """A sampler's chains failed their checks at the end of a run: split R-hat above 1.01 or too few
    effective samples per chain (bulk or tail ESS below 100), as Stan and NumPyro's summary flag them."""


class PriorSamplingWarning(UserWarning):
    """The prior or prior-predictive draws for an ArviZ conversion could not be made (a ``pyro.factor``
    term or an improper prior); the groups are left out rather than filled with draws of another prior."""
