"""A program's output site: the value recorded with ``pyro.deterministic`` (a network's logits, a
regression's mean) that the observations' distribution is a function of.

Curvature engines split the log-likelihood at it: the network ``theta -> f`` is differentiated to the
output (a Jacobian) and the likelihood ``f -> log p(y | f)`` from it (a Hessian in ``f``), the two halves
of a generalised Gauss-Newton matrix. :class:`ReplaceDeterministic` runs the program with chosen values
at such sites, so that the likelihood can be read as a function of the output alone.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger

from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.program.sites import with_hyperparameters


def deterministic_sites(trace) -> list[str]:
    """The names of the ``pyro.deterministic`` sites of a trace, in program order."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and site["infer"].get("_deterministic", False)]


def choose_output_site(trace, output: str | None) -> str:
    """``output`` checked against the trace's deterministic sites, or the only one when ``None``.

    Raises:
        UnsupportedModelError: no deterministic site, or several and none chosen, or an unknown name.
    """
    names = deterministic_sites(trace)
    if output is not None:
        if output not in names:
            raise UnsupportedModelError(
                f"output={output!r} is not a pyro.deterministic site of the model; its deterministic sites are {names}"
            )
        return output
    if len(names) == 1:
        return names[0]
    if not names:
        raise UnsupportedModelError(
            "a generalised Gauss-Newton curvature needs the observations' parameters recorded as an output, "
            "e.g. pyro.deterministic('logits', f) before pyro.sample('obs', Categorical(logits=f), obs=y); "
            "or use curvature='ef' (the empirical Fisher), which needs no output"
        )
    raise UnsupportedModelError(f"the model has several pyro.deterministic sites {names}: pass output= to choose one")


class ReplaceDeterministic(Messenger):
    """Runs a program with ``values[name]`` in place of what ``pyro.deterministic(name, ...)`` computed:
    the call returns the given value, so that what the program does next depends on it alone.

    Examples:
        >>> import pyro, torch
        >>> def model():
        ...     return pyro.deterministic("f", torch.zeros(2)) + 1
        >>> ReplaceDeterministic({"f": torch.ones(2)})(model)()
        tensor([2., 2.])
    """

    def __init__(self, values: dict):
        super().__init__()
        self.values = dict(values)

    def _pyro_sample(self, msg):
        value = self.values.get(msg["name"])
        if value is None or not msg["infer"].get("_deterministic", False):
            return
        fn = msg["fn"]
        base = getattr(fn, "base_dist", fn)
        event_dim = getattr(base, "event_dim", len(fn.event_shape))
        msg["fn"] = dist.Delta(value, event_dim=event_dim).mask(False)
        msg["value"] = value




def output_at(model, values: dict, hyperparameters: dict, args: tuple, kwargs: dict, output: str):
    """The value of the output site ``output`` of one run of ``model(*args, **kwargs)`` with its latent
    sites fixed to ``values`` and its ``pyro.param`` sites to ``hyperparameters`` (differentiable in
    ``values``): e.g. a network's output at new inputs, for a linearised predictive."""
    conditioned = poutine.condition(with_hyperparameters(model, hyperparameters), data=values)
    with pyro.get_param_store().scope():
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
    if output not in trace.nodes:
        raise UnsupportedModelError(f"the model has no site {output!r} at these inputs")
    return trace.nodes[output]["value"]


__all__ = ["ReplaceDeterministic", "choose_output_site", "deterministic_sites", "output_at"]
