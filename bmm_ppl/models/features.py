"""Feature maps ``phi(x) -> Tensor[n, d]`` for linear-in-the-weights models."""

from __future__ import annotations

import torch

from bmm_ppl.validation import check_tensor


def _as_column(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    check_tensor(name, x, dim=(1, 2), finite=False)
    if x.dim() == 2:
        if x.shape[1] != 1:
            raise ValueError(f"{name} must be Tensor[n] or Tensor[n, 1] for this feature map, got {tuple(x.shape)}")
        return x
    return x.unsqueeze(-1)


class PolynomialFeatures:
    """``phi(x) = [1, x, x^2, ..., x^degree]`` of a scalar input.

    Examples:
        >>> polynomial_features(2)(torch.tensor([2.0]))
        tensor([[1., 2., 4.]])
    """

    def __init__(self, degree: int):
        if int(degree) != degree or degree < 0:
            raise ValueError(f"degree must be a non-negative integer, got {degree}")
        self.degree = int(degree)

    @property
    def num_features(self) -> int:
        return self.degree + 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        column = _as_column(x)
        powers = torch.arange(self.degree + 1, device=x.device, dtype=x.dtype)
        return column**powers

    def __repr__(self) -> str:
        return f"polynomial_features({self.degree})"


class RBFFeatures:
    """Gaussian bumps ``exp(-|x - c_j|^2 / (2 l^2))`` at ``centres``, with a leading constant when ``bias``.

    Args:
        centres: Tensor[m] (scalar inputs) or Tensor[m, k] (k-dimensional inputs).
        lengthscale: a positive number.

    Examples:
        >>> rbf_features(torch.linspace(0, 1, 5), 0.2)(torch.rand(7)).shape
        torch.Size([7, 6])
    """

    def __init__(self, centres: torch.Tensor, lengthscale: float, bias: bool = True):
        check_tensor("centres", centres, dim=(1, 2))
        if not lengthscale > 0:
            raise ValueError(f"lengthscale must be positive, got {lengthscale}")
        self.centres = centres if centres.dim() == 2 else centres.unsqueeze(-1)
        self.lengthscale = float(lengthscale)
        self.bias = bias

    @property
    def num_features(self) -> int:
        return self.centres.shape[0] + int(self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dim=(1, 2), finite=False)
        points = x if x.dim() == 2 else x.unsqueeze(-1)
        if points.shape[-1] != self.centres.shape[-1]:
            raise ValueError(f"x has {points.shape[-1]} input dimensions but the centres have {self.centres.shape[-1]}")
        centres = self.centres.to(device=x.device, dtype=x.dtype)
        sq = (points.unsqueeze(-2) - centres).pow(2).sum(-1)
        bumps = torch.exp(-0.5 * sq / self.lengthscale**2)
        if not self.bias:
            return bumps
        return torch.cat([bumps.new_ones(bumps.shape[:-1] + (1,)), bumps], dim=-1)

    def __repr__(self) -> str:
        return f"rbf_features({self.centres.shape[0]} centres, lengthscale={self.lengthscale})"


class IdentityFeatures:
    """``phi(x) = [1, x]`` (with ``bias``) or ``x``: ordinary linear regression on the raw inputs.

    Examples:
        >>> IdentityFeatures()(torch.ones(3, 2)).shape
        torch.Size([3, 3])
    """

    def __init__(self, bias: bool = True):
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dim=(1, 2), finite=False)
        inputs = x if x.dim() == 2 else x.unsqueeze(-1)
        if not self.bias:
            return inputs
        return torch.cat([inputs.new_ones(inputs.shape[:-1] + (1,)), inputs], dim=-1)

    def __repr__(self) -> str:
        return f"IdentityFeatures(bias={self.bias})"


def polynomial_features(degree: int) -> PolynomialFeatures:
    """The feature map ``[1, x, ..., x^degree]``; see :class:`PolynomialFeatures`."""
    return PolynomialFeatures(degree)


def rbf_features(centres: torch.Tensor, lengthscale: float, bias: bool = True) -> RBFFeatures:
    """Gaussian radial basis functions; see :class:`RBFFeatures`."""
    return RBFFeatures(centres, lengthscale, bias)
