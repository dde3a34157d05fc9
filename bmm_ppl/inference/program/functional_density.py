"""A Pyro model's log joint and log-likelihood as pure functions of its latent sites' unconstrained
values and its ``pyro.param`` values, for :mod:`torch.func` (hypergradients, training speed).

The per-site dictionary counterpart of :class:`~bmm_ppl.inference.program.potential.ModelPotential`
(which packs the latents into one flat vector and refuses ``pyro.param`` sites); both sum the trace
through :func:`~bmm_ppl.inference.program.log_density.log_density`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import biject_to, constraints

from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.program.log_density import log_density
from bmm_ppl.inference.program.outputs import ReplaceDeterministic
from bmm_ppl.inference.program.sites import is_latent_site, is_observed_site, is_sample_site

Tensors = dict[str, torch.Tensor]


class PyroDensity:
    """A Pyro model's log joint and log-likelihood as pure functions of its latent sites' unconstrained
    values, for :mod:`torch.func`. The model is traced once (inside a scoped param store) to find its
    latent, observed and ``pyro.param`` sites.

    Args:
        model: a Pyro program.
        args: one set of its positional arguments (observations included) to trace it with.
        kwargs: its keyword arguments to trace it with (``None``: none).

    Examples:
        >>> from bmm_ppl.models import BayesianLinearRegression
        >>> density = PyroDensity(BayesianLinearRegression(alpha=None, beta=1.0), (torch.ones(3), torch.ones(3)))
        >>> density.latent_sites, density.observed_sites, sorted(density.param_constraints)
        (['w'], ['obs'], ['alpha'])
    """

    def __init__(self, model: Callable, args: tuple, kwargs: Mapping | None = None):
        self.model = model
        with pyro.get_param_store().scope():
            trace = poutine.trace(model).get_trace(*args, **dict(kwargs or {}))
        samples = {n: s for n, s in trace.nodes.items() if is_sample_site(s)}
        # Conditioning on the latents marks them observed too: remember which sites the model observes.
        self.observed_sites = [n for n, s in samples.items() if is_observed_site(s)]
        self.latent_sites = [n for n, s in samples.items() if is_latent_site(s)]
        if not self.latent_sites:
            raise UnsupportedModelError("the model has no latent sample sites: there is nothing to train")
        if not self.observed_sites:
            raise UnsupportedModelError("the model observed nothing; pass the observations with the data")
        self.bijections = {n: biject_to(samples[n]["fn"].support) for n in self.latent_sites}
        self.initial = {n: samples[n]["value"].detach() for n in self.latent_sites}
        params = {n: s for n, s in trace.nodes.items() if s["type"] == "param"}
        self.param_constraints = {n: s["kwargs"].get("constraint", constraints.real) for n, s in params.items()}
        self.param_values = {n: s["value"].detach() for n, s in params.items()}

    def unconstrain(self, latents: Mapping[str, torch.Tensor]) -> Tensors:
        """Unconstrained values of the latents (the traced prior draw for those not given)."""
        return {n: self.bijections[n].inv(latents.get(n, self.initial[n]).detach()) for n in self.latent_sites}

    def constrain(self, unconstrained: Mapping[str, torch.Tensor]) -> Tensors:
        return {n: self.bijections[n](unconstrained[n]) for n in unconstrained}

    def trace(self, unconstrained: Tensors, param_values: Tensors, args: tuple, kwargs: Mapping | None = None,
              observations: bool = True, deterministic: Mapping | None = None):
        """One run of the model at the given latents and ``pyro.param`` values; ``observations=False``
        leaves the observed sites out of the trace (for the prior alone); ``deterministic`` gives values
        to ``pyro.deterministic`` sites (:class:`~bmm_ppl.inference.program.outputs.ReplaceDeterministic`)."""
        model = self.model if not deterministic else ReplaceDeterministic(dict(deterministic))(self.model)
        conditioned = poutine.condition(poutine.substitute(model, data=param_values), data=self.constrain(unconstrained))
        if not observations:
            conditioned = poutine.block(conditioned, hide=self.observed_sites)
        with pyro.get_param_store().scope():
            return poutine.trace(conditioned).get_trace(*args, **dict(kwargs or {}))

    def log_joint(
        self, unconstrained: Tensors, param_values: Tensors, args: tuple, kwargs: Mapping | None = None, observations: bool = True
    ) -> torch.Tensor:
        """``log p(observations, latents)`` plus the log-Jacobian of the unconstraining map (the prior
        alone with ``observations=False``)."""
        trace = self.trace(unconstrained, param_values, args, kwargs, observations)
        jacobian = sum(
            self.bijections[n].log_abs_det_jacobian(unconstrained[n], trace.nodes[n]["value"]).sum() for n in unconstrained
        )
        return log_density(trace) + jacobian

    def log_likelihood(self, unconstrained: Tensors, param_values: Tensors, args: tuple, kwargs: Mapping | None = None,
                       deterministic: Mapping | None = None) -> torch.Tensor:
        """``log p(observations | latents)``: the observed sites only (at given ``deterministic`` values)."""
        trace = self.trace(unconstrained, param_values, args, kwargs, deterministic=deterministic)
        return log_density(trace, sites=set(self.observed_sites))
