"""Enums that also accept their string names, checked at the boundary."""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """A string enum whose ``parse`` names every valid choice when given a wrong one.

    Examples:
        >>> class Colour(StrEnum):
        ...     RED = "red"
        >>> Colour.parse("red") is Colour.RED
        True
    """

    @classmethod
    def parse(cls, value, argument: str | None = None):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            name = argument or cls.__name__
            raise ValueError(f"{name}={value!r} is not one of {choices}") from None

    def __str__(self) -> str:
        return self.value
