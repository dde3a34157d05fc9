"""Transformations ``t(x; α)`` of inputs, for kernels that average over them.

Two kinds:

* :class:`Transform` — a continuous family ``t(x; α)`` with ``α ∈ R^p`` (affine image transforms, or any
  user-supplied differentiable function). A kernel averages over ``α ~ p(α | θ)`` (weak invariance).
* :class:`FiniteGroup` — a finite group ``G`` acting on inputs. A kernel that sums over all of ``G``
  is *exactly* invariant to it (strict invariance). :class:`PermutationGroup` acts by permuting the
  input's coordinates (e.g. pixels), which is exact in floating point; :func:`rot90_group` builds the
  rotations of square images by multiples of 90°.

Every transform maps ``x: Tensor[n, d]`` to ``Tensor[S, n, d]`` (one copy per parameter value) and
creates its tensors on ``x``'s device and dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Largest half-width each affine parameter may take: a rotation range of π is full rotation
# invariance; translations are in affine_grid's normalised units (1 = half the image); scale is a log
# factor (log 2: up to 2x bigger or smaller); shear is the off-diagonal factor.
AFFINE_PARAMETERS = {
    "rotation": math.pi,
    "translation_x": 1.0,
    "translation_y": 1.0,
    "scale": math.log(2.0),
    "shear": 1.0,
}


class Transform(nn.Module):
    """A differentiable family of transformations ``t(x; α)``, ``α ∈ R^p``.

    Subclasses set :attr:`parameter_names` (length p) and :attr:`max_ranges` (the largest half-width of
    ``α`` per parameter that makes sense, ``inf`` where none), and implement :meth:`forward`.
    """

    parameter_names: tuple[str, ...] = ()
    max_ranges: tuple[float, ...] = ()

    @property
    def num_parameters(self) -> int:
        return len(self.parameter_names)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Args: x: Tensor[n, d]; alpha: Tensor[S, p]. Returns: Tensor[S, n, d], ``t(x_i; α_s)``."""
        raise NotImplementedError


class AffineImageTransform(Transform):
    """Rotation, translation, scaling and shear of flattened images, by ``affine_grid``/``grid_sample``.

    ``α`` holds one number per name in ``parameters`` (a subset of ``"rotation"`` (radians),
    ``"translation_x"``, ``"translation_y"`` (normalised units, 1 = half the image), ``"scale"`` (log
    factor) and ``"shear"``). The image is resampled bilinearly with zero padding; ``α = 0`` gives the
    image back exactly (to rounding).

    Args:
        image_shape: ``(height, width)``; inputs are ``Tensor[n, height * width]`` (row-major pixels).
        parameters: which of the affine parameters ``α`` holds, in order.

    Examples:
        >>> t = AffineImageTransform((8, 8), ("rotation",))
        >>> x = torch.rand(5, 64, dtype=torch.float64)
        >>> t(x, torch.zeros(3, 1, dtype=torch.float64)).shape
        torch.Size([3, 5, 64])
        >>> bool(torch.allclose(t(x, torch.zeros(1, 1, dtype=torch.float64))[0], x))
        True
    """

    def __init__(self, image_shape: Sequence[int], parameters: Sequence[str] = ("rotation",)):
        super().__init__()
        if len(image_shape) != 2 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be (height, width) of positive sizes, got {tuple(image_shape)}")
        parameters = tuple(parameters)
        unknown = [p for p in parameters if p not in AFFINE_PARAMETERS]
        if unknown or not parameters or len(set(parameters)) != len(parameters):
            raise ValueError(
                f"parameters must be distinct names among {sorted(AFFINE_PARAMETERS)}, got {parameters}"
            )
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.parameter_names = parameters
        self.max_ranges = tuple(AFFINE_PARAMETERS[p] for p in parameters)

    def affine_matrices(self, alpha: torch.Tensor) -> torch.Tensor:
        """``Tensor[S, 2, 3]`` matrices (output -> input sampling coordinates) for ``alpha: Tensor[S, p]``."""
        values = dict(zip(self.parameter_names, alpha.unbind(-1)))
        zero = alpha.new_zeros(alpha.shape[0])
        angle = values.get("rotation", zero)
        log_scale = values.get("scale", zero)
        shear = values.get("shear", zero)
        cos, sin, scale = torch.cos(angle), torch.sin(angle), torch.exp(log_scale)
        # Linear part = R(angle) @ [[1, shear], [0, 1]] @ (scale * I)
        a11, a12 = scale * cos, scale * (cos * shear - sin)
        a21, a22 = scale * sin, scale * (sin * shear + cos)
        tx, ty = values.get("translation_x", zero), values.get("translation_y", zero)
        return torch.stack([torch.stack([a11, a12, tx], -1), torch.stack([a21, a22, ty], -1)], -2)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        height, width = self.image_shape
        n, d = x.shape
        if d != height * width:
            raise ValueError(f"inputs must be Tensor[n, {height * width}] for image_shape {self.image_shape}, got {tuple(x.shape)}")
        samples = alpha.shape[0]
        # The n images are the channels of one batch element per α: one grid per α serves all images.
        images = x.reshape(1, n, height, width).expand(samples, n, height, width)
        grid = F.affine_grid(self.affine_matrices(alpha), [samples, n, height, width], align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return moved.reshape(samples, n, d)


class FunctionTransform(Transform):
    """A user-supplied differentiable transformation ``fn(x, alpha)``.

    Args:
        fn: maps ``x: Tensor[n, d]`` and ``alpha: Tensor[S, p]`` to ``Tensor[S, n, d]``; it must be
            differentiable in ``alpha`` for the range to be learned, and create tensors on ``x``'s device.
        parameter_names: one name per component of ``α`` (sets p).
        max_ranges: the largest half-width per parameter (``inf`` when unbounded).

    Examples:
        >>> shift = FunctionTransform(lambda x, a: x.unsqueeze(0) + a.unsqueeze(1), ("shift",))
        >>> shift(torch.zeros(4, 2), torch.tensor([[1.0], [2.0]]))[:, 0]
        tensor([[1., 1.],
                [2., 2.]])
    """

    def __init__(self, fn: Callable, parameter_names: Sequence[str], max_ranges: Sequence[float] | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.parameter_names = tuple(parameter_names)
        if not self.parameter_names:
            raise ValueError("parameter_names must name at least one transformation parameter")
        self.max_ranges = tuple(float(m) for m in (max_ranges or [math.inf] * len(self.parameter_names)))
        if len(self.max_ranges) != len(self.parameter_names) or any(not m > 0 for m in self.max_ranges):
            raise ValueError(f"max_ranges must be {len(self.parameter_names)} positive numbers, got {self.max_ranges}")

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return self.fn(x, alpha)


class FiniteGroup(nn.Module):
    """A finite group acting on inputs; :meth:`orbit` returns every group element applied to ``x``."""

    @property
    def order(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def orbit(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Args: x: Tensor[n, d]. Returns: Tensor[|G|, n, d], ``g(x_i)`` for every ``g`` in the group."""
        raise NotImplementedError


class PermutationGroup(FiniteGroup):
    """A finite group acting by permuting the ``d`` input coordinates (exact in floating point).

    Args:
        permutations: Tensor[G, d] (or nested lists) of index permutations; ``g(x) = x[..., perm_g]``. It
            must contain the identity and be closed under composition (checked), so that a sum over
            the group is exactly invariant.

    Examples:
        >>> swap = PermutationGroup([[0, 1], [1, 0]])
        >>> swap.orbit(torch.tensor([[1.0, 2.0]]))
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[2., 1.]]])
    """

    def __init__(self, permutations):
        super().__init__()
        perms = torch.as_tensor(permutations, dtype=torch.long, device="cpu")
        if perms.dim() != 2 or perms.shape[0] < 1:
            raise ValueError(f"permutations must be Tensor[G, d], got shape {tuple(perms.shape)}")
        size = perms.shape[1]
        reference = torch.arange(size, device="cpu")
        if not torch.equal(perms.sort(-1).values, reference.expand_as(perms)):
            raise ValueError("every row of permutations must be a permutation of range(d)")
        keys = {tuple(p.tolist()) for p in perms}
        if tuple(reference.tolist()) not in keys:
            raise ValueError("permutations must contain the identity (it is a group)")
        for p in perms:
            for q in perms:
                if tuple(p[q].tolist()) not in keys:
                    raise ValueError("permutations are not closed under composition: not a group, so a sum over them is not invariant")
        self.register_buffer("permutations", perms)

    @property
    def order(self) -> int:
        return self.permutations.shape[0]

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.permutations.shape[1]:
            raise ValueError(f"inputs must have {self.permutations.shape[1]} features for this group, got {tuple(x.shape)}")
        return x[..., self.permutations.to(x.device)].movedim(-2, 0)


def rot90_group(image_shape: Sequence[int], flips: bool = False) -> PermutationGroup:
    """Rotations of square images by 0, 90, 180, 270 degrees (with ``flips``: the 8-element dihedral group).

    Args:
        image_shape: ``(size, size)``; inputs are ``Tensor[n, size * size]`` row-major pixels.

    Examples:
        >>> rot90_group((3, 3)).order
        4
    """
    height, width = (int(s) for s in image_shape)
    if height != width:
        raise ValueError(f"rotations by 90 degrees need square images, got image_shape {tuple(image_shape)}")
    index = torch.arange(height * width, device="cpu").reshape(height, width)
    images = [torch.rot90(index, k, (0, 1)) for k in range(4)]
    if flips:
        images += [image.flip(1) for image in images]
    return PermutationGroup(torch.stack([image.reshape(-1) for image in images]))
