"""Conversion of any :class:`~bmm_ppl.inference.Posterior` to ArviZ data, on ArviZ 0.2x and 1.x alike.

Both versions are served through ``arviz.from_dict``: 0.2x takes one keyword per group and returns an
``InferenceData``; 1.x takes one dict of groups and returns an ``xarray.DataTree``.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import torch

from bmm_ppl.inference.program.runs import predictive_draws, redraw_observed

ARVIZ_MAJOR = int(az.__version__.split(".")[0])


def _numpy(tensors: dict) -> dict:
    return {name: value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype).numpy() for name, value in tensors.items()}


def from_groups(groups: dict[str, dict[str, np.ndarray]], dims: dict | None = None, coords: dict | None = None):
    """Builds ArviZ data from ``{group: {variable: array}}`` on whichever ArviZ is installed.

    Arrays in the groups ``posterior``, ``posterior_predictive``, ``log_likelihood`` and ``sample_stats``
    are shaped ``(chain, draw, ...)``; ``observed_data`` arrays are not.

    Example:
        >>> data = from_groups({"posterior": {"mu": np.zeros((2, 10))}})
        >>> list(data.posterior.data_vars)
        ['mu']
    """
    groups = {name: group for name, group in groups.items() if group}
    if ARVIZ_MAJOR >= 1:
        return az.from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(**groups, dims=dims, coords=coords)


def to_arviz(posterior, num_samples: int = 1000, posterior_predictive: bool = True):
    """ArviZ data for a posterior: posterior draws (chain, draw, ...), observed data, pointwise
    log-likelihood (so LOO and WAIC work), posterior predictive at the fitted inputs and sample stats.

    Args:
        posterior: a fitted :class:`~bmm_ppl.inference.Posterior`.
        num_samples: draws per chain taken from a posterior that holds a distribution instead of draws.
        posterior_predictive: include the posterior predictive group.

    Example:
        >>> import torch, bmm_ppl as bmm
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(0, 1, 10, dtype=torch.float64); y = torch.sin(6 * x)
        >>> post = bmm.Exact().fit(BayesianLinearRegression(polynomial_features(3), 1e-2, 10.0), x, y)
        >>> idata = to_arviz(post, num_samples=200)
        >>> idata.log_likelihood["obs"].shape
        (1, 200, 10)
    """
    draws = posterior.draws(num_samples)
    chains, per_chain = next(iter(draws.values())).shape[:2]
    groups = {"posterior": _numpy(draws)}
    if posterior.model is not None:
        observed = posterior.observed_data()
        groups["observed_data"] = _numpy(observed)
        groups["log_likelihood"] = _numpy(posterior.log_likelihood(draws))
        if posterior_predictive:
            flat = {n: v.reshape((-1,) + v.shape[2:]) for n, v in draws.items()}
            predicted = predictive_draws(
                redraw_observed(posterior.model, observed), posterior.args, posterior.kwargs, flat, posterior.hyperparameters
            )
            groups["posterior_predictive"] = _numpy(
                {n: v.reshape((chains, per_chain) + v.shape[1:]) for n, v in predicted.items() if n in observed}
            )
    if posterior.sample_stats:
        groups["sample_stats"] = _numpy(posterior.sample_stats)
    return from_groups(groups)
