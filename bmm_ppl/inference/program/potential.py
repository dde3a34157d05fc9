"""A Pyro model turned into a potential over one flat unconstrained parameter vector, batched over chains.

Sampling engines (NUTS, HMC, SGLD) need ``U(z) = -log p(data, T(z)) - log |det dT(z)/dz|`` as a pure
function of a flat ``z``. :class:`ModelPotential` traces the model once to find its latent sites, their
supports and the bijections ``T = biject_to(support)``, then evaluates ``U`` for a batch of ``C`` points in
ONE run of the model, with an outer ``pyro.plate`` over the batch placed left of the model's own plates.
Models that do not broadcast under such a plate are run once per point instead (detected at build time).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import pyro
import torch
from torch.distributions import biject_to

from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.program.batching import to_outer_plate, under_outer_plate
from bmm_ppl.inference.program.enumeration import draw_discrete, marginal_log_joint
from bmm_ppl.inference.program.log_density import log_density
from bmm_ppl.inference.program.sites import (
    subsampled_plates,
    check_supports,
    guess_max_plate_nesting,
    is_enumerated_site,
    is_latent_site,
    prototype_trace,
    trace_under,
)

_CHAIN_PLATE = "_bmm_chains"


@dataclasses.dataclass(frozen=True)
class LatentSite:
    """One continuous latent site: its constrained shape, unconstrained shape and place in the flat vector."""

    name: str
    value_shape: tuple
    event_dim: int
    unconstrained_shape: tuple
    offset: int
    transform: torch.distributions.Transform

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


class ModelPotential:
    """The potential energy of a Pyro model's continuous latent sites over one flat unconstrained vector.

    Args:
        model: a Pyro program, run as ``model(*args, **kwargs)``; every latent site must be continuous (or
            discrete with finite support, which is refused here by name) and the model must have no
            ``pyro.param`` sites (fix them or give them hyperpriors).
        args: the data, as positional arguments.
        kwargs: the data, as keyword arguments.
        allow_subsample: accept plates with ``subsample_size`` (a stochastic potential: right for SG-MCMC,
            whose gradient is stochastic anyway; refused for HMC/NUTS, whose target must be fixed).

    Attributes:
        sites: the :class:`LatentSite` list in flat-vector order; ``dim`` the flat size.
        vectorised: whether a batch of points is evaluated in one run of the model.
        max_plate_nesting: the program's batch dimensions (plates and sites' batch shapes).

    Raises:
        UnsupportedModelError: before any work, naming the site and the feature.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> U = ModelPotential(model, (torch.zeros(3),))
        >>> U.dim, U(torch.zeros(2, 1)).shape
        (1, torch.Size([2]))
    """

    def __init__(self, model: Callable, args: tuple = (), kwargs: dict | None = None, allow_subsample: bool = False):
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        trace = prototype_trace(model, self.args, self.kwargs)
        check_sampler_support(trace, allow_subsample=allow_subsample)
        self.max_plate_nesting = guess_max_plate_nesting(trace)
        self.enumerated = tuple(n for n, site in trace.nodes.items() if is_enumerated_site(site))
        sites, offset = [], 0
        for name, site in trace.nodes.items():
            if not is_latent_site(site) or name in self.enumerated:
                continue
            fn = site["fn"]
            transform = biject_to(fn.support)
            value_shape = tuple(site["value"].shape)
            unconstrained_shape = tuple(transform.inv.forward_shape(value_shape))
            sites.append(LatentSite(name, value_shape, len(fn.event_shape), unconstrained_shape, offset, transform))
            offset += math.prod(unconstrained_shape)
        self.sites = sites
        self.dim = offset
        example = trace.nodes[sites[0].name]["value"]
        self.dtype, self.device = example.dtype, example.device
        self.vectorised = True
        self.vectorised = self._broadcasts()

    # ---------------------------------------------------------------- unpack
    def constrain(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{site: Tensor[B, *value_shape]}`` in constrained space from ``flat: Tensor[B, dim]``."""
        return self._unpack(flat)[0]

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`constrain`: ``Tensor[B, dim]`` from ``{site: Tensor[B, *value_shape]}``."""
        parts = []
        for site in self.sites:
            value = values[site.name]
            parts.append(site.transform.inv(value).reshape(value.shape[0], -1))
        return torch.cat(parts, -1)

    def _unpack(self, flat: torch.Tensor):
        batch = flat.shape[0]
        values, log_det = {}, flat.new_zeros(batch)
        for site in self.sites:
            raw = flat[:, site.offset: site.offset + site.size].reshape((batch,) + site.unconstrained_shape)
            value = site.transform(raw)
            log_det = log_det + site.transform.log_abs_det_jacobian(raw, value).reshape(batch, -1).sum(-1)
            values[site.name] = value
        return values, log_det

    # --------------------------------------------------------------- evaluate
    def log_joint(self, values: dict[str, torch.Tensor], data: tuple | None = None) -> torch.Tensor:
        """``log p(data, values)``: Tensor[B] for ``values = {site: Tensor[B, *value_shape]}``.

        ``data = (args, kwargs)`` replaces the fitted data (a minibatch; for its ``n / batch_size`` scaling
        see :func:`~bmm_ppl.inference.program.minibatch.with_observed_scale`). Masks and scales apply
        (:func:`~bmm_ppl.inference.program.log_density.log_density`); Pyro's argument validation is off
        (a sampler's excursion outside the support comes back as an infinite potential, not an exception).
        """
        args, kwargs = data if data is not None else (self.args, self.kwargs)
        batch = next(iter(values.values())).shape[0]
        if self.enumerated and not self.vectorised:
            return torch.stack([marginal_log_joint(self.model, {n: v[i] for n, v in values.items()}, args, kwargs,
                                                   self.max_plate_nesting) for i in range(batch)])
        if not self.vectorised:
            rows = [log_density(trace_under(self.model, args, kwargs, {n: v[i] for n, v in values.items()}))
                    for i in range(batch)]
            return torch.stack(rows)
        nesting = self.max_plate_nesting
        reshaped = {s.name: to_outer_plate(values[s.name], s.value_shape, s.event_dim, nesting) for s in self.sites}
        if self.enumerated:
            return marginal_log_joint(self.model, reshaped, args, kwargs, nesting, batch, self.device)
        batched = under_outer_plate(self.model, _CHAIN_PLATE, batch, nesting, self.device)
        with pyro.validation_enabled(False):
            trace = trace_under(batched, args, kwargs, reshaped)
            return log_density(trace, batch, nesting)

    def discrete_draws(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Draws of the enumerated sites from their conditional posterior given each continuous point
        (:func:`~bmm_ppl.inference.program.enumeration.draw_discrete`): ``{site: Tensor[B, *shape]}`` for
        ``values = {site: Tensor[B, *value_shape]}`` (empty when nothing is enumerated)."""
        return draw_discrete(self.model, self.args, self.kwargs, values, self.enumerated)

    def __call__(self, flat: torch.Tensor, data: tuple | None = None) -> torch.Tensor:
        """``U(flat)``: Tensor[B] potential energy (negative log joint with Jacobian) at ``flat: Tensor[B, dim]``
        (``data``: a minibatch, see :meth:`log_joint`)."""
        values, log_det = self._unpack(flat)
        with pyro.validation_enabled(False):
            return -(self.log_joint(values, data) + log_det)

    def potential_and_grad(self, flat: torch.Tensor, data: tuple | None = None):
        """``(U: Tensor[B], dU/dflat: Tensor[B, dim])``; each point's gradient is its own."""
        with torch.enable_grad():
            point = flat.detach().requires_grad_(True)
            energy = self(point, data)
            (grad,) = torch.autograd.grad(energy.sum(), point)
        return energy.detach(), grad

    # ----------------------------------------------------------------- checks
    def _broadcasts(self) -> bool:
        """Whether one batched run of the model gives the same potential as one run per point."""
        points = torch.rand(2, self.dim, dtype=self.dtype, device=self.device) * 4 - 2
        try:
            with torch.no_grad():
                batched = self(points)
        except (RuntimeError, ValueError, IndexError):
            return False
        self.vectorised = False
        with torch.no_grad():
            looped = self(points)
        self.vectorised = True
        if batched.shape != looped.shape:
            return False
        finite = torch.isfinite(looped)
        return bool(torch.equal(finite, torch.isfinite(batched))) and bool(
            torch.allclose(batched[finite], looped[finite], rtol=1e-4, atol=1e-4)
        )


def check_sampler_support(trace, allow_subsample: bool = False) -> None:
    """Refuses, by site and feature, what a sampler over a fixed continuous target cannot run.

    Raises:
        UnsupportedModelError: ``pyro.param`` sites; discrete latent sites; plates with
            ``subsample_size`` (unless ``allow_subsample``); no latent site at all.
    """
    params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
    if params:
        raise UnsupportedModelError(
            f"the model has pyro.param sites {params}, which a sampler cannot learn: fix them (a number) "
            f"or give them hyperpriors (a distribution), or fit them by type-II with Exact/SVI"
        )
    subsampled = [] if allow_subsample else subsampled_plates(trace)
    if subsampled:
        plate = trace.nodes[subsampled[0]]
        raise UnsupportedModelError(
            f"plate {subsampled[0]!r} has subsample_size={plate['value'].numel()} of {plate['fn'].size}: a "
            f"subsampled plate makes the target stochastic (a fresh subsample at every evaluation), which "
            f"HMC/NUTS cannot sample; remove subsample_size (the full plate) or use SGLD/SVI"
        )
    check_supports(trace)
    latent, enumerated = [], []
    for name, site in trace.nodes.items():
        if not is_latent_site(site):
            continue
        if is_enumerated_site(site):
            enumerated.append(name)
            if site["fn"].support.is_discrete and not getattr(site["fn"], "has_enumerate_support", False):
                raise UnsupportedModelError(
                    f"site {name!r} is marked for enumeration but its {type(site['fn']).__name__} support is not finite"
                )
            continue  # summed out by enumeration
        if site["fn"].support.is_discrete:
            raise UnsupportedModelError(
                f"site {name!r} is discrete with an unbounded support ({type(site['fn']).__name__}); gradient-based "
                f"samplers need continuous latent sites or discrete ones with finite support (enumerated out)"
            )
        latent.append(name)
    if not latent:
        summed = f" (its discrete sites {enumerated} are summed out)" if enumerated else ""
        raise UnsupportedModelError(f"the model has no continuous latent sample sites to sample{summed}")


# ---------------------------------------------------------------------------- helpers for engine wrappers
def check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be a Pyro program (a callable), got {type(model).__name__}")


def uniform_init(potential_and_grad, num_chains: int, dim: int, dtype, device, radius: float = 2.0, max_tries: int = 100):
    """Per chain, a point drawn uniformly from ``[-radius, radius]^dim`` in unconstrained space (as Pyro
    does) where the potential and its gradient are finite; redrawn where they are not.

    Returns:
        ``(z: Tensor[C, D], potential: Tensor[C], grad: Tensor[C, D])``.
    """
    z = (torch.rand(num_chains, dim, dtype=dtype, device=device) * 2 - 1) * radius
    energy, grad = potential_and_grad(z)
    for _ in range(max_tries):
        ok = torch.isfinite(energy) & torch.isfinite(grad).all(-1)
        if bool(ok.all()):
            return z, energy, grad
        fresh = (torch.rand(num_chains, dim, dtype=dtype, device=device) * 2 - 1) * radius
        z = torch.where(ok.unsqueeze(-1), z, fresh)
        energy, grad = potential_and_grad(z)
    raise ValueError(
        f"found no initial point with a finite potential in {max_tries} tries of uniform(-{radius}, {radius}) "
        f"in unconstrained space; check the model's support and data"
    )


def compiled_potential_and_grad(potential: "ModelPotential", example: torch.Tensor):
    """A faster ``potential.potential_and_grad`` for inputs shaped like ``example: Tensor[C, D]``: the
    forward and backward pass captured together as one simplified graph of tensor operations
    (:func:`~bmm_ppl.inference.program.graph_capture.capture` of :func:`functional_potential_and_grad`, with
    distribution argument validation off while capturing), so each call runs without Python or autograd
    overhead. Recording refuses Python control flow on latent values (it raises), and the graph must
    reproduce the eager potential and gradient at a random point, or it is dropped.

    Returns:
        ``(potential_and_grad, "graph")``, or ``(None, "none")`` where the model cannot be captured.
    """
    captured = captured_potential_graph(potential, example)
    return (captured[0], "graph") if captured is not None else (None, "none")


def captured_potential_graph(potential: "ModelPotential", example: torch.Tensor):
    """As :func:`compiled_potential_and_grad`: ``(scripted, graph)`` or ``None``, where ``graph`` is the
    simplified ``make_fx`` graph of the same function (aten operations only: cheap to record again inside
    a larger captured function, such as a NUTS leaf)."""
    from bmm_ppl.inference.program.graph_capture import capture_checked

    generator = torch.Generator(device=example.device).manual_seed(0)  # leaves the global RNG alone
    probe = example + torch.randn(example.shape, generator=generator, dtype=example.dtype, device=example.device) * 0.5
    return capture_checked(functional_potential_and_grad(potential), [example], [probe],
                           potential.potential_and_grad, with_graph=True)


def functional_potential_and_grad(potential: "ModelPotential"):
    """``z: Tensor[B, D] -> (U: Tensor[B], dU/dz: Tensor[B, D])`` written with ``torch.func`` (no
    ``torch.autograd.grad``), so that graph capture (``make_fx``) can record it inside a larger function."""

    def total_and_values(z):
        values = potential(z)
        return values.sum(), values

    grad_and_value = torch.func.grad_and_value(total_and_values, has_aux=True)

    def potential_and_grad(z):
        grad, (_, value) = grad_and_value(z)
        return value, grad

    return potential_and_grad


def constrained_draws(potential: "ModelPotential", flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{site: Tensor[C, S, *value_shape]}`` for every latent site and ``pyro.deterministic`` site, from
    unconstrained draws ``flat: Tensor[C, S, D]``."""
    from bmm_ppl.inference.program.runs import predictive_draws
    from bmm_ppl.inference.program.sites import inspect_model

    chains, per_chain, dim = flat.shape
    with torch.no_grad():
        values = potential.constrain(flat.reshape(chains * per_chain, dim))
        values.update(potential.discrete_draws(values))
        structure = inspect_model(potential.model, potential.args, potential.kwargs)
        if structure.deterministic_sites:
            extra = predictive_draws(potential.model, potential.args, potential.kwargs, values)
            values.update({n: extra[n] for n in structure.deterministic_sites})
    return {n: v.reshape((chains, per_chain) + v.shape[1:]) for n, v in values.items()}
