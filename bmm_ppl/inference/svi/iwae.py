"""Evidence bounds from a fitted guide: the ELBO and the importance-weighted (IWAE) bound.

Both come from the same log importance weights ``log w = log p(x, z) - log q(z)``, ``z ~ q``:

- ELBO: ``E[log w]``, estimated by the mean of ``S`` weights, stderr ``sd / sqrt(S)``.
- IWAE with ``K`` samples (Burda et al. 2016): ``E[log (1/K) sum_k w_k]``, which rises with ``K`` from the
  ELBO (``K = 1``) to ``log p(x)``; estimated from ``M`` independent groups of ``K`` weights.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import pyro
import pyro.poutine as poutine
import torch

from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.program.log_density import site_log_prob
from bmm_ppl.inference.program.sites import is_sample_site
from bmm_ppl.inference.svi.guides import GuideLatents, is_point_mass
from bmm_ppl.inference.svi.core import per_particle, vectorised, traced_log_weights


def log_importance_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int,
    chunk_size: int = 1000,
    device=None,
    vectorise: bool | None = None,
) -> torch.Tensor:
    """``log p(x, z_s) - log q(z_s)`` for ``num_particles`` draws ``z_s ~ q``, in vectorised chunks (one
    draw at a time where ``vectorise`` is ``False``, see :func:`~bmm_ppl.inference.svi.core.traced_log_weights`).

    Returns:
        Tensor[num_particles], on the device the model computes on.
    """
    chunks, remaining = [], int(num_particles)
    with torch.no_grad():
        while remaining > 0:
            size = min(chunk_size, remaining)
            log_w, _, _, _ = traced_log_weights(model, guide, args, kwargs, size, max_plate_nesting, device, vectorise)
            chunks.append(log_w.reshape(-1).expand(size) if log_w.numel() == 1 else log_w.reshape(-1))
            remaining -= size
    return torch.cat(chunks)


def elbo_from_weights(log_weights: torch.Tensor) -> Evidence:
    """The ELBO estimate ``mean(log w)`` with its Monte-Carlo standard error.

    Examples:
        >>> elbo_from_weights(torch.tensor([-1.0, -3.0]))
        Evidence(value=-2.0, stderr=1.0, method='elbo')
    """
    count = log_weights.numel()
    stderr = float(log_weights.std() / math.sqrt(count)) if count > 1 else None
    return Evidence(float(log_weights.mean()), stderr, "elbo")


def iwae_from_weights(log_weights: torch.Tensor, num_samples: int) -> Evidence:
    """The IWAE bound with ``num_samples`` (K) weights per estimate, averaged over the ``len // K`` groups.

    Examples:
        >>> iwae_from_weights(torch.zeros(8), 4)
        Evidence(value=0.0, stderr=0.0, method='iwae')
    """
    groups = log_weights.numel() // num_samples
    if groups < 1:
        raise ValueError(f"need at least num_samples={num_samples} weights, got {log_weights.numel()}")
    grouped = log_weights[: groups * num_samples].reshape(groups, num_samples)
    estimates = torch.logsumexp(grouped, dim=1) - math.log(num_samples)
    stderr = float(estimates.std() / math.sqrt(groups)) if groups > 1 else None
    return Evidence(float(estimates.mean()), stderr, "iwae")


def iwae_bound(posterior, num_particles: int = 100, num_estimates: int = 50, chunk_size: int = 1000) -> Evidence:
    """The importance-weighted evidence bound of an SVI posterior, tighter than its ELBO.

    Args:
        posterior: a :class:`~bmm_ppl.inference.Posterior` returned by :class:`~bmm_ppl.inference.SVI` in
            this process (it needs the fitted guide; a posterior loaded from disk keeps draws only).
        num_particles: K, the importance samples inside each log-mean-exp.
        num_estimates: M, independent estimates averaged (the stderr comes from their spread).

    Returns:
        ``Evidence(method="iwae")``; ``ELBO <= IWAE_K <= log p(x)`` in expectation.

    Example (not run here):
        post = SVI(guide="mvn").fit(model, x, y)
        iwae_bound(post, num_particles=1000).value   # between post.log_evidence.value and the evidence
    """
    latents = posterior.latent_distribution
    if not isinstance(latents, GuideLatents):
        raise ValueError(
            "iwae_bound needs a posterior fitted by SVI in this process (it reruns the guide); "
            f"this one holds {type(latents).__name__}"
        )
    if is_point_mass(latents.guide):
        raise ValueError("a point-mass guide (AutoDelta) has no density: it gives no evidence bound")
    if num_particles < 1 or num_estimates < 1:
        raise ValueError(f"num_particles and num_estimates must be positive, got {num_particles}, {num_estimates}")
    model = posterior.model_or_raise()
    with pyro.get_param_store().scope(latents.param_state):
        log_w = log_importance_weights(
            model, latents.guide, posterior.args, posterior.kwargs, num_particles * num_estimates,
            latents.max_plate_nesting, chunk_size, latents.device,
        )
    return iwae_from_weights(log_w, num_particles)


def streamed_log_importance_weights(
    model: Callable,
    guide: Callable,
    batches: Iterable[tuple],
    data_plate: str,
    num_particles: int,
    max_plate_nesting: int,
    chunk_size: int = 1000,
    device=None,
) -> torch.Tensor:
    """:func:`log_importance_weights` over data that arrive in batches (e.g. a ``DataLoader``).

    The guide must hold only global latents: each chunk of particles is drawn once and replayed on every
    batch; the sites inside ``data_plate`` add up over the batches, the others count once.

    Args:
        batches: a re-iterable of model argument tuples covering the data once per pass.

    Returns:
        Tensor[num_particles].
    """
    chunks, remaining = [], int(num_particles)
    with torch.no_grad():
        while remaining > 0:
            size = min(chunk_size, remaining)
            guide_trace, total = None, 0.0
            for batch in batches:
                first_batch = guide_trace is None
                if first_batch:
                    guide_run = vectorised(guide, size, max_plate_nesting, device)
                    guide_trace = poutine.trace(guide_run).get_trace(*batch)
                    for site in _sample_sites(guide_trace):
                        total = total - per_particle(site_log_prob(site, guide_trace), size, max_plate_nesting)
                model_run = vectorised(model, size, max_plate_nesting, device)
                trace = poutine.trace(poutine.replay(model_run, trace=guide_trace)).get_trace(*batch)
                for site in _sample_sites(trace):
                    # global sites count once, data sites once per batch
                    if first_batch or any(frame.name == data_plate for frame in site["cond_indep_stack"]):
                        total = total + per_particle(site_log_prob(site, trace), size, max_plate_nesting)
            if guide_trace is None:
                raise ValueError("the data loader yielded no batches")
            chunks.append(total.reshape(-1).expand(size) if total.numel() == 1 else total.reshape(-1))
            remaining -= size
    return torch.cat(chunks)


def _sample_sites(trace):
    return [s for s in trace.nodes.values() if is_sample_site(s)]
