"""Small data sets shipped with the package (no downloads at run time)."""

from __future__ import annotations

import csv
from importlib import resources

import torch


def load_sinusoidal(split: str = "train", dtype: torch.dtype = torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic curve-fitting data: ``t = sin(2 pi x) + N(0, 0.3^2)`` noise.

    ``"train"`` is the ten points at ``x = linspace(0, 1, 10)``; ``"test"`` is 100 points with
    ``x ~ U(0, 1)``. Both were drawn once with a fixed seed and ship as CSV files.

    Returns:
        ``(x, t)``: two Tensor[n].

    Examples:
        >>> x, t = load_sinusoidal()
        >>> x.shape, t.shape
        (torch.Size([10]), torch.Size([10]))
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not one of 'train', 'test'")
    text = resources.files(__name__).joinpath(f"sinusoidal_{split}.csv").read_text()
    rows = [row for row in csv.reader(line for line in text.splitlines() if not line.startswith("#"))][1:]
    x = torch.tensor([float(r[0]) for r in rows], dtype=dtype, device=device)
    t = torch.tensor([float(r[1]) for r in rows], dtype=dtype, device=device)
    return x, t


__all__ = ["load_sinusoidal"]
