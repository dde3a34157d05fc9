"""The Laplace posterior precision in each structure, behind one interface: its log determinant, its
solve (for Newton steps), and the latent distribution it defines. The engine never branches on the
structure; each class knows its own algebra.

Shapes: ``P`` parameters (the flat vector of all latent sites).
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch

from bmm_ppl.inference.latents import (BlockGaussianLatents, DenseBlock, DiagonalGaussianLatents, GaussianLatents,
                                       KroneckerBlock, LatentDistribution)


class PosteriorPrecision(abc.ABC):
    """``H``, the posterior precision at the mode (curvature plus prior precision)."""

    @abc.abstractmethod
    def log_det(self) -> torch.Tensor:
        """``log det H`` (differentiable in what ``H`` was built from).

        Raises:
            torch.linalg.LinAlgError: ``H`` is not positive definite.
        """

    @abc.abstractmethod
    def solve(self, gradient: torch.Tensor) -> torch.Tensor:
        """``H^-1 g`` for ``g`` Tensor[P] (zero outside the approximated elements)."""

    @abc.abstractmethod
    def latents(self, loc: torch.Tensor, site_shapes: dict[str, tuple]) -> LatentDistribution:
        """``N(loc, H^-1)`` as a latent distribution."""

    @property
    @abc.abstractmethod
    def num_parameters(self) -> int:
        """How many parameters the Gaussian is over (``P``, or a subnetwork's size)."""


class DensePrecision(PosteriorPrecision):
    """A full ``Tensor[P, P]`` precision (Cholesky throughout)."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix

    def log_det(self) -> torch.Tensor:
        return 2.0 * torch.linalg.cholesky(self.matrix).diagonal().log().sum()

    def solve(self, gradient: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(gradient.unsqueeze(-1), torch.linalg.cholesky(self.matrix)).squeeze(-1)

    def latents(self, loc, site_shapes) -> GaussianLatents:
        return GaussianLatents(loc, _inverse_cholesky_factor(self.matrix), site_shapes)

    @property
    def num_parameters(self) -> int:
        return self.matrix.shape[0]


class DiagonalPrecision(PosteriorPrecision):
    """A diagonal ``Tensor[P]`` precision."""

    def __init__(self, diagonal: torch.Tensor):
        self.diagonal = diagonal

    def log_det(self) -> torch.Tensor:
        if not bool((self.diagonal > 0).all()):
            raise torch.linalg.LinAlgError("the diagonal precision has a non-positive element")
        return self.diagonal.log().sum()

    def solve(self, gradient: torch.Tensor) -> torch.Tensor:
        return gradient / self.diagonal

    def latents(self, loc, site_shapes) -> DiagonalGaussianLatents:
        return DiagonalGaussianLatents(loc, self.diagonal.rsqrt(), site_shapes)

    @property
    def num_parameters(self) -> int:
        return self.diagonal.shape[0]


class KroneckerFactors(NamedTuple):
    """One KFAC block's precision ``kron(left, right) + delta I`` over the flat elements ``index`` (the
    row-major entries of an ``[a, b]`` weight matrix), with the factors' eigenbases held fixed
    (``left_vectors``, ``right_vectors``: computed once per curvature; the eigenvalues are read as
    ``diag(U^T left U)``, which is exact where ``U`` diagonalises ``left`` and has the exact gradient
    there, so the type-II search may differentiate through ``left``).

    Attributes:
        index: LongTensor[a * b].
        left: Tensor[a, a].
        right: Tensor[b, b].
        delta: Tensor[].
        left_vectors: Tensor[a, a].
        right_vectors: Tensor[b, b].
    """

    index: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    delta: torch.Tensor
    left_vectors: torch.Tensor
    right_vectors: torch.Tensor

    @classmethod
    def of(cls, index, left, right, delta) -> "KroneckerFactors":
        return cls(index, left, right, delta, torch.linalg.eigh(left.detach())[1], torch.linalg.eigh(right.detach())[1])

    def eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor]:
        left = (self.left_vectors * (self.left @ self.left_vectors)).sum(0)
        right = (self.right_vectors * (self.right @ self.right_vectors)).sum(0)
        return left.clamp_min(0.0), right.clamp_min(0.0)  # PSD factors: round-off below 0 is 0

    def block(self) -> KroneckerBlock:
        left, right = self.eigenvalues()
        return KroneckerBlock(self.index, self.left_vectors, left.detach(), self.right_vectors, right.detach(),
                              self.delta.detach())


class BlockPrecision(PosteriorPrecision):
    """A block-diagonal precision: KFAC blocks and dense blocks over disjoint groups of elements
    (elements in no block are not approximated: held at the mode, as in a subnetwork Laplace).

    Args:
        kronecker: :class:`KroneckerFactors` per KFAC block.
        dense: ``(index LongTensor[m], Tensor[m, m])`` per dense block.
    """

    def __init__(self, kronecker: list[KroneckerFactors], dense: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kronecker, self.dense = list(kronecker), list(dense)

    def log_det(self) -> torch.Tensor:
        total = 0.0
        for factors in self.kronecker:
            left, right = factors.eigenvalues()
            total = total + (left[:, None] * right[None, :] + factors.delta).log().sum()
        for _, matrix in self.dense:
            total = total + 2.0 * torch.linalg.cholesky(matrix).diagonal().log().sum()
        return torch.as_tensor(total)

    def solve(self, gradient: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(gradient)
        for factors in self.kronecker:
            left, right = factors.eigenvalues()
            a, b = left.shape[0], right.shape[0]
            rotated = factors.left_vectors.mT @ gradient[factors.index].reshape(a, b) @ factors.right_vectors
            rotated = rotated / (left[:, None] * right[None, :] + factors.delta)
            out[factors.index] = (factors.left_vectors @ rotated @ factors.right_vectors.mT).reshape(-1)
        for index, matrix in self.dense:
            out[index] = DensePrecision(matrix).solve(gradient[index])
        return out

    def latents(self, loc, site_shapes) -> BlockGaussianLatents:
        dense = [DenseBlock(index, _inverse_cholesky_factor(matrix.detach())) for index, matrix in self.dense]
        return BlockGaussianLatents(loc, site_shapes, [f.block() for f in self.kronecker], dense)

    @property
    def num_parameters(self) -> int:
        return sum(f.index.numel() for f in self.kronecker) + sum(index.numel() for index, _ in self.dense)


def _inverse_cholesky_factor(matrix: torch.Tensor) -> torch.Tensor:
    """``L^-T`` for ``matrix = L L^T``, so that ``S S^T = matrix^-1``."""
    lower = torch.linalg.cholesky(matrix)
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).T


__all__ = ["BlockPrecision", "DensePrecision", "DiagonalPrecision", "KroneckerFactors", "PosteriorPrecision"]
