"""What one run of a Pyro program shows: its sites, their roles and the plate nesting.

Every engine reads a program through these functions, so that a site means the same thing everywhere:
a *latent* site is a sample site that is neither observed, a ``pyro.deterministic`` record, a
``pyro.factor`` nor a plate's subsample draw; an *observed* site is an observed sample site that is
none of these either.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible, init_to_median
from pyro.poutine.util import site_is_factor, site_is_subsample

_MODULE_SEPARATOR = "$$$"  # how pyro.module names the params of an nn.Module


def is_sample_site(site: dict) -> bool:
    """A sample site that contributes a density: not a plate's subsample draw, not a deterministic record."""
    return site["type"] == "sample" and not site_is_subsample(site) and not site["infer"].get("_deterministic")


def is_latent_site(site: dict) -> bool:
    """A sample site the engine must infer (not observed, not a factor)."""
    return is_sample_site(site) and not site["is_observed"] and not site_is_factor(site)


def is_observed_site(site: dict) -> bool:
    """An observed sample site with data (not a ``pyro.factor``)."""
    return is_sample_site(site) and site["is_observed"] and not site_is_factor(site)


def is_enumerated_site(site: dict) -> bool:
    """A latent site that the engine should sum out: discrete with finite support, or marked
    ``infer={"enumerate": "parallel"}`` (``config_enumerate``)."""
    if not is_latent_site(site):
        return False
    fn = site["fn"]
    return site["infer"].get("enumerate") == "parallel" or (
        fn.support.is_discrete and getattr(fn, "has_enumerate_support", False)
    )


def site_batch_dims(site: dict) -> int:
    """How many batch dimensions a site occupies: from its plates, its distribution's batch shape and the
    broadcast of its value (an observation ``Tensor[n, k]`` against ``Bernoulli(p: Tensor[k])`` with no
    plate occupies two)."""
    fn = site["fn"]
    event_dim = len(getattr(fn, "event_shape", ()))
    dims = max(len(getattr(fn, "batch_shape", ())), site["value"].dim() - event_dim if site["value"] is not None else 0)
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and frame.dim is not None:
            dims = max(dims, -frame.dim)
    return dims


def guess_max_plate_nesting(*traces: poutine.Trace) -> int:
    """The number of batch dimensions right of which an outer plate (of draws, chains or particles) can
    be placed without colliding with the program's own: the largest over sample sites of
    :func:`site_batch_dims`.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     p = pyro.sample("p", dist.Beta(torch.ones(3), 1.0))       # batch [3], outside any plate
        ...     pyro.sample("obs", dist.Bernoulli(p), obs=y)              # y: [n, 3], no plate
        >>> guess_max_plate_nesting(pyro.poutine.trace(model).get_trace(torch.ones(5, 3)))
        2
    """
    nesting = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                nesting = max(nesting, site_batch_dims(site))
    return nesting


def robust_init(site: dict) -> torch.Tensor:
    """An initial value for a latent site: the prior median where the prior can be sampled, else a
    feasible point of its support (``ImproperUniform`` and other priors without a sampler); Pyro's
    ``init_to_median`` lets the sampler's ``NotImplementedError`` escape."""
    try:
        return init_to_median(site, fallback=init_to_feasible)
    except NotImplementedError:  # no sampler (init_to_feasible samples too, for the shape)
        fn = site["fn"]
        transform = biject_to(fn.support)
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        return transform(torch.zeros(transform.inv.forward_shape(shape))).detach()


def _cuda_devices() -> list:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def prototype_trace(model: Callable, args: tuple, kwargs: dict) -> poutine.Trace:
    """One run of the model to read its structure: latent sites start at :func:`robust_init` values
    (so improper priors need no sampler), inside a scoped parameter store and a forked random state (the
    run registers nothing and leaves the caller's random stream as it was, so that an engine's draws do
    not depend on how often it looked at the model)."""
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=_cuda_devices()):
        return poutine.trace(InitMessenger(robust_init)(model)).get_trace(*args, **kwargs)


def check_supports(trace: poutine.Trace) -> None:
    """Refuses, by site, a continuous latent site whose support has no bijection to unconstrained space
    (``torch.distributions.biject_to`` has none for ``positive_definite``, e.g. a ``Wishart`` draw), before
    an engine that works in unconstrained space does any work.

    Raises:
        UnsupportedModelError: naming the site, its support and a reparameterisation.
    """
    from bmm_ppl.inference.errors import UnsupportedModelError

    for name, site in trace.nodes.items():
        if not is_latent_site(site) or site["fn"].support.is_discrete:
            continue
        try:
            biject_to(site["fn"].support)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"site {name!r} has support {site['fn'].support}, which has no bijection to unconstrained space "
                f"in torch; reparameterise it (e.g. a positive-definite matrix as scales times an LKJCholesky "
                f"factor, or its Cholesky factor with support lower_cholesky)"
            ) from None


def subsampled_plates(trace: poutine.Trace) -> list[str]:
    """The plates of a run that use ``subsample_size`` (fewer indices drawn than the plate's size)."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and site_is_subsample(site) and site["value"].numel() < site["fn"].size]


def is_module_parameter(name: str) -> bool:
    """Whether a ``pyro.param`` name is a parameter of an ``nn.Module`` registered with ``pyro.module``."""
    return _MODULE_SEPARATOR in name


def with_hyperparameters(model: Callable, hyperparameters: dict | None) -> Callable:
    """The model with its ``pyro.param`` sites fixed to ``hyperparameters``.

    Parameters of an ``nn.Module`` registered with ``pyro.module`` are left out: they live in the module
    itself (which the fit trained in place), and Pyro's substitution cannot reach them.
    """
    values = {n: v for n, v in (hyperparameters or {}).items() if not is_module_parameter(n)}
    return poutine.substitute(model, data=values) if values else model


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """What one run of the model shows about a sample site.

    Attributes:
        plates: ``((name, dim, size), ...)`` of the vectorised plates the site sits in, outermost first.
    """

    name: str
    batch_shape: tuple
    event_shape: tuple
    is_observed: bool
    value_shape: tuple
    plates: tuple = ()


@dataclasses.dataclass(frozen=True)
class ModelStructure:
    """The sample sites, param sites and plate nesting of one run of a model.

    Examples:
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
    enumerated_sites: tuple = ()

    @property
    def latent_sites(self) -> list[str]:
        return [n for n, s in self.sites.items() if not s.is_observed]

    @property
    def observed_sites(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.is_observed]


def structure_of(trace: poutine.Trace) -> ModelStructure:
    """The :class:`ModelStructure` of one recorded run."""
    sites, params, deterministic, enumerated = {}, {}, {}, []
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            params[name] = site["value"]
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["infer"].get("_deterministic"):
            deterministic[name] = tuple(site["value"].shape)
            continue
        if site_is_factor(site):
            continue
        if is_enumerated_site(site):
            enumerated.append(name)
        fn = site["fn"]
        plates = tuple(
            (frame.name, frame.dim, frame.size)
            for frame in reversed(site["cond_indep_stack"])
            if frame.vectorized and frame.dim is not None
        )
        sites[name] = SiteInfo(
            name=name,
            batch_shape=tuple(getattr(fn, "batch_shape", ())),
            event_shape=tuple(getattr(fn, "event_shape", ())),
            is_observed=bool(site["is_observed"]),
            value_shape=tuple(site["value"].shape),
            plates=plates,
        )
    return ModelStructure(sites, params, deterministic, guess_max_plate_nesting(trace), tuple(enumerated))


def inspect_model(model: Callable, args: tuple, kwargs: dict, hyperparameters: dict | None = None) -> ModelStructure:
    """Runs ``model(*args, **kwargs)`` once (params substituted where given) and records its structure."""
    runnable = InitMessenger(robust_init)(with_hyperparameters(model, hyperparameters))
    with torch.random.fork_rng(devices=_cuda_devices()):
        trace = poutine.trace(runnable).get_trace(*args, **kwargs)
    return structure_of(trace)


def observed_values(model: Callable, args: tuple, kwargs: dict, hyperparameters: dict | None = None) -> dict:
    """``{site: observed value}`` for every observed site of the model run on these arguments."""
    # latent sites start at robust_init values: an improper prior needs no sampler to read the data
    runnable = InitMessenger(robust_init)(with_hyperparameters(model, hyperparameters))
    trace = poutine.trace(runnable).get_trace(*args, **kwargs)
    return {name: site["value"] for name, site in trace.nodes.items() if is_observed_site(site)}


def trace_under(model: Callable, args: tuple, kwargs: dict, values: dict | None = None,
                hyperparameters: dict | None = None) -> poutine.Trace:
    """One run of the model with the sample sites in ``values`` fixed (conditioned) and its ``pyro.param``
    sites substituted by ``hyperparameters``, with Pyro's argument validation off (an engine's trial
    point outside the support must come back as a density of ``-inf``, not an exception)."""
    runnable = with_hyperparameters(model, hyperparameters)
    if values:
        runnable = poutine.condition(runnable, data=values)
    with pyro.validation_enabled(False):
        return poutine.trace(runnable).get_trace(*args, **kwargs)
