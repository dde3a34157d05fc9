"""The log evidence of a model, tagged with the method that produced it."""

from __future__ import annotations

import dataclasses
import math

from bmm_ppl._enums import StrEnum


class EvidenceMethod(StrEnum):
    """What an evidence number is. Only ``EXACT`` is the evidence itself; the others estimate or bound it."""

    EXACT = "exact"
    ELBO = "elbo"
    IWAE = "iwae"
    LAPLACE = "laplace"
    BRIDGE = "bridge"
    TRAINING_SPEED = "training-speed"
    # The mean of exact evidences over random approximations of the model (e.g. a Monte-Carlo invariant
    # kernel): noisy, and biased against the evidence of the averaged model (Jensen), so ranked only
    # against its own kind.
    MONTE_CARLO = "monte-carlo"

    @property
    def is_lower_bound(self) -> bool:
        return self in (EvidenceMethod.ELBO, EvidenceMethod.IWAE)

    @property
    def kind(self) -> str:
        """Methods of one kind give numbers that can be ranked against each other."""
        if self in (EvidenceMethod.TRAINING_SPEED, EvidenceMethod.MONTE_CARLO):
            return self.value
        if self.is_lower_bound:
            return "lower-bound"
        return "estimate-of-log-evidence"


class NonFiniteEvidenceError(ValueError):
    """A log evidence came out as -inf, +inf or NaN. ``model`` names the model where it is known (set by
    :func:`~bmm_ppl.selection.compare`); ``method`` is the evidence method."""

    def __init__(self, message: str, method: str | None = None, model: str | None = None):
        super().__init__(message)
        self.method = method
        self.model = model


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A log evidence ``log p(data | model)``, a total over the data set (never a per-point mean).

    Args:
        value: the log evidence in nats.
        stderr: its Monte-Carlo standard error, ``None`` when the number is exact or deterministic.
        method: an :class:`EvidenceMethod` or its string name.

    Examples:
        >>> Evidence(-12.5, method="exact")
        Evidence(value=-12.5, stderr=None, method='exact')
        >>> Evidence(-13.0, 0.1, "elbo").is_lower_bound
        True
        >>> Evidence(float("-inf"), method="elbo")
        Traceback (most recent call last):
        ...
        bmm_ppl.inference.evidence.NonFiniteEvidenceError: log evidence (elbo) is -inf: ...
    """

    value: float
    stderr: float | None = None
    method: EvidenceMethod = EvidenceMethod.EXACT

    def __post_init__(self):
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "method", EvidenceMethod.parse(self.method, "method"))
        if self.stderr is not None:
            object.__setattr__(self, "stderr", float(self.stderr))
            if self.stderr < 0 or math.isnan(self.stderr):
                raise ValueError(f"stderr must be a non-negative number, got {self.stderr}")
        if not math.isfinite(self.value):
            # A log evidence is a finite number for any model that gives the data positive density; -inf
            # (or NaN, or +inf) means the computation over- or underflowed, and ranking it would be silent
            # nonsense (compare would give probabilities {nan, nan}).
            what = "NaN" if math.isnan(self.value) else repr(self.value)
            raise NonFiniteEvidenceError(
                f"log evidence ({self.method.value}) is {what}: the computation that produced it overflowed or "
                "diverged (data on an extreme scale, or a model that gives the data zero density); rescale the "
                "data or check the model",
                method=self.method.value,
            )

    @property
    def is_lower_bound(self) -> bool:
        return self.method.is_lower_bound

    def __repr__(self) -> str:
        return f"Evidence(value={self.value!r}, stderr={self.stderr!r}, method={self.method.value!r})"

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "method": self.method.value}

    @classmethod
    def from_dict(cls, data: dict) -> "Evidence":
        return cls(data["value"], data.get("stderr"), data["method"])
