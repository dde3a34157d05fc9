"""The log-density of a recorded run: each site's ``log_prob`` with ``mask`` and ``scale`` applied once.

Written out (rather than ``trace.log_prob_sum()``) so that it runs under ``torch.func`` and graph
capture, and so that a sum can keep a leading batch dimension (draws, chains or particles of an outer
plate).

``obs_mask`` (``pyro.sample(..., obs=y, obs_mask=m)``) splits a site into ``<name>_observed`` (masked by
``m``) and ``<name>_unobserved`` (masked by ``~m``), whose masked-out entries are replaced by the data
and so influence nothing: there they keep the site's own density, which makes them proper (each such
entry is then a draw from its prior) instead of an unbounded flat direction for a sampler.
"""

from __future__ import annotations

import torch

from bmm_ppl.inference.program.sites import is_sample_site

_UNOBSERVED_SUFFIX = "_unobserved"


def _is_imputed_part(site: dict, trace) -> bool:
    """The latent half of an ``obs_mask`` site (see the module docstring)."""
    name = site["name"]
    if not name.endswith(_UNOBSERVED_SUFFIX):
        return False
    base = name[: -len(_UNOBSERVED_SUFFIX)]
    observed = trace.nodes.get(base + "_observed") if trace is not None else None
    return observed is not None and observed["is_observed"]


def apply_mask(log_prob: torch.Tensor, mask) -> torch.Tensor:
    """``log_prob`` with zeros where a site's ``mask`` (a bool tensor, ``False`` or ``None``) excludes it."""
    if isinstance(mask, torch.Tensor):
        return torch.where(mask.bool(), log_prob, log_prob.new_zeros(()))
    if mask is not None and not mask:
        return torch.zeros_like(log_prob)
    return log_prob


def site_log_prob(site: dict, trace=None) -> torch.Tensor:
    """``scale * log p(value)`` of one sample site, zero where its ``mask`` is False.

    Args:
        site: a sample site of a ``poutine.Trace``.
        trace: the trace it belongs to (needed to recognise an ``obs_mask`` site's imputed half).

    Returns:
        a tensor of the site's batch shape (or a broadcast of it).

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     with pyro.plate("data", 3), pyro.poutine.mask(mask=torch.tensor([True, False, True])):
        ...         pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(3))
        >>> site_log_prob(pyro.poutine.trace(model).get_trace().nodes["y"])
        tensor([-0.9189,  0.0000, -0.9189])
    """
    log_prob = site["fn"].log_prob(site["value"])
    if not _is_imputed_part(site, trace):
        log_prob = apply_mask(log_prob, site["mask"])
    scale = site["scale"]
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        log_prob = log_prob * scale
    return log_prob


def sum_keeping_batch(log_prob: torch.Tensor, batch: int | None, nesting: int) -> torch.Tensor:
    """Sums a site's log-density over everything right of an outer plate at ``dim = -nesting - 1``.

    Args:
        log_prob: the site's (masked, scaled) log-density.
        batch: the outer plate's size, or ``None`` when there is no outer plate (then a scalar comes back).
        nesting: the program's plate nesting (see :func:`~bmm_ppl.inference.program.sites.guess_max_plate_nesting`).

    Returns:
        ``Tensor[batch]`` (a site that does not depend on the batch is broadcast), or a scalar.

    Examples:
        >>> sum_keeping_batch(torch.ones(4, 1, 3), 4, 2), sum_keeping_batch(torch.ones(3), 4, 2)
        (tensor([3., 3., 3., 3.]), tensor([3., 3., 3., 3.]))
    """
    if batch is None:
        return log_prob.sum()
    if log_prob.dim() <= nesting:  # does not depend on the batch
        return log_prob.sum().expand(batch)
    leading = log_prob.dim() - nesting - 1
    per = log_prob.sum(tuple(range(log_prob.dim() - nesting, log_prob.dim()))) if nesting else log_prob
    if leading:
        raise ValueError(f"a log-density of shape {tuple(log_prob.shape)} has dimensions left of the outer plate")
    if per.shape[0] == batch:
        return per
    if per.shape[0] == 1:
        return per.expand(batch)
    raise ValueError(f"a log-density of shape {tuple(log_prob.shape)} does not separate over {batch} points")


def log_density(trace, batch: int | None = None, nesting: int = 0, sites=None, exclude=()) -> torch.Tensor:
    """``sum_site log p`` of a recorded run (masked and scaled), optionally per point of an outer plate.

    Args:
        trace: a ``poutine.Trace``.
        batch: the outer plate's size, as :func:`sum_keeping_batch` (``batch=None``: one scalar).
        nesting: the program's plate nesting, as :func:`sum_keeping_batch`.
        sites: only these site names (default: every sample site).
        exclude: site names left out.

    Returns:
        ``Tensor[batch]`` or a scalar.
    """
    total = None
    for name, site in trace.nodes.items():
        if not is_sample_site(site) or name in exclude or (sites is not None and name not in sites):
            continue
        term = sum_keeping_batch(site_log_prob(site, trace), batch, nesting)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the program has no sample sites in this selection: its log-density is undefined")
    return total
