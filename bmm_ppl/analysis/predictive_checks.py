"""Leave-one-out PIT values for observed sites of any shape, event-shaped ones included, on ArviZ 0.2x and 1.x."""

from __future__ import annotations

import arviz as az
import xarray as xr

from bmm_ppl.analysis.arviz_convert import ARVIZ_MAJOR


def _dataset(data, group: str) -> xr.Dataset:
    """One group of ArviZ data as an ``xarray.Dataset`` (0.2x holds Datasets, 1.x DataTree nodes)."""
    node = data[group]
    return node.to_dataset() if hasattr(node, "to_dataset") and not isinstance(node, xr.Dataset) else node


def _single_observed(data, var_name: str | None) -> str:
    names = list(data.observed_data.data_vars)
    if var_name is None:
        if len(names) != 1:
            raise ValueError(f"var_name must name one of the observed sites {names}")
        return names[0]
    if var_name not in names:
        raise ValueError(f"var_name={var_name!r} is not an observed site; the data have {names}")
    return var_name


def loo_pit(data, var_name: str | None = None):
    """PSIS-LOO probability integral transform of each observed value, ``P(y_rep <= y | y_-i)``.

    For an event-shaped site (observations ``[n, k]`` with a log-likelihood per observation ``[n]``, as
    :func:`~bmm_ppl.analysis.to_arviz` stores it), leaving out observation ``i`` leaves out all ``k`` of
    its components: each component's PIT is the marginal one under the same leave-``i``-out weights.
    ``az.loo_pit`` (0.2x and 1.x) wants one log-likelihood value per predictive value, so it is called
    here on the observation's log-likelihood broadcast over its event dims (Pareto smoothing of equal
    ratios gives equal weights), never on a log-likelihood split between components (which would
    leave out one component at a time) nor on ``k`` copies in the data ``az.loo`` reads (which would
    count each observation ``k`` times). For sites without event dims this is ``az.loo_pit`` itself.

    Args:
        data: ArviZ data with ``posterior``, ``posterior_predictive``, ``log_likelihood`` and
            ``observed_data`` groups (e.g. ``post.to_arviz()``).
        var_name: the observed site (default: the only one).

    Returns:
        an ``xarray.DataArray`` of PIT values in [0, 1] with the dims and coords of
        ``observed_data[var_name]``.

    Examples:
        >>> import torch, bmm_ppl as bmm
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(0, 1, 20, dtype=torch.float64); y = 1 + x + 0.1 * torch.sin(40 * x)
        >>> post = bmm.Exact().fit(BayesianLinearRegression(polynomial_features(1), 1.0, 100.0), x, y)
        >>> pit = loo_pit(post.to_arviz(num_samples=500, num_prior_samples=0))
        >>> pit.dims, bool(((pit >= 0) & (pit <= 1)).all())
        (('data',), True)
    """
    name = _single_observed(data, var_name)
    observed = _dataset(data, "observed_data")[name]
    log_likelihood = _dataset(data, "log_likelihood")[name]
    extra = [d for d in log_likelihood.dims if d not in ("chain", "draw") and d not in observed.dims]
    if extra:
        raise ValueError(f"log_likelihood[{name!r}] has dims {extra} that observed_data[{name!r}] lacks; "
                         "its dims must be the leading (plate) dims of the observations")
    # Pareto smoothing of identical ratio vectors gives identical weights: broadcasting the observation's
    # log-likelihood over its event dims hands each component the weights of leaving out its observation.
    expanded = log_likelihood.broadcast_like(observed).transpose("chain", "draw", *observed.dims)
    groups = {g: _dataset(data, g)[[name]] for g in ("posterior_predictive", "observed_data")}
    groups["posterior"] = _dataset(data, "posterior")
    groups["log_likelihood"] = expanded.to_dataset(name=name)
    if ARVIZ_MAJOR >= 1:
        return az.loo_pit(xr.DataTree.from_dict(groups), var_names=[name])[name]
    return observed.copy(data=az.loo_pit(az.InferenceData(**groups), y=name))
