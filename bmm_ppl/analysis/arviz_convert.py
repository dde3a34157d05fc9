"""Conversion of any :class:`~bmm_ppl.inference.Posterior` to ArviZ data, on ArviZ 0.2x and 1.x alike.

Both versions are served through ``arviz.from_dict``: 0.2x takes one keyword per group and returns an
``InferenceData``; 1.x takes one dict of groups and returns an ``xarray.DataTree``. Dimensions are named
after the model's plates (as ``az.from_pyro`` / ``az.from_numpyro`` do when given ``dims``), sample stats
carry ArviZ's names, and the prior and prior-predictive groups are drawn from the model itself.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import arviz as az
import numpy as np
import pyro
import pyro.poutine as poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_factor, site_is_subsample
import torch

from bmm_ppl.inference.errors import PriorSamplingWarning
from bmm_ppl.inference.program.runs import predictive_draws, redraw_observed, with_hyperparameters

ARVIZ_MAJOR = int(az.__version__.split(".")[0])

# ArviZ's sample-stat names (``az.bfmi`` / ``az.plot_energy`` read ``energy``, ``plot_trace`` ``diverging``).
ARVIZ_STAT_NAMES = ("lp", "energy", "acceptance_rate", "diverging", "n_steps", "step_size", "tree_depth")
# Names the engines used before they adopted ArviZ's: legacy name -> (ArviZ name, sign).
_LEGACY_STAT_NAMES = {
    "accept_prob": ("acceptance_rate", 1.0),
    "num_steps": ("n_steps", 1.0),
    "potential_energy": ("lp", -1.0),  # the potential is -log density, lp is +log density
    "divergent": ("diverging", 1.0),
}
_COUNT_STATS = ("n_steps", "tree_depth")
_SAMPLE_DIMS = ("chain", "draw")


def _numpy(tensors: dict) -> dict:
    return {name: value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype).numpy() for name, value in tensors.items()}


def from_groups(groups: dict[str, dict[str, np.ndarray]], dims: dict | None = None, coords: dict | None = None):
    """Builds ArviZ data from ``{group: {variable: array}}`` on whichever ArviZ is installed.

    Arrays in the groups ``posterior``, ``posterior_predictive``, ``log_likelihood``, ``sample_stats``,
    ``prior`` and ``prior_predictive`` are shaped ``(chain, draw, ...)``; ``observed_data`` arrays are
    not. ``dims`` (``{variable: [dim, ...]}``) hold for the variable in every group; in
    ``log_likelihood`` only its leading dims are used (ArviZ's convention for pointwise values).

    Examples:
        >>> data = from_groups({"posterior": {"mu": np.zeros((2, 10))}})
        >>> list(data.posterior.data_vars)
        ['mu']
    """
    groups = {name: group for name, group in groups.items() if group}
    if ARVIZ_MAJOR >= 1:
        return az.from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(**groups, dims=dims, coords=coords)


# ----------------------------------------------------------------- sample stats
def arviz_sample_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An engine's ``sample_stats`` under ArviZ's names.

    ArviZ names (``lp``, ``energy``, ``acceptance_rate``, ``diverging``, ``n_steps``, ``step_size``,
    ``tree_depth``) pass through; the engines' earlier names are mapped (``accept_prob`` ->
    ``acceptance_rate``, ``num_steps`` -> ``n_steps``, ``potential_energy`` -> ``lp`` negated), an ArviZ
    name given by the engine winning over its legacy twin. ``diverging`` becomes boolean, counts integer.
    No stat is invented: ``energy`` (the Hamiltonian, which ``az.bfmi`` needs) appears only where the
    engine records it.

    Args:
        stats: ``{name: Tensor[chain, draw]}``.

    Returns:
        ``{arviz_name: Tensor[chain, draw]}``.

    Examples:
        >>> stats = {"accept_prob": torch.ones(1, 3), "potential_energy": torch.full((1, 3), 2.0)}
        >>> {k: v.tolist() for k, v in arviz_sample_stats(stats).items()}
        {'acceptance_rate': [[1.0, 1.0, 1.0]], 'lp': [[-2.0, -2.0, -2.0]]}
    """
    out = {}
    for name, value in stats.items():
        target, sign = _LEGACY_STAT_NAMES.get(name, (name, 1.0))
        if target != name and target in stats:
            continue
        if sign != 1.0:
            value = sign * value
        if target == "diverging":
            value = value.bool()
        elif target in _COUNT_STATS and value.is_floating_point() and bool((value == value.round()).all()):
            value = value.long()
        out[target] = value
    return out


# --------------------------------------------------------------- model layout
@dataclasses.dataclass(frozen=True)
class SiteLayout:
    """How one site of a model run lays out its value for ArviZ.

    Attributes:
        dims: one name per value dimension: the plate's name where a plate claims the dimension, else
            ``"{site}_dim_{i}"`` (ArviZ's default).
        shape: the value's shape.
        kind: ``"latent"``, ``"observed"`` or ``"deterministic"``.
        batch_shape: for an observed site, the conditionally independent part of ``shape`` (its plate and
            batch dims; event dims excluded): the shape of its pointwise log-likelihood.
    """

    dims: tuple
    shape: tuple
    kind: str
    batch_shape: tuple = ()


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """The sites of one run of a model (see :func:`model_layout`), its ``pyro.factor`` terms and the latent
    sites whose log density it scales (tempers) by ``poutine.scale``."""

    sites: dict
    factors: tuple
    scaled_latents: tuple = ()

    def names(self, kind: str) -> list[str]:
        return [n for n, s in self.sites.items() if s.kind == kind]


def model_layout(
    model: Callable,
    args: tuple = (),
    kwargs: dict | None = None,
    hyperparameters: dict | None = None,
    values: dict | None = None,
) -> ModelLayout:
    """Traces ``model(*args, **kwargs)`` once and names each site's dimensions after its plates.

    A plate ``pyro.plate(name, size, dim=d)`` names the value dimension ``d`` counted from the right of
    the site's batch dimensions (event dimensions excluded), where that dimension has the plate's size
    (a dimension broadcast to 1 keeps the default name). ``pyro.deterministic`` values count as all batch.

    Args:
        model: a Pyro program.
        hyperparameters: values substituted for its ``pyro.param`` sites.
        values: ``{site: Tensor[*site_shape]}`` latent values to run at (e.g. one posterior draw), so that
            no prior is sampled (an improper one cannot be).

    Returns:
        a :class:`ModelLayout`.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model(x, y=None):
        ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Normal(x @ w, 1.0), obs=y)
        >>> layout = model_layout(model, (torch.ones(5, 2), torch.zeros(5)))
        >>> layout.sites["w"].dims, layout.sites["obs"].dims, layout.sites["obs"].batch_shape
        (('w_dim_0',), ('data',), (5,))
    """
    values = dict(values or {})
    with pyro.get_param_store().scope():
        runnable = poutine.condition(with_hyperparameters(model, hyperparameters), data=values)
        trace = poutine.trace(runnable).get_trace(*args, **(kwargs or {}))
    sites, factors, scaled = {}, [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site_is_factor(site):
            factors.append(name)
            continue
        deterministic = bool(site["infer"].get("_deterministic"))
        shape = tuple(site["value"].shape)
        event_dim = 0 if deterministic else site["fn"].event_dim
        batch = shape[: len(shape) - event_dim]
        dims = [f"{name}_dim_{i}" for i in range(len(shape))]
        for frame in site["cond_indep_stack"]:
            position = None if frame.dim is None else len(batch) + frame.dim
            if position is not None and 0 <= position < len(batch) and shape[position] == frame.size:
                dims[position] = frame.name
        if deterministic:
            sites[name] = SiteLayout(tuple(dims), shape, "deterministic")
        elif site["is_observed"] and name not in values:
            batch_shape = tuple(torch.broadcast_shapes(tuple(site["fn"].batch_shape), batch))
            sites[name] = SiteLayout(tuple(dims), shape, "observed", batch_shape)
        else:
            sites[name] = SiteLayout(tuple(dims), shape, "latent")
            scale = site["scale"]
            if bool((scale != 1).any()) if isinstance(scale, torch.Tensor) else scale != 1:
                scaled.append(name)
    return ModelLayout(sites, tuple(factors), tuple(scaled))


# ---------------------------------------------------------------- prior draws
def prior_draws(posterior, num_samples: int, layout: ModelLayout) -> dict[str, dict[str, torch.Tensor]]:
    """Draws of the model with its observations left out, at the posterior's fitted hyperparameters.

    Runs ``pyro.infer.Predictive`` on the model with its observed sites sampled instead of conditioned
    (vectorised over draws, one model run per draw where the model does not broadcast).

    Returns:
        ``{"prior": {site: Tensor[1, num_samples, *shape]}, "prior_predictive": {...}}``: latent and
        deterministic sites in ``prior``, the observed sites in ``prior_predictive``; ``{}`` with a
        :class:`~bmm_ppl.inference.errors.PriorSamplingWarning` where the prior cannot be drawn (a
        ``pyro.factor`` term or a ``poutine.scale`` on latent sites, both of which ``Predictive`` would
        ignore, or an improper prior).
    """
    reasons = []
    if layout.factors:
        reasons.append(f"the model's pyro.factor term(s) {list(layout.factors)} belong to the prior but cannot be sampled")
    if layout.scaled_latents:
        reasons.append(f"the model scales (tempers) the prior density of {list(layout.scaled_latents)}, which "
                       "sampling its distributions would ignore")
    if reasons:
        warnings.warn(f"prior groups left out: {'; '.join(reasons)}; pass num_prior_samples=0 to skip them",
                      PriorSamplingWarning, stacklevel=3)
        return {}
    observed = layout.names("observed")
    sites = list(layout.sites)
    runnable = with_hyperparameters(redraw_observed(posterior.model, observed), posterior.hyperparameters)

    def run(parallel: bool) -> dict[str, torch.Tensor]:
        with pyro.get_param_store().scope():
            drawn = Predictive(runnable, num_samples=num_samples, return_sites=sites, parallel=parallel)(
                *posterior.args, **posterior.kwargs
            )
        out = {}
        for n in sites:
            # Predictive pads each site with 1s up to the vectorising plate's nesting; past them must lie
            # exactly the site's own shape, or the vectorised run mixed the draws into the model's dims.
            shape, value = layout.sites[n].shape, drawn[n]
            padding = value.shape[1 : value.dim() - len(shape)]
            if value.dim() < 1 + len(shape) or tuple(value.shape[value.dim() - len(shape):]) != shape or any(s != 1 for s in padding):
                raise ValueError(f"site {n!r} drawn with shape {tuple(value.shape)}, expected ({num_samples}, ..., *{shape})")
            out[n] = value.reshape((1, num_samples) + shape)
        return out

    try:
        try:
            draws = run(parallel=True)
        except (RuntimeError, ValueError, IndexError):
            draws = run(parallel=False)
    except NotImplementedError as error:  # an improper prior (e.g. ImproperUniform) has no sampler
        warnings.warn(f"prior groups left out: the prior cannot be sampled ({error}); pass num_prior_samples=0 "
                      "to skip them", PriorSamplingWarning, stacklevel=3)
        return {}
    return {
        "prior": {n: v for n, v in draws.items() if n not in observed},
        "prior_predictive": {n: v for n, v in draws.items() if n in observed},
    }


# ------------------------------------------------------------------- converter
def _check_dims_and_coords(groups: dict, dims: dict, coords: dict) -> None:
    """Refuses user ``dims`` longer than a variable's shape and ``coords`` that name no dim or miss its size."""
    sizes: dict[str, set] = {}
    for group, variables in groups.items():
        for name, value in variables.items():
            shape = value.shape if "data" in group else value.shape[2:]
            names = list(dims.get(name, ()))
            if len(names) > len(shape) and group != "log_likelihood":
                raise ValueError(f"dims[{name!r}] = {names} names {len(names)} dims but {name!r} has shape {tuple(shape)} in {group}")
            for dim, size in zip(names, shape):
                sizes.setdefault(dim, set()).add(size)
    for dim, values in coords.items():
        if dim in _SAMPLE_DIMS:
            continue
        if dim not in sizes:
            raise ValueError(f"coords[{dim!r}] names no dimension of the data (dims: {sorted(sizes)})")
        if {len(values)} != sizes[dim]:
            raise ValueError(f"coords[{dim!r}] has {len(values)} values but dimension {dim!r} has size {sorted(sizes[dim])}")


def to_arviz(
    posterior,
    num_samples: int = 1000,
    posterior_predictive: bool = True,
    *,
    num_prior_samples: int = 500,
    dims: dict | None = None,
    coords: dict | None = None,
):
    """ArviZ data for a posterior: posterior draws, observed data, pointwise log-likelihood, posterior
    predictive, sample stats, prior and prior predictive, with dimensions named after the model's plates.

    Layout (what ArviZ functions expect):

    * ``posterior`` / ``prior``: latent and deterministic sites, ``(chain, draw, *site_shape)``.
    * ``observed_data``, ``posterior_predictive`` / ``prior_predictive``: each observed site at its full
      shape ``(*batch, *event)``, so ``az.plot_ppc`` compares like with like.
    * ``log_likelihood``: per conditionally independent observation, ``(chain, draw, *batch)``: the
      log-density of one whole observation (summed over event dims) is what leave-one-out leaves out, so
      ``az.loo`` / ``az.compare`` count each observation once. For an event-shaped site (e.g.
      ``MultivariateNormal`` or ``.to_event(1)`` observations ``[n, k]``) the log-likelihood is ``[n]``
      and shares the plate dim (``"data"``) with the ``[n, k]`` predictive. ``az.loo_pit`` wants one
      log-likelihood value per predictive value, so for such sites call :func:`bmm_ppl.analysis.loo_pit`,
      which gives each component the leave-its-observation-out weights (for other sites it is
      ``az.loo_pit`` itself).
    * ``sample_stats``: under ArviZ's names (see :func:`arviz_sample_stats`).

    Args:
        posterior: a fitted :class:`~bmm_ppl.inference.Posterior`.
        num_samples: draws per chain taken from a posterior that holds a distribution instead of draws.
        posterior_predictive: include the posterior predictive group.
        num_prior_samples: draws for the ``prior`` and ``prior_predictive`` groups (the model without its
            observations, at the fitted hyperparameters); 0 leaves them out.
        dims: ``{variable: [dim, ...]}`` overriding the plate names, as in ``az.from_pyro``.
        coords: ``{dim: values}`` coordinate values, as in ``az.from_pyro``.

    Returns:
        an ``arviz.InferenceData`` (ArviZ 0.2x) or ``xarray.DataTree`` (ArviZ 1.x).

    Examples:
        >>> import torch, bmm_ppl as bmm
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(0, 1, 10, dtype=torch.float64); y = torch.sin(6 * x)
        >>> post = bmm.Exact().fit(BayesianLinearRegression(polynomial_features(3), 1e-2, 10.0), x, y)
        >>> idata = to_arviz(post, num_samples=200, num_prior_samples=100, coords={"data": x.numpy()})
        >>> idata.log_likelihood["obs"].dims, idata.prior["w"].shape
        (('chain', 'draw', 'data'), (1, 100, 4))
    """
    if isinstance(num_prior_samples, bool) or not isinstance(num_prior_samples, int) or num_prior_samples < 0:
        raise ValueError(f"num_prior_samples must be a non-negative integer, got {num_prior_samples!r}")
    user_dims = {n: list(d) for n, d in (dims or {}).items()}
    coords = dict(coords or {})
    draws = posterior.draws(num_samples)
    chains, per_chain = next(iter(draws.values())).shape[:2]
    groups = {"posterior": draws}
    auto_dims = {}
    if posterior.model is not None:
        first = {n: v[0, 0] for n, v in draws.items()}
        layout = model_layout(posterior.model, posterior.args, posterior.kwargs, posterior.hyperparameters, first)
        # Plate names only where the stored draws have the traced shape (an engine may keep other sites).
        auto_dims = {
            n: list(s.dims) for n, s in layout.sites.items() if n not in draws or tuple(draws[n].shape[2:]) == s.shape
        }
        observed = posterior.observed_data()
        groups["observed_data"] = observed
        groups["log_likelihood"] = {
            n: v.reshape((chains, per_chain) + layout.sites[n].batch_shape) if n in layout.sites else v
            for n, v in posterior.log_likelihood(draws).items()
        }
        if posterior_predictive:
            flat = {n: v.reshape((-1,) + v.shape[2:]) for n, v in draws.items()}
            predicted = predictive_draws(
                redraw_observed(posterior.model, observed), posterior.args, posterior.kwargs, flat, posterior.hyperparameters
            )
            groups["posterior_predictive"] = {
                n: v.reshape((chains, per_chain) + v.shape[1:]) for n, v in predicted.items() if n in observed
            }
        if num_prior_samples:
            groups.update(prior_draws(posterior, num_prior_samples, layout))
    if posterior.sample_stats:
        groups["sample_stats"] = arviz_sample_stats(posterior.sample_stats)
    arrays = {group: _numpy(variables) for group, variables in groups.items()}
    merged_dims = {**auto_dims, **user_dims}
    _check_dims_and_coords(arrays, merged_dims, coords)
    return from_groups(arrays, dims=merged_dims, coords=coords)
