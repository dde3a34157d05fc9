"""Convergence diagnostics of sampled posteriors (R-hat, ESS, MCSE) through ArviZ."""

from __future__ import annotations

import arviz as az
import numpy as np


def posterior_dataset(posterior, var_names: list[str] | None = None, num_samples: int = 1000):
    """The posterior draws as an ArviZ/xarray dataset with ``chain`` and ``draw`` dims (no model runs)."""
    draws = posterior.draws(num_samples)
    names = list(draws) if var_names is None else list(var_names)
    missing = [n for n in names if n not in draws]
    if missing:
        raise KeyError(f"no draws of {missing}; the posterior has {sorted(draws)}")
    return az.convert_to_dataset({n: draws[n].detach().cpu().double().numpy() for n in names})


def summary(posterior, var_names: list[str] | None = None, num_samples: int = 1000, **kwargs):
    """ArviZ's summary table of a posterior: mean, sd, HDI, MCSE, bulk/tail ESS and R-hat per coordinate.

    Args:
        posterior: a fitted :class:`~bmm_ppl.inference.Posterior` (stored draws are used whole; a
            distribution gives ``num_samples`` fresh draws as one chain).
        var_names: sites to include (default: all).
        **kwargs: passed to ``arviz.summary`` (e.g. ``hdi_prob``).

    Returns:
        a ``pandas.DataFrame`` indexed by ``site[index]``.

    Examples:
        >>> import torch
        >>> from bmm_ppl.inference import Posterior
        >>> post = Posterior(None, draws={"w": torch.randn(4, 200, 2, generator=torch.Generator().manual_seed(0))})
        >>> table = summary(post)
        >>> list(table.index), bool((table["r_hat"] < 1.05).all())
        (['w[0]', 'w[1]'], True)
    """
    return az.summary(posterior_dataset(posterior, var_names, num_samples), **kwargs)


def max_rhat(posterior, var_names: list[str] | None = None) -> float:
    """The largest rank-normalised split R-hat over all coordinates (NaN with one chain of one draw)."""
    values = az.rhat(posterior_dataset(posterior, var_names))
    return float(np.nanmax([np.max(values[n].values) for n in values.data_vars]))


def min_ess(posterior, var_names: list[str] | None = None, method: str = "bulk") -> float:
    """The smallest effective sample size over all coordinates."""
    values = az.ess(posterior_dataset(posterior, var_names), method=method)
    return float(np.min([np.min(values[n].values) for n in values.data_vars]))
