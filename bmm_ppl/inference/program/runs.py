"""Running a Pyro model under many posterior draws at once: predictive draws and pointwise log-likelihoods.

Draws are conditioned on in one vectorised run (an outer ``pyro.plate`` to the left of the model's
own plates), falling back to one run per draw when the model does not broadcast.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import pyro
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_factor, site_is_subsample
import torch

_DRAW_PLATE = "_bmm_posterior_draws"


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """What one run of the model shows about a sample site."""

    name: str
    batch_shape: tuple
    event_shape: tuple
    is_observed: bool
    value_shape: tuple


@dataclasses.dataclass(frozen=True)
class ModelStructure:
    """The sample sites, param sites and plate nesting of one run of a model.

    Example:
        >>> def model(x):
        ...     w = pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", pyro.distributions.Normal(w * x, 1.0), obs=x)
        >>> s = inspect_model(model, (torch.ones(3),), {})
        >>> sorted(s.latent_sites), s.observed_sites, s.max_plate_nesting
        (['w'], ['obs'], 1)
    """

    sites: dict[str, SiteInfo]
    param_sites: dict[str, torch.Tensor]
    deterministic_sites: dict[str, tuple]
    max_plate_nesting: int

    @property
    def latent_sites(self) -> list[str]:
        return [n for n, s in self.sites.items() if not s.is_observed]

    @property
    def observed_sites(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.is_observed]


_MODULE_SEPARATOR = "$$$"  # how pyro.module names the params of an nn.Module


def with_hyperparameters(model: Callable, hyperparameters: dict | None) -> Callable:
    """The model with its ``pyro.param`` sites fixed to ``hyperparameters``.

    Parameters of an ``nn.Module`` registered with ``pyro.module`` are left out: they live in the module
    itself (which the fit trained in place), and Pyro's substitution cannot reach them.
    """
    values = {n: v for n, v in (hyperparameters or {}).items() if _MODULE_SEPARATOR not in n}
    return poutine.substitute(model, data=values) if values else model


def inspect_model(model: Callable, args: tuple, kwargs: dict, hyperparameters: dict | None = None) -> ModelStructure:
    """Runs ``model(*args, **kwargs)`` once (params substituted where given) and records its structure."""
    runnable = with_hyperparameters(model, hyperparameters)
    trace = poutine.trace(runnable).get_trace(*args, **kwargs)
    sites, params, deterministic, nesting = {}, {}, {}, 0
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            params[name] = site["value"]
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if site["infer"].get("_deterministic"):
            deterministic[name] = tuple(site["value"].shape)
            continue
        if site_is_factor(site):
            continue
        fn = site["fn"]
        sites[name] = SiteInfo(
            name=name,
            batch_shape=tuple(getattr(fn, "batch_shape", ())),
            event_shape=tuple(getattr(fn, "event_shape", ())),
            is_observed=bool(site["is_observed"]),
            value_shape=tuple(site["value"].shape),
        )
    return ModelStructure(sites, params, deterministic, nesting)


def _reshape_for_plate(value: torch.Tensor, info: SiteInfo, nesting: int) -> torch.Tensor:
    num_draws = value.shape[0]
    site_dims = len(info.value_shape) - len(info.event_shape)
    pad = (1,) * (nesting - site_dims)
    return value.reshape((num_draws,) + pad + info.value_shape)


def run_under_draws(
    model: Callable,
    args: tuple,
    kwargs: dict,
    draws: dict[str, torch.Tensor],
    hyperparameters: dict | None = None,
    structure: ModelStructure | None = None,
) -> tuple[list[poutine.Trace], bool]:
    """Traces the model with its latent sites fixed to each draw.

    Args:
        draws: ``{site: Tensor[S, *site_shape]}``.
        hyperparameters: values substituted for the model's ``pyro.param`` sites.

    Returns:
        ``([trace], True)`` for one vectorised trace whose sites carry a leading draw dimension placed
        left of the model's plates, or ``([trace_1, ..., trace_S], False)`` when the model would not
        broadcast.
    """
    hyperparameters = dict(hyperparameters or {})
    structure = structure or inspect_model(model, args, kwargs, hyperparameters)
    num_draws = next(iter(draws.values())).shape[0] if draws else 1
    nesting = structure.max_plate_nesting
    try:
        reshaped = {n: _reshape_for_plate(v, structure.sites[n], nesting) for n, v in draws.items()}

        def vectorised(*a, **k):
            with pyro.plate(_DRAW_PLATE, num_draws, dim=-nesting - 1):
                return model(*a, **k)

        conditioned = poutine.condition(with_hyperparameters(vectorised, hyperparameters), data=reshaped)
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        for name, info in structure.sites.items():
            if name in draws:
                continue
            # Each other site's distribution must carry exactly one draw dimension, or the model did not
            # broadcast (it raised, or it silently mixed draws with data dimensions).
            if math.prod(trace.nodes[name]["fn"].batch_shape) != num_draws * math.prod(info.batch_shape):
                raise ValueError(f"site {name!r} did not broadcast over the draws")
        return [trace], True
    except (RuntimeError, ValueError, IndexError):
        traces = []
        for i in range(num_draws):
            draw = {n: v[i] for n, v in draws.items()}
            conditioned = poutine.condition(with_hyperparameters(model, hyperparameters), data=draw)
            traces.append(poutine.trace(conditioned).get_trace(*args, **kwargs))
        return traces, False


def predictive_draws(
    model: Callable,
    args: tuple,
    kwargs: dict,
    draws: dict[str, torch.Tensor],
    hyperparameters: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Posterior predictive draws of every site that ``draws`` does not fix.

    Returns:
        ``{site: Tensor[S, *site_shape]}`` for the sample sites not in ``draws`` (the observations, drawn
        afresh where the arguments carry none) and the ``pyro.deterministic`` sites.
    """
    structure = inspect_model(model, args, kwargs, hyperparameters)
    num_draws = next(iter(draws.values())).shape[0]
    traces, vectorised = run_under_draws(model, args, kwargs, draws, hyperparameters, structure)
    shapes = {n: s.value_shape for n, s in structure.sites.items() if n not in draws}
    shapes.update(structure.deterministic_sites)
    out = {}
    for name, shape in shapes.items():
        if vectorised:
            out[name] = _per_draw(traces[0].nodes[name]["value"], num_draws, shape)
        else:
            out[name] = torch.stack([t.nodes[name]["value"].reshape(shape) for t in traces])
    return out


def _per_draw(value: torch.Tensor, num_draws: int, shape: tuple) -> torch.Tensor:
    """Tensor[S, *shape] from a vectorised site value that may or may not depend on the draw."""
    size = math.prod(shape)
    if value.numel() == num_draws * size:
        return value.reshape((num_draws,) + shape)
    if value.numel() == size:
        return value.reshape(shape).expand((num_draws,) + shape)
    raise ValueError(f"a site of shape {shape} came out as {tuple(value.shape)} under {num_draws} draws")


def pointwise_log_likelihood(
    model: Callable,
    args: tuple,
    kwargs: dict,
    draws: dict[str, torch.Tensor],
    hyperparameters: dict | None = None,
) -> dict[str, torch.Tensor]:
    """``log p(y_i | draw)`` for every observed site.

    Returns:
        ``{site: Tensor[S, n_obs]}`` where ``n_obs`` is the number of conditionally independent
        observations of the site (its batch elements; event dimensions are summed).
    """
    structure = inspect_model(model, args, kwargs, hyperparameters)
    num_draws = next(iter(draws.values())).shape[0]
    traces, vectorised = run_under_draws(model, args, kwargs, draws, hyperparameters, structure)
    out = {}
    for name in structure.observed_sites:
        info = structure.sites[name]
        n_obs = max(1, math.prod(info.value_shape[: len(info.value_shape) - len(info.event_shape)]))
        if vectorised:
            site = traces[0].nodes[name]
            out[name] = _per_draw(site["fn"].log_prob(site["value"]), num_draws, (n_obs,))
        else:
            rows = []
            for t in traces:
                site = t.nodes[name]
                rows.append(site["fn"].log_prob(site["value"]).reshape(n_obs))
            out[name] = torch.stack(rows)
    return out


class _RedrawObserved(Messenger):
    """Samples the named observed sites afresh instead of conditioning on their data."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def _pyro_sample(self, msg):
        if msg["name"] in self.names and msg["is_observed"]:
            msg["is_observed"] = False
            msg["infer"]["was_observed"] = True
            msg["value"] = None
            msg["done"] = False


def redraw_observed(model: Callable, names) -> Callable:
    """The model with the observed sites ``names`` sampled rather than conditioned (unlike
    ``poutine.uncondition``, ``pyro.deterministic`` sites stay as they are)."""
    return _RedrawObserved(names)(model)


def observed_values(model: Callable, args: tuple, kwargs: dict, hyperparameters: dict | None = None) -> dict:
    """``{site: observed value}`` for every observed site of the model run on these arguments."""
    runnable = with_hyperparameters(model, hyperparameters)
    trace = poutine.trace(runnable).get_trace(*args, **kwargs)
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_deterministic")
        and not site_is_factor(site)
    }
