"""Running a program for many points at once: an outer plate (of draws, chains or particles) placed left
of the program's own batch dimensions, with a per-point fallback for programs that do not broadcast.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import torch


def under_outer_plate(fn: Callable, name: str, size: int, nesting: int, device=None) -> Callable:
    """``fn`` run inside ``pyro.plate(name, size, dim=-nesting - 1)`` (``size == 1`` too: the batch
    dimension is then explicit)."""

    def batched(*args, **kwargs):
        with pyro.plate(name, size, dim=-nesting - 1, device=device):
            return fn(*args, **kwargs)

    return batched


def to_outer_plate(value: torch.Tensor, value_shape: tuple, event_dim: int, nesting: int) -> torch.Tensor:
    """``Tensor[B, *value_shape]`` reshaped so its batch dimension sits at ``-nesting - 1 - event_dim``
    (ones are inserted between it and the site's own batch dimensions).

    Examples:
        >>> to_outer_plate(torch.zeros(5, 3), (3,), event_dim=1, nesting=2).shape
        torch.Size([5, 1, 1, 3])
    """
    site_dims = len(value_shape) - event_dim
    pad = (1,) * (nesting - site_dims)
    return value.reshape((value.shape[0],) + pad + tuple(value_shape))


def per_point(value: torch.Tensor, batch: int, shape: tuple) -> torch.Tensor:
    """``Tensor[B, *shape]`` from a batched site value that may or may not depend on the batch."""
    size = math.prod(shape)
    if value.numel() == batch * size:
        return value.reshape((batch,) + tuple(shape))
    if value.numel() == size:
        return value.reshape(shape).expand((batch,) + tuple(shape))
    raise ValueError(f"a site of shape {tuple(shape)} came out as {tuple(value.shape)} under {batch} points")
