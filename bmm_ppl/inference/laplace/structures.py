"""The choices of a Laplace approximation, one enum each (with a docstring per member)."""

from __future__ import annotations

from enum import StrEnum


class _Parsed(StrEnum):
    @classmethod
    def parse(cls, value, argument: str):
        """``value`` as a member (a member or its string), else a ``ValueError`` listing the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{argument} must be one of {choices}, got {value!r}") from None


class HessianStructure(_Parsed):
    """How much of the curvature matrix is kept."""

    FULL = "full"
    """The whole ``P x P`` matrix: exact for the chosen curvature, ``O(P^2)`` memory, ``O(P^3)`` time."""
    DIAG = "diag"
    """Its diagonal: ``O(P)``; ignores every correlation between parameters (the log determinant is
    that of the diagonal, an approximation of the full one)."""
    KRON = "kron"
    """Block diagonal over the sites, each linear layer's weight block Kronecker-factored (KFAC,
    ``kron(G, A)``: ``O(out^2 + in^2)`` memory per layer), biases and other sites dense blocks; GGN only."""


class KFACApproximation(_Parsed):
    """How KFAC treats a dimension over which a layer's weights are shared (a sequence, a set):
    Eschenhagen et al. 2023. Both are exact for one data point without sharing."""

    EXPAND = "expand"
    """Each position of the shared dimension counts as a data point in both factors."""
    REDUCE = "reduce"
    """The inputs are averaged and the output gradients summed over the shared dimension first."""


class Curvature(_Parsed):
    """Which positive semi-definite stand-in for the log-likelihood's negative Hessian."""

    GGN = "ggn"
    """The generalised Gauss-Newton ``sum_i J_i^T Lambda_i J_i``: ``J_i`` the Jacobian of the output (the
    ``pyro.deterministic`` site) in the parameters, ``Lambda_i`` the negative Hessian of ``log p(y_i | f)``
    in the output. Equal to the Hessian when the output is linear in the parameters."""
    EF = "ef"
    """The empirical Fisher ``sum_i g_i g_i^T`` of the per-point log-likelihood gradients ``g_i``: needs
    no output site; not the Hessian even for linear models (Kunstner et al. 2019)."""


__all__ = ["Curvature", "HessianStructure", "KFACApproximation"]
