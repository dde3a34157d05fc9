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


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A log evidence ``log p(data | model)``, a total over the data set (never a per-point mean).

    Args:
        value: the log evidence in nats.
        stderr: its Monte-Carlo standard error, ``None`` when the number is exact or deterministic.
        method: an :class:`EvidenceMethod` or its string name.

    Example:
        >>> Evidence(-12.5, method="exact")
        Evidence(value=-12.5, stderr=None, method='exact')
        >>> Evidence(-13.0, 0.1, "elbo").is_lower_bound
        True
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
        if math.isnan(self.value):
            raise ValueError("Evidence value is NaN: the computation that produced it diverged")

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
