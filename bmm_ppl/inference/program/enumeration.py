"""Discrete latent sites with finite support, summed out by enumeration and recovered afterwards.

Engines that need a continuous target (HMC/NUTS, SVI's reparameterised ELBO) marginalise the discrete
sites in parallel, as Pyro's and NumPyro's NUTS and Pyro's ``TraceEnum_ELBO`` do: each discrete site
gets its own enumeration dimension left of the program's batch dimensions, and Pyro's einsum
contraction sums them out. After inference, :func:`draw_discrete` samples the discrete sites from their
conditional posterior given each continuous draw (Pyro's ``infer_discrete``), so a mixture's
assignments can be read off the ``Posterior``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate, infer_discrete
from pyro.ops.contract import contract_to_tensor as _pyro_contract_to_tensor
from pyro.ops.einsum import torch_log

from bmm_ppl.inference.program.batching import per_point, to_outer_plate, under_outer_plate
from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.program.sites import (
    check_supports,
    inspect_model,
    is_latent_site,
    is_sample_site,
    prototype_trace,
    with_hyperparameters,
)

_DRAW_PLATE = "_bmm_discrete_draws"
_BATCH_PLATE = "_bmm_enumerated_points"


def enumerated_sites(model: Callable, args: tuple, kwargs: dict) -> tuple:
    """The latent sites of ``model`` to sum out: discrete with finite support (or marked for parallel
    enumeration), found in one run (a scoped parameter store).

    Raises:
        UnsupportedModelError: a discrete latent site whose support is not finite (e.g. a Poisson count), or
            a continuous one without a bijection to unconstrained space (:func:`check_supports`).
    """
    trace = prototype_trace(model, args, kwargs)
    check_supports(trace)
    names = []
    for name, site in trace.nodes.items():
        if not is_latent_site(site) or not site["fn"].support.is_discrete:
            continue
        if not getattr(site["fn"], "has_enumerate_support", False):
            raise UnsupportedModelError(
                f"site {name!r} is discrete with an unbounded support ({type(site['fn']).__name__}): it cannot "
                f"be enumerated out; marginalise it in the model or give it a finite support"
            )
        names.append(name)
    return tuple(names)


def enumerating(model: Callable, max_plate_nesting: int, extra_dims: int = 0) -> Callable:
    """``model`` with every discrete latent site of finite support enumerated in parallel, its
    enumeration dimensions starting left of the program's ``max_plate_nesting`` batch dimensions (and of
    ``extra_dims`` outer plates)."""
    return poutine.enum(config_enumerate(model, "parallel"), first_available_dim=-max_plate_nesting - 1 - extra_dims)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """Pyro's ``safe_log``: ``log x`` with the gradient ``1 / max(x, eps)``, so that log 0 has a finite
    gradient, written with plain operations (the value of ``max(x, eps)`` with the gradient of ``x``)
    rather than as an ``autograd.Function``, which ``torch.func`` transforms and functionalisation
    refuse: an enumerated log-density can then be differentiated by ``torch.func.grad`` and captured."""
    floored = x + (x.clamp(min=torch.finfo(x.dtype).eps) - x).detach()
    return floored.log() + (x.log() - floored.log()).detach()


@contextlib.contextmanager
def _transformable_safe_log():
    """Pyro's log-space einsum with :func:`_safe_log` in place of its ``safe_log`` (same values and
    gradients) for the duration."""
    original = torch_log.safe_log
    torch_log.safe_log = _safe_log
    try:
        yield
    finally:
        torch_log.safe_log = original


def contract_to_tensor(factors, enum_dims, **kwargs) -> torch.Tensor:
    """Pyro's ``contract_to_tensor`` (tensor-tree variable elimination in log space), differentiable by
    ``torch.func`` transforms (see :func:`_safe_log`)."""
    with _transformable_safe_log():
        return _pyro_contract_to_tensor(factors, enum_dims, **kwargs)


def enumerated_log_density(trace, batch_plate: str | None = None) -> torch.Tensor:
    """``log sum_z p(...)`` of a run recorded under :func:`enumerating`: the sites' log-densities (masked and
    scaled by Pyro's ``compute_log_prob``) contracted over the enumeration dimensions and the plates by
    Pyro's tensor-tree contraction, keeping ``batch_plate`` (an outer plate of draws, chains or particles)
    when given.

    Returns:
        ``Tensor[B]`` for an outer plate of size ``B`` (expanded when nothing depends on it), else a scalar.
    """
    trace.compute_log_prob()
    trace.pack_tensors()
    factors = OrderedDict()
    for site in trace.nodes.values():
        if is_sample_site(site):
            ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
            factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    enum_dims = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    if batch_plate is None:
        return contract_to_tensor(factors, enum_dims)
    symbol = trace.plate_to_symbol[batch_plate]
    size = next(f.size for site in trace.nodes.values() if site["type"] == "sample"
                for f in site["cond_indep_stack"] if f.name == batch_plate)
    if not any(symbol in term._pyro_dims for terms in factors.values() for term in terms):
        return contract_to_tensor(factors, enum_dims).expand(size)  # no term depends on the batch (size 1)
    result = contract_to_tensor(factors, enum_dims, target_ordinal=frozenset({symbol}))
    return result.reshape(-1).expand(size) if result.numel() == 1 else result.reshape(size)


def marginal_log_joint(model: Callable, values: dict, args: tuple, kwargs: dict, max_plate_nesting: int,
                       batch: int | None = None, device=None) -> torch.Tensor:
    """``log sum_z p(data, values, z)``: the model's log joint at the continuous ``values``, with its
    enumerated discrete sites ``z`` summed out; argument validation off, so an out-of-support point gives
    ``-inf``.

    Args:
        values: one point ``{site: Tensor[*shape]}`` (``batch=None``), or ``batch`` points already shaped
            for an outer plate at ``dim = -max_plate_nesting - 1`` (see
            :func:`~bmm_ppl.inference.program.batching.to_outer_plate`).

    Returns:
        a scalar, or ``Tensor[batch]``.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5)))
        ...     pyro.sample("y", dist.Normal(3.0 * z, 1.0), obs=y)
        >>> value = marginal_log_joint(model, {}, (torch.tensor(0.0),), {}, 0)
        >>> bool(torch.isclose(value, torch.logsumexp(torch.stack([dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.0)),
        ...     dist.Normal(3.0, 1.0).log_prob(torch.tensor(0.0))]), 0) + torch.tensor(0.5).log()))
        True
    """
    runnable = poutine.condition(model, data=values) if values else model
    plate = None
    if batch is not None:
        runnable, plate = under_outer_plate(runnable, _BATCH_PLATE, batch, max_plate_nesting, device), _BATCH_PLATE
    with pyro.validation_enabled(False):
        trace = poutine.trace(enumerating(runnable, max_plate_nesting, extra_dims=1)).get_trace(*args, **kwargs)
        return enumerated_log_density(trace, plate)


def draw_discrete(
    model: Callable,
    args: tuple,
    kwargs: dict,
    draws: dict[str, torch.Tensor],
    sites: tuple,
    hyperparameters: dict | None = None,
    num_draws: int | None = None,
) -> dict[str, torch.Tensor]:
    """Draws of the discrete ``sites`` from their conditional posterior given each continuous draw.

    One vectorised ``infer_discrete`` run under an outer plate of draws where the model broadcasts, one
    run per draw otherwise.

    Args:
        draws: ``{site: Tensor[S, *shape]}`` of the continuous latent sites.
        sites: the enumerated site names.
        num_draws: S, needed when ``draws`` is empty (every latent site is discrete).

    Returns:
        ``{site: Tensor[S, *shape]}`` for each of ``sites``.
    """
    if not sites:
        return {}
    runnable = with_hyperparameters(model, hyperparameters)
    structure = inspect_model(runnable, args, kwargs)
    nesting = structure.max_plate_nesting
    num_draws = next(iter(draws.values())).shape[0] if draws else int(num_draws)
    try:
        reshaped = {
            n: to_outer_plate(v, structure.sites[n].value_shape, len(structure.sites[n].event_shape), nesting)
            for n, v in draws.items()
        }
        batched = under_outer_plate(poutine.condition(runnable, data=reshaped), _DRAW_PLATE, num_draws, nesting)
        sampler = infer_discrete(config_enumerate(batched, "parallel"), first_available_dim=-nesting - 2)
        with torch.no_grad():
            trace = poutine.trace(sampler).get_trace(*args, **kwargs)
        return {n: per_point(trace.nodes[n]["value"], num_draws, structure.sites[n].value_shape) for n in sites}
    except (RuntimeError, ValueError, IndexError):
        rows = []
        for i in range(num_draws):
            conditioned = poutine.condition(runnable, data={n: v[i] for n, v in draws.items()})
            sampler = infer_discrete(config_enumerate(conditioned, "parallel"), first_available_dim=-nesting - 1)
            with torch.no_grad():
                trace = poutine.trace(sampler).get_trace(*args, **kwargs)
            rows.append({n: trace.nodes[n]["value"].reshape(structure.sites[n].value_shape) for n in sites})
        return {n: torch.stack([row[n] for row in rows]) for n in sites}
