"""Distributions over a model's latent sites that a :class:`~bmm_ppl.inference.Posterior` can draw from.

They are plain tensors plus site shapes, so a fitted posterior saves and loads without pickling code.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, NamedTuple

import torch


def split_sites(flat: torch.Tensor, site_shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """``{site: Tensor[..., *shape]}`` from ``flat: Tensor[..., D]``, the sites flattened and concatenated
    in the order of ``site_shapes``.

    Examples:
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

    Examples:
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

    def output_covariance(self, jacobian: torch.Tensor) -> torch.Tensor:
        """``J Sigma J^T`` per point: Tensor[n, K, K] from ``jacobian`` Tensor[n, K, D] (a linearised output's covariance)."""
        projected = jacobian @ self.scale_factor
        return projected @ projected.mT

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
        loc: Tensor[D].
        scale: Tensor[D].
        site_shapes: ``{site: shape}`` whose sizes add up to D.

    Examples:
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

    def output_covariance(self, jacobian: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nkp,p,nlp->nkl", jacobian, self.scale.pow(2), jacobian)

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


class KroneckerBlock(NamedTuple):
    """One block ``(left (x) right + delta I)^-1`` of a :class:`BlockGaussianLatents` covariance, kept as the
    factors' eigendecompositions: the block's elements, ``index`` into the flat vector, are the row-major
    entries of a ``[a, b]`` matrix whose precision is ``kron(left, right) + delta I``
    (``left = U_l diag(lambda_l) U_l^T`` is ``a x a``, ``right`` is ``b x b``).

    Attributes:
        index: LongTensor[a * b].
        left_vectors: Tensor[a, a].
        left_values: Tensor[a].
        right_vectors: Tensor[b, b].
        right_values: Tensor[b].
        delta: Tensor[] (the prior precision, one number for the block).
    """

    index: torch.Tensor
    left_vectors: torch.Tensor
    left_values: torch.Tensor
    right_vectors: torch.Tensor
    right_values: torch.Tensor
    delta: torch.Tensor

    @property
    def scales(self) -> torch.Tensor:
        """Tensor[a, b]: the standard deviations in the factors' eigenbasis."""
        return (self.left_values[:, None] * self.right_values[None, :] + self.delta).rsqrt()

    def draw(self, noise: torch.Tensor) -> torch.Tensor:
        """Tensor[S, a * b]: ``U_l (Z * scales) U_r^T`` flattened, for ``noise`` Tensor[S, a, b]."""
        matrix = self.left_vectors @ (noise * self.scales) @ self.right_vectors.mT
        return matrix.reshape(noise.shape[0], -1)

    def rotate(self, jacobian: torch.Tensor) -> torch.Tensor:
        """Tensor[n, K, a * b]: the Jacobian's block columns in the eigenbasis, scaled (so that ``R R^T`` is
        the block's part of ``J Sigma J^T``)."""
        a, b = self.left_values.shape[0], self.right_values.shape[0]
        matrix = jacobian[..., self.index].reshape(jacobian.shape[:-1] + (a, b))
        return ((self.left_vectors.mT @ matrix @ self.right_vectors) * self.scales).flatten(-2)


class DenseBlock(NamedTuple):
    """One dense block of a :class:`BlockGaussianLatents` covariance: ``factor @ factor.T`` over ``index``.

    Attributes:
        index: LongTensor[m].
        factor: Tensor[m, m].
    """

    index: torch.Tensor
    factor: torch.Tensor


class BlockGaussianLatents(GaussianLatents):
    """A Gaussian whose covariance is block diagonal over groups of flat elements: Kronecker-factored blocks
    (KFAC) and dense blocks; elements in no block are held at ``loc`` (a subnetwork posterior: the rest of
    the network at its mode). No ``D x D`` matrix is made unless :attr:`scale_factor` is asked for.

    Args:
        loc: Tensor[D].
        site_shapes: ``{site: shape}`` adding up to D.
        kronecker: :class:`KroneckerBlock` s (disjoint indices).
        dense: :class:`DenseBlock` s (disjoint indices).

    Examples:
        >>> block = KroneckerBlock(torch.arange(6), torch.eye(2), torch.ones(2), torch.eye(3), torch.ones(3),
        ...                        torch.tensor(3.0))
        >>> q = BlockGaussianLatents(torch.zeros(7), {"w": (2, 3), "b": (1,)}, [block], [])
        >>> q.sample(4)["w"].shape, q.covariance_matrix.diagonal()
        (torch.Size([4, 2, 3]), tensor([0.2500, 0.2500, 0.2500, 0.2500, 0.2500, 0.2500, 0.0000]))
    """

    kind = "block-gaussian"

    def __init__(self, loc: torch.Tensor, site_shapes: dict[str, tuple], kronecker: list[KroneckerBlock],
                 dense: list[DenseBlock]):
        self.site_shapes = {name: tuple(int(s) for s in shape) for name, shape in site_shapes.items()}
        size = sum(math.prod(shape) for shape in self.site_shapes.values())
        if loc.dim() != 1 or loc.shape[0] != size:
            raise ValueError(f"loc must be Tensor[{size}] for site_shapes {self.site_shapes}, got {tuple(loc.shape)}")
        covered = torch.cat([b.index for b in kronecker] + [b.index for b in dense] + [loc.new_zeros(0, dtype=torch.long)])
        if covered.numel() != covered.unique().numel() or (covered.numel() and not 0 <= int(covered.min()) <= int(covered.max()) < size):
            raise ValueError("the blocks' indices must be disjoint and lie in [0, D)")
        self.loc, self.kronecker, self.dense = loc, list(kronecker), list(dense)

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        flat = self.loc.expand(num_samples, -1).clone()
        for block in self.kronecker:
            noise = self.loc.new_empty(num_samples, block.left_values.shape[0], block.right_values.shape[0]).normal_()
            flat[:, block.index] += block.draw(noise)
        for block in self.dense:
            noise = self.loc.new_empty(num_samples, block.factor.shape[1]).normal_()
            flat[:, block.index] += noise @ block.factor.T
        return self._split(flat)

    @property
    def scale_factor(self) -> torch.Tensor:
        """Tensor[D, D] (made on request)."""
        size = self.loc.shape[0]
        factor = self.loc.new_zeros(size, size)
        for block in self.kronecker:
            a, b = block.left_values.shape[0], block.right_values.shape[0]
            columns = block.draw(torch.eye(a * b, dtype=self.loc.dtype, device=self.loc.device).reshape(-1, a, b))
            factor[block.index[:, None], block.index[None, :]] = columns.T
        for block in self.dense:
            factor[block.index[:, None], block.index[None, :]] = block.factor
        return factor

    def output_covariance(self, jacobian: torch.Tensor) -> torch.Tensor:
        covariance = jacobian.new_zeros(jacobian.shape[:-1] + (jacobian.shape[-2],))
        for block in self.kronecker:
            rotated = block.rotate(jacobian)
            covariance = covariance + rotated @ rotated.mT
        for block in self.dense:
            projected = jacobian[..., block.index] @ block.factor
            covariance = covariance + projected @ projected.mT
        return covariance

    def to_distribution(self) -> torch.distributions.Distribution:
        raise NotImplementedError("a block Gaussian with fixed elements has no density over all of them; use sample()")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "loc": self.loc, "site_names": list(self.site_shapes),
                "site_shapes": [list(shape) for shape in self.site_shapes.values()],
                "kronecker": [dict(b._asdict()) for b in self.kronecker], "dense": [dict(b._asdict()) for b in self.dense]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "BlockGaussianLatents":
        shapes = dict(zip(state["site_names"], (tuple(s) for s in state["site_shapes"])))
        return cls(state["loc"], shapes, [KroneckerBlock(**b) for b in state["kronecker"]],
                   [DenseBlock(**b) for b in state["dense"]])

    def to(self, device=None, dtype=None) -> "BlockGaussianLatents":
        def moved(t):
            return t.to(device=device) if t.dtype == torch.long else t.to(device=device, dtype=dtype)

        return BlockGaussianLatents(moved(self.loc), self.site_shapes,
                                    [KroneckerBlock(*map(moved, b)) for b in self.kronecker],
                                    [DenseBlock(*map(moved, b)) for b in self.dense])


LATENT_DISTRIBUTIONS: dict[str, type[LatentDistribution]] = {
    GaussianLatents.kind: GaussianLatents, DiagonalGaussianLatents.kind: DiagonalGaussianLatents,
    BlockGaussianLatents.kind: BlockGaussianLatents,
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
