"""Running a Pyro model under many posterior draws at once: predictive draws and pointwise log-likelihoods.

Draws are conditioned on in one vectorised run (an outer ``pyro.plate`` to the left of the model's
own batch dimensions), falling back to one run per draw when the model does not broadcast.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
import torch

from bmm_ppl.inference.program.log_density import apply_mask
from bmm_ppl.inference.program.batching import per_point, to_outer_plate, under_outer_plate
from bmm_ppl.inference.program.sites import (  # re-exported: the structure a run shows
    ModelStructure,
    SiteInfo,
    inspect_model,
    observed_values,
    with_hyperparameters,
)

_DRAW_PLATE = "_bmm_posterior_draws"

__all__ = [
    "ModelStructure",
    "SiteInfo",
    "inspect_model",
    "observed_values",
    "pointwise_log_likelihood",
    "predictive_draws",
    "redraw_observed",
    "run_under_draws",
]


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
        left of the model's batch dimensions, or ``([trace_1, ..., trace_S], False)`` when the model would
        not broadcast.
    """
    hyperparameters = dict(hyperparameters or {})
    structure = structure or inspect_model(model, args, kwargs, hyperparameters)
    # Recorded pyro.deterministic values (a network's output) are computed from the latents, not fixed.
    draws = {n: v for n, v in draws.items() if n in structure.sites}
    num_draws = next(iter(draws.values())).shape[0] if draws else 1
    nesting = structure.max_plate_nesting
    try:
        reshaped = {
            n: to_outer_plate(v, structure.sites[n].value_shape, len(structure.sites[n].event_shape), nesting)
            for n, v in draws.items()
        }
        vectorised = under_outer_plate(model, _DRAW_PLATE, num_draws, nesting)
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
            out[name] = per_point(traces[0].nodes[name]["value"], num_draws, shape)
        else:
            out[name] = torch.stack([t.nodes[name]["value"].reshape(shape) for t in traces])
    return out


def _masked_log_prob(site: dict) -> torch.Tensor:
    """``log p(y_i | draw)`` of an observed site, zero where a ``poutine.mask`` excludes the entry."""
    return apply_mask(site["fn"].log_prob(site["value"]), site["mask"])


def pointwise_log_likelihood(
    model: Callable,
    args: tuple,
    kwargs: dict,
    draws: dict[str, torch.Tensor],
    hyperparameters: dict | None = None,
) -> dict[str, torch.Tensor]:
    """``log p(y_i | draw)`` for every observed site (unscaled: a ``poutine.scale`` tempers the fit, not the
    data's likelihood; zero where a mask excludes the entry).

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
        batch_shape = torch.broadcast_shapes(info.batch_shape, info.value_shape[: len(info.value_shape) - len(info.event_shape)])
        n_obs = max(1, math.prod(batch_shape))
        if vectorised:
            out[name] = per_point(_masked_log_prob(traces[0].nodes[name]), num_draws, (n_obs,))
        else:
            out[name] = torch.stack([_masked_log_prob(t.nodes[name]).reshape(n_obs) for t in traces])
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
