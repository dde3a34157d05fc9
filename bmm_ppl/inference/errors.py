"""Exceptions and warnings raised by the inference engines."""


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


class DivergenceError(RuntimeError):
    """Inference diverged (NaN or exploding objective, divergent trajectories)."""
