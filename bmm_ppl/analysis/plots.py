"""Trace, posterior, pair and predictive-band plots of a fitted posterior (ArviZ and matplotlib).

Every function returns the matplotlib ``Figure`` so that callers save or close it.
"""

from __future__ import annotations

import warnings

import arviz as az
import matplotlib.pyplot as plt
from matplotlib import MatplotlibDeprecationWarning
import numpy as np
import torch

from bmm_ppl.analysis.diagnostics import posterior_dataset


def _figure(axes):
    return np.ravel(np.asarray(axes, dtype=object))[0].figure


def _quiet(plot, *args, **kwargs):
    """Runs an ArviZ plot with matplotlib's deprecation notices about ArviZ's own calls silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning)
        return _figure(plot(*args, **kwargs))


def plot_trace(posterior, var_names: list[str] | None = None, **kwargs):
    """ArviZ trace plot (densities and traces per chain) of the posterior's sites."""
    return _quiet(az.plot_trace, posterior_dataset(posterior, var_names), **kwargs)


def plot_posterior(posterior, var_names: list[str] | None = None, **kwargs):
    """ArviZ posterior densities with HDIs."""
    return _quiet(az.plot_posterior, posterior_dataset(posterior, var_names), **kwargs)


def plot_pair(posterior, var_names: list[str] | None = None, **kwargs):
    """ArviZ pair plot (scatter of each pair of coordinates); divergent draws are marked where the
    posterior's ``sample_stats`` has ``"diverging"``."""
    dataset = posterior_dataset(posterior, var_names)
    diverging = posterior.sample_stats.get("diverging")
    if diverging is not None:
        stats = az.convert_to_dataset({"diverging": diverging.detach().cpu().numpy()})
        data = az.InferenceData(posterior=dataset, sample_stats=stats)
        return _quiet(az.plot_pair, data, divergences=True, **kwargs)
    return _quiet(az.plot_pair, dataset, **kwargs)


def plot_predictive_band(posterior, x: torch.Tensor, site: str = "obs", num_samples: int = 500, prob: float = 0.9,
                         x_observed: torch.Tensor | None = None, y_observed: torch.Tensor | None = None, ax=None):
    """The posterior predictive mean and central ``prob`` band of ``site`` over 1-D inputs ``x: Tensor[m]``.

    Args:
        posterior: a fitted posterior of a model called as ``model(x)``.
        x: Tensor[m] inputs (sorted for a readable band).
        x_observed: the inputs of the data to overlay as points.
        y_observed: the targets of the data to overlay as points.

    Returns:
        the ``Figure``.
    """
    draws = posterior.predict(x, num_samples=num_samples)[site].detach().double().cpu()
    lower, upper = torch.quantile(draws, torch.tensor([(1 - prob) / 2, (1 + prob) / 2], dtype=draws.dtype, device=draws.device), dim=0)
    grid = x.detach().double().cpu()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(grid.numpy(), lower.numpy(), upper.numpy(), alpha=0.3, label=f"{int(100 * prob)}% predictive band")
    ax.plot(grid.numpy(), draws.mean(0).numpy(), label="predictive mean")
    if x_observed is not None and y_observed is not None:
        ax.scatter(x_observed.detach().cpu().numpy(), y_observed.detach().cpu().numpy(), s=10, color="k", label="data")
    ax.set_xlabel("x")
    ax.set_ylabel(site)
    ax.legend()
    return ax.figure
