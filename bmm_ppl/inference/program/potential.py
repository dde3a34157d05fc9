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
import pyro.poutine as poutine
from pyro.poutine.util import site_is_factor, site_is_subsample
import torch
from torch.distributions import biject_to

from bmm_ppl.inference.errors import UnsupportedModelError

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


def _sum_to_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    return value.reshape(batch, -1).sum(-1)


class ModelPotential:
    """The potential energy of a Pyro model's continuous latent sites over one flat unconstrained vector.

    Args:
        model: a Pyro program, run as ``model(*args, **kwargs)``; every latent site must be continuous and
            the model must have no ``pyro.param`` sites (fix them or give them hyperpriors).
        args, kwargs: the data.

    Attributes:
        sites: the :class:`LatentSite` list in flat-vector order; ``dim`` the flat size.
        vectorised: whether a batch of points is evaluated in one run of the model.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> U = ModelPotential(model, (torch.zeros(3),))
        >>> U.dim, U(torch.zeros(2, 1)).shape
        (1, torch.Size([2]))
    """

    def __init__(self, model: Callable, args: tuple = (), kwargs: dict | None = None):
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        with pyro.get_param_store().scope():
            trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
        if params:
            raise UnsupportedModelError(
                f"the model has pyro.param sites {params}, which a sampler cannot learn: fix them (a number) "
                f"or give them hyperpriors (a distribution), or fit them by type-II with Exact/SVI"
            )
        sites, offset, batch_dims = [], 0, 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.dim is not None:
                    batch_dims = max(batch_dims, -frame.dim)
            if site["is_observed"] or site["infer"].get("_deterministic") or site_is_factor(site):
                continue
            fn = site["fn"]
            batch_dims = max(batch_dims, len(fn.batch_shape))
            support = fn.support
            if support.is_discrete or getattr(fn, "has_enumerate_support", False):
                raise UnsupportedModelError(
                    f"site {name!r} is discrete; gradient-based samplers need continuous latent sites "
                    f"(marginalise it out in the model)"
                )
            transform = biject_to(support)
            value_shape = tuple(site["value"].shape)
            unconstrained_shape = tuple(transform.inv.forward_shape(value_shape))
            sites.append(LatentSite(name, value_shape, len(fn.event_shape), unconstrained_shape, offset, transform))
            offset += math.prod(unconstrained_shape)
        if not sites:
            raise UnsupportedModelError("the model has no latent sample sites to sample")
        self.sites = sites
        self.dim = offset
        self._batch_dims = batch_dims
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
            log_det = log_det + _sum_to_batch(site.transform.log_abs_det_jacobian(raw, value), batch)
            values[site.name] = value
        return values, log_det

    # --------------------------------------------------------------- evaluate
    def log_joint(self, values: dict[str, torch.Tensor], data: tuple | None = None) -> torch.Tensor:
        """``log p(data, values)``: Tensor[B] for ``values = {site: Tensor[B, *value_shape]}``.

        ``data = (args, kwargs)`` replaces the fitted data (a minibatch; for its ``n / batch_size`` scaling
        see :func:`~bmm_ppl.inference.program.minibatch.with_observed_scale`).
        """
        args, kwargs = data if data is not None else (self.args, self.kwargs)
        batch = next(iter(values.values())).shape[0]
        if not self.vectorised:
            rows = []
            for i in range(batch):
                rows.append(self._log_joint_one({n: v[i] for n, v in values.items()}, args, kwargs))
            return torch.stack(rows)
        plate_dim = -self._batch_dims - 1
        reshaped = {}
        for site in self.sites:
            site_dims = len(site.value_shape) - site.event_dim
            pad = (1,) * (self._batch_dims - site_dims)
            reshaped[site.name] = values[site.name].reshape((batch,) + pad + site.value_shape)

        def batched(*a, **k):
            with pyro.plate(_CHAIN_PLATE, batch, dim=plate_dim, device=self.device):
                return self.model(*a, **k)

        # Argument validation is off while evaluating: the data were validated when the model was first
        # traced, and a sampler's excursions (exp underflowing to 0 in a divergent trajectory) must come back
        # as an infinite potential, not an exception.
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(batched, data=reshaped)).get_trace(*args, **kwargs)
        total = values[self.sites[0].name].new_zeros(batch)
        keep = -plate_dim  # dims from the chain dim to the right
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            log_prob = site["fn"].log_prob(site["value"])
            mask = site["mask"]
            if mask is not None:
                if isinstance(mask, torch.Tensor):
                    log_prob = log_prob.masked_fill(~mask.bool(), 0.0)
                elif not mask:
                    continue
            if site["scale"] is not None:
                log_prob = log_prob * site["scale"]
            total = total + self._per_batch(log_prob, batch, keep)
        return total

    @staticmethod
    def _per_batch(log_prob: torch.Tensor, batch: int, keep: int) -> torch.Tensor:
        if log_prob.dim() < keep:
            return log_prob.sum().expand(batch)
        per = log_prob.sum(tuple(range(log_prob.dim() - keep + 1, log_prob.dim()))) if keep > 1 else log_prob
        per = per.reshape(-1)
        if per.numel() == 1:
            return per.expand(batch)
        if per.numel() != batch:
            raise ValueError(f"a log-density of shape {tuple(log_prob.shape)} does not separate over {batch} points")
        return per

    def _log_joint_one(self, value, args, kwargs) -> torch.Tensor:
        conditioned = poutine.condition(self.model, data=value)
        with pyro.validation_enabled(False):
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        total = 0.0
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + site["fn"].log_prob(site["value"]).mul(site["scale"]).sum()
        return total

    def __call__(self, flat: torch.Tensor, data: tuple | None = None) -> torch.Tensor:
        """``U(flat)``: Tensor[B] potential energy (negative log joint with Jacobian) at ``flat: Tensor[B, dim]``
        (``data``: a minibatch, see :meth:`log_joint`)."""
        values, log_det = self._unpack(flat)
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
    import warnings

    from bmm_ppl.inference.program.graph_capture import capture_with_graph

    generator = torch.Generator(device=example.device).manual_seed(0)  # leaves the global RNG alone
    probe = example + torch.randn(example.shape, generator=generator, dtype=example.dtype, device=example.device) * 0.5
    reference_value, reference_grad = potential.potential_and_grad(probe)
    try:
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore")
            scripted, graph = capture_with_graph(functional_potential_and_grad(potential), [example])
            value, grad = scripted(probe)
    except Exception:  # noqa: BLE001 - a model that cannot be captured runs eagerly
        return None
    agrees = torch.allclose(value, reference_value, rtol=1e-5, atol=1e-6, equal_nan=True) and torch.allclose(
        grad, reference_grad, rtol=1e-5, atol=1e-6, equal_nan=True
    )
    return (scripted, graph) if agrees else None


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
    from bmm_ppl.inference.program.runs import inspect_model, predictive_draws

    chains, per_chain, dim = flat.shape
    with torch.no_grad():
        values = potential.constrain(flat.reshape(chains * per_chain, dim))
        structure = inspect_model(potential.model, potential.args, potential.kwargs)
        if structure.deterministic_sites:
            extra = predictive_draws(potential.model, potential.args, potential.kwargs, values)
            values.update({n: extra[n] for n in structure.deterministic_sites})
    return {n: v.reshape((chains, per_chain) + v.shape[1:]) for n, v in values.items()}
