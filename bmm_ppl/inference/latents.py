"""Distributions over a model's latent sites that a :class:`~bmm_ppl.inference.Posterior` can draw from.

They are plain tensors plus site shapes, so a fitted posterior saves and loads without pickling code.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch


def split_sites(flat: torch.Tensor, site_shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """``{site: Tensor[..., *shape]}`` from ``flat: Tensor[..., D]``, the sites flattened and concatenated
    in the order of ``site_shapes``.

    Example:
        >>> {k: v.shape for k, v in split_sites(torch.zeros(5, 7), {"a": (2,), "b": (1, 5)}).items()}
        {'a': torch.Size([5, 2]), 'b': torch.Size([5, 1, 5])}
    """
    out, start = {}, 0
    for name, shape in site_shapes.items():
        size = math.prod(shape)
        out[name] = flat[..., start : start + size].reshape(flat.shape[:-1] + tuple(shape))
        start += size
    return out


class LatentDistribution(abc.ABC):
    """A distribution over named latent sites with ``sample(num_samples) -> {site: Tensor[num_samples, *shape]}``."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        """Independent draws, ``{site: Tensor[num_samples, *site_shape]}``."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Tensors, numbers and strings only, so that ``torch.load(weights_only=True)`` reads it back."""

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, state: dict) -> "LatentDistribution":
        ...

    @abc.abstractmethod
    def to(self, device=None, dtype=None) -> "LatentDistribution":
        ...


class GaussianLatents(LatentDistribution):
    """A joint Gaussian over several sites, flattened and concatenated in the order of ``site_shapes``.

    The covariance is ``scale_factor @ scale_factor.T``; the factor need not be triangular (a symmetric
    square root from an eigendecomposition is as good), and may have fewer columns than rows.

    Args:
        loc: Tensor[D], the mean of all sites flattened.
        scale_factor: Tensor[D, K].
        site_shapes: ``{site: shape}`` whose sizes add up to D.

    Example:
        >>> q = GaussianLatents(torch.zeros(2), torch.eye(2), {"w": (2,)})
        >>> q.sample(5)["w"].shape
        torch.Size([5, 2])
    """

    kind = "gaussian"

    def __init__(self, loc: torch.Tensor, scale_factor: torch.Tensor, site_shapes: dict[str, tuple]):
        self.site_shapes = {name: tuple(int(s) for s in shape) for name, shape in site_shapes.items()}
        size = sum(math.prod(shape) for shape in self.site_shapes.values())
        if loc.dim() != 1 or loc.shape[0] != size:
            raise ValueError(f"loc must be Tensor[{size}] for site_shapes {self.site_shapes}, got {tuple(loc.shape)}")
        if scale_factor.dim() != 2 or scale_factor.shape[0] != size:
            raise ValueError(f"scale_factor must be Tensor[{size}, K], got {tuple(scale_factor.shape)}")
        self.loc = loc
        self.scale_factor = scale_factor

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return split_sites(flat, self.site_shapes)

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        noise = self.loc.new_empty(num_samples, self.scale_factor.shape[1]).normal_()
        return self._split(self.loc + noise @ self.scale_factor.T)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return self._split(self.loc)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """Tensor[D, D] over the flattened sites."""
        return self.scale_factor @ self.scale_factor.T

    def to_distribution(self) -> torch.distributions.MultivariateNormal:
        """The joint Gaussian as a ``torch.distributions.MultivariateNormal`` over the flattened sites."""
        return torch.distributions.MultivariateNormal(self.loc, covariance_matrix=self.covariance_matrix)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "loc": self.loc,
            "scale_factor": self.scale_factor,
            "site_names": list(self.site_shapes),
            "site_shapes": [list(shape) for shape in self.site_shapes.values()],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "GaussianLatents":
        shapes = dict(zip(state["site_names"], (tuple(s) for s in state["site_shapes"])))
        return cls(state["loc"], state["scale_factor"], shapes)

    def to(self, device=None, dtype=None) -> "GaussianLatents":
        return GaussianLatents(
            self.loc.to(device=device, dtype=dtype), self.scale_factor.to(device=device, dtype=dtype), self.site_shapes
        )


class DiagonalGaussianLatents(GaussianLatents):
    """A Gaussian over several sites with independent elements: ``N(loc, diag(scale^2))``, stored as
    ``Tensor[D]`` scales (no ``D x D`` matrix is made unless :attr:`covariance_matrix` is asked for).

    Args:
        loc: Tensor[D]; scale: Tensor[D]; site_shapes: ``{site: shape}`` whose sizes add up to D.

    Example:
        >>> q = DiagonalGaussianLatents(torch.zeros(3), torch.ones(3), {"w": (3,)})
        >>> q.sample(4)["w"].shape, q.covariance_matrix.shape
        (torch.Size([4, 3]), torch.Size([3, 3]))
    """

    kind = "diagonal-gaussian"

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, site_shapes: dict[str, tuple]):
        if scale.shape != loc.shape:
            raise ValueError(f"scale must have loc's shape {tuple(loc.shape)}, got {tuple(scale.shape)}")
        self.site_shapes = {name: tuple(int(s) for s in shape) for name, shape in site_shapes.items()}
        size = sum(math.prod(shape) for shape in self.site_shapes.values())
        if loc.dim() != 1 or loc.shape[0] != size:
            raise ValueError(f"loc must be Tensor[{size}] for site_shapes {self.site_shapes}, got {tuple(loc.shape)}")
        self.loc, self.scale = loc, scale

    @property
    def scale_factor(self) -> torch.Tensor:
        return torch.diag_embed(self.scale)

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        noise = self.loc.new_empty(num_samples, self.loc.shape[0]).normal_()
        return self._split(self.loc + noise * self.scale)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        return torch.diag_embed(self.scale.pow(2))

    def to_distribution(self) -> torch.distributions.Distribution:
        return torch.distributions.Independent(torch.distributions.Normal(self.loc, self.scale), 1)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "loc": self.loc, "scale": self.scale, "site_names": list(self.site_shapes),
                "site_shapes": [list(shape) for shape in self.site_shapes.values()]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DiagonalGaussianLatents":
        shapes = dict(zip(state["site_names"], (tuple(s) for s in state["site_shapes"])))
        return cls(state["loc"], state["scale"], shapes)

    def to(self, device=None, dtype=None) -> "DiagonalGaussianLatents":
        return DiagonalGaussianLatents(self.loc.to(device=device, dtype=dtype), self.scale.to(device=device, dtype=dtype),
                                       self.site_shapes)


LATENT_DISTRIBUTIONS: dict[str, type[LatentDistribution]] = {
    GaussianLatents.kind: GaussianLatents, DiagonalGaussianLatents.kind: DiagonalGaussianLatents,
}


def latent_distribution_from_state_dict(state: dict) -> LatentDistribution:
    """Rebuilds a saved latent distribution by its ``kind``."""
    try:
        cls = LATENT_DISTRIBUTIONS[state["kind"]]
    except KeyError:
        raise ValueError(
            f"unknown latent distribution kind {state.get('kind')!r}; known: {sorted(LATENT_DISTRIBUTIONS)}"
        ) from None
    return cls.from_state_dict(state)
