"""The functional core of :class:`~bmm_ppl.inference.SVI`: a differentiable ELBO, and ``init`` / ``step``.

``elbo_loss`` estimates ``-ELBO`` of a (model, guide) pair from traces, vectorised over particles.
``init`` gathers the unconstrained parameter leaves an objective touches and builds the optimiser state;
``step`` takes one stochastic gradient step and returns ``(state, info)``. The loop, the progress bar and
the bookkeeping live in :class:`~bmm_ppl.inference.SVI`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.program.batching import under_outer_plate
from bmm_ppl.inference.program.enumeration import enumerated_log_density
from bmm_ppl.inference.program.log_density import site_log_prob, sum_keeping_batch
from bmm_ppl.inference.program.sites import is_module_parameter, is_sample_site

PARTICLE_PLATE = "_bmm_particles"


class Schedule(StrEnum):
    """Learning-rate schedules over ``num_steps``."""

    CONSTANT = "constant"
    # constant for the first half, then a cosine decay to ``final_lr_fraction`` of the rate
    COSINE = "cosine"


def learning_rate(step: int, num_steps: int, lr: float, schedule: Schedule, final_lr_fraction: float = 0.01) -> float:
    """The learning rate at ``step`` (0-based) of ``num_steps``.

    Examples:
        >>> learning_rate(0, 100, 0.1, Schedule.COSINE), round(learning_rate(99, 100, 0.1, Schedule.COSINE), 4)
        (0.1, 0.001)
    """
    if schedule is Schedule.CONSTANT or num_steps < 2:
        return lr
    half = num_steps // 2
    if step < half:
        return lr
    progress = (step - half) / max(num_steps - 1 - half, 1)
    return lr * (final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def vectorised(fn: Callable, num_particles: int, max_plate_nesting: int, device) -> Callable:
    """``fn`` under an outer plate of ``num_particles`` particles (``fn`` itself for one particle)."""
    if num_particles == 1:
        return fn
    return under_outer_plate(fn, PARTICLE_PLATE, num_particles, max_plate_nesting, device)


def per_particle(log_prob: torch.Tensor, num_particles: int, max_plate_nesting: int) -> torch.Tensor:
    """Sums a site's (scaled) log-density over the model's batch dimensions, keeping the particle dimension
    (a scalar for one particle)."""
    return sum_keeping_batch(log_prob, None if num_particles == 1 else num_particles, max_plate_nesting)


_NOT_BROADCASTING = (RuntimeError, ValueError, IndexError)


def vectorises_over_particles(model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: int,
                              device=None) -> bool:
    """Whether the model and guide run with an outer particle plate (two particles, one vectorised run).

    Programs written for one draw at a time do not: ``Normal(mu, 1).expand([n])`` without a plate, or
    ``locs[assignment]`` indexing the first dimension (Pyro's ``Vindex`` is the batch-safe form). For
    those, particles are run one after another, as Pyro's ``Trace_ELBO`` does by default. The probe
    leaves the caller's random stream as it was.
    """
    with torch.random.fork_rng(devices=[device] if device is not None and torch.device(device).type == "cuda" else []):
        try:
            _traced_log_weights(model, guide, args, kwargs, 2, max_plate_nesting, device)
        except _NOT_BROADCASTING:
            return False
    return True


def traced_log_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int,
    device=None,
    vectorise: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, poutine.Trace, poutine.Trace]:
    """``log p(x, z) - log q(z)`` per particle ``z ~ q`` (one vectorised run), and the score-function term.

    Masks and scales apply as in every engine (:func:`~bmm_ppl.inference.program.log_density.site_log_prob`).

    Args:
        vectorise: ``True``: one run with an outer particle plate; ``False``: one run per particle (a
            program that does not broadcast, see :func:`vectorises_over_particles`); ``None``: try the
            first and fall back to the second.

    Returns:
        ``(log_weights, score, model_trace, guide_trace)``: ``log_weights`` is Tensor[P] (a scalar when
        ``P == 1``); ``score`` sums ``log q`` over the guide sites that cannot be reparameterised, per
        particle (``None`` when all can). One particle at a time, the traces are the last particle's.
    """
    if num_particles == 1 or vectorise:
        return _traced_log_weights(model, guide, args, kwargs, num_particles, max_plate_nesting, device)
    if vectorise is None:
        try:
            return _traced_log_weights(model, guide, args, kwargs, num_particles, max_plate_nesting, device)
        except _NOT_BROADCASTING:
            pass
    runs = [_traced_log_weights(model, guide, args, kwargs, 1, max_plate_nesting, device) for _ in range(num_particles)]
    scores = [run[1] for run in runs]
    score = None if scores[0] is None else torch.stack(scores)
    return torch.stack([run[0] for run in runs]), score, runs[-1][2], runs[-1][3]


def _traced_log_weights(model, guide, args, kwargs, num_particles, max_plate_nesting, device):
    guide_run = vectorised(guide, num_particles, max_plate_nesting, device)
    model_run = vectorised(model, num_particles, max_plate_nesting, device)
    guide_trace = poutine.trace(guide_run).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model_run, trace=guide_trace)).get_trace(*args, **kwargs)
    batch = None if num_particles == 1 else num_particles
    log_weights, score = 0.0, 0.0
    if any(site["infer"].get("_enumerate_dim") is not None for site in model_trace.nodes.values() if site["type"] == "sample"):
        # discrete sites enumerated (the model runs under program.enumeration.enumerating): sum them out
        log_weights = enumerated_log_density(model_trace, None if batch is None else PARTICLE_PLATE)
    else:
        for site in model_trace.nodes.values():
            if is_sample_site(site):
                log_weights = log_weights + sum_keeping_batch(site_log_prob(site, model_trace), batch, max_plate_nesting)
    for site in guide_trace.nodes.values():
        if is_sample_site(site):
            log_q = sum_keeping_batch(site_log_prob(site, guide_trace), batch, max_plate_nesting)
            log_weights = log_weights - log_q
            if not getattr(site["fn"], "has_rsample", False):
                score = score + log_q
    if not isinstance(log_weights, torch.Tensor):
        raise ValueError("the model and guide have no sample sites: there is nothing to infer")
    return log_weights, (score if isinstance(score, torch.Tensor) else None), model_trace, guide_trace


def elbo_loss(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int, max_plate_nesting: int, device=None,
    vectorise: bool | None = None,
) -> torch.Tensor:
    """``-ELBO`` estimated with ``num_particles`` particles (vectorised unless ``vectorise`` is ``False``, see
    :func:`traced_log_weights`); its gradient is unbiased.

    Reparameterised guide sites give pathwise gradients; others add a score-function (REINFORCE) term
    whose value is zero, so the returned number is the plain ``-ELBO`` estimate.
    """
    log_weights, score, _, _ = traced_log_weights(model, guide, args, kwargs, num_particles, max_plate_nesting, device,
                                                  vectorise)
    if score is None:
        return -log_weights.mean()
    reinforce = score * log_weights.detach()
    return -(log_weights + reinforce - reinforce.detach()).mean()


@dataclasses.dataclass
class SVIState:
    """The optimiser's state.

    Attributes:
        params: the unconstrained parameter leaves (the very tensors Pyro's param store holds).
        optimizer: a ``torch.optim.Optimizer`` over ``params``.
        names: the param-store names of ``params``.
        step: steps taken.
        averaged: running means of ``params`` over the averaging phase (``None`` before it starts).
        num_averaged: how many iterates the means hold.
    """

    params: tuple
    optimizer: torch.optim.Optimizer
    names: tuple = ()
    step: int = 0
    averaged: tuple | None = None
    num_averaged: int = 0


def collect_params(objective: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Runs ``objective()`` once and returns ``{name: unconstrained leaf}`` of every ``pyro.param`` it reads."""
    with poutine.trace(param_only=True) as capture:
        objective()
    return {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}


def init(params: dict[str, torch.Tensor], optimizer_factory: Callable) -> SVIState:
    """A fresh :class:`SVIState` over ``params`` (see :func:`collect_params`).

    Args:
        params: ``{name: unconstrained leaf tensor}``.
        optimizer_factory: ``list[Tensor] -> torch.optim.Optimizer``.
    """
    leaves = tuple(params.values())
    if not leaves:
        raise ValueError("the model and guide have no parameters to fit")
    return SVIState(leaves, optimizer_factory(list(leaves)), names=tuple(params))


def step(state: SVIState, loss_fn: Callable[[], torch.Tensor], lr: float, average: bool = False) -> tuple[SVIState, dict]:
    """One gradient step on ``loss_fn()`` at learning rate ``lr``; with ``average``, folds the new iterate
    into the running mean.

    Returns:
        ``(state, {"loss": Tensor[]})``; the loss stays on its device (no synchronisation).
    """
    loss = loss_fn()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return _update(state, loss, lr, average)


def step_with_gradients(state: SVIState, loss_and_gradients: Callable, lr: float, average: bool = False) -> tuple[SVIState, dict]:
    """As :func:`step`, for a ``loss_and_gradients() -> (loss, *grads)`` that computes the gradients of
    ``state.params`` itself (see :func:`compile_loss_and_gradients`)."""
    loss, *gradients = loss_and_gradients()
    for param, gradient in zip(state.params, gradients):
        param.grad = gradient
    return _update(state, loss, lr, average)


def _update(state: SVIState, loss: torch.Tensor, lr: float, average: bool) -> tuple[SVIState, dict]:
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.step()
    if average:
        with torch.no_grad():
            if state.averaged is None:
                state.averaged = tuple(p.detach().clone() for p in state.params)
                state.num_averaged = 1
            else:
                state.num_averaged += 1
                torch._foreach_lerp_(list(state.averaged), [p.detach() for p in state.params], 1.0 / state.num_averaged)
    state.step += 1
    return state, {"loss": loss.detach()}


def finalize(state: SVIState) -> SVIState:
    """Writes the averaged iterate (where there is one) into the parameters."""
    if state.averaged is not None:
        with torch.no_grad():
            for p, mean in zip(state.params, state.averaged):
                p.copy_(mean)
    return state


def _module_parameter_slots(modules, params: tuple) -> list[tuple[torch.nn.Module, str, int]]:
    """``(module, attribute, index into params)`` for each plain ``nn.Parameter`` of ``modules`` that is one
    of ``params``: a ``PyroModule`` reads those from itself (its ``pyro.param`` call's value is ignored),
    so ``poutine.substitute`` cannot reach them. (``PyroParam``'s ``*_unconstrained`` leaves are read
    through ``pyro.param`` and are substituted.)"""
    index = {id(p): i for i, p in enumerate(params)}
    slots = []
    for module in modules:
        for sub in module.modules():
            for name, value in sub._parameters.items():
                if value is not None and id(value) in index and not name.endswith("_unconstrained"):
                    slots.append((sub, name, index[id(value)]))
    return slots


def compile_loss_and_gradients(objective: Callable, state: SVIState, inputs: tuple, modules: tuple = ()) -> Callable | None:
    """``objective(*inputs)`` and its gradients with respect to ``state.params``, captured as one
    simplified graph (:func:`~bmm_ppl.inference.program.graph_capture.capture`): the forward and backward passes
    run without Pyro's tracing machinery or the autograd engine.

    Parameters enter the graph as inputs through ``poutine.substitute`` (each constrained by its
    param-store constraint) and, for the plain ``nn.Parameter`` leaves of ``modules`` (the guide), by
    swapping them into the module while the graph is recorded; ``inputs`` (a minibatch) enter as inputs
    too. The capture is checked against the eager loss and gradients on the same random numbers.

    Returns:
        ``f(*inputs) -> (loss, *gradients)``, or ``None`` where the objective cannot be captured: it
        registers ``torch.nn.Module`` parameters with ``pyro.module`` (those would be overwritten), its
        structure depends on values, or the check fails.
    """
    from torch.distributions import transform_to

    from bmm_ppl.inference.program.graph_capture import capture_checked

    if not state.names or any(is_module_parameter(name) for name in state.names):
        return None
    constraints = pyro.get_param_store().get_state()["constraints"]
    if any(name not in constraints for name in state.names):
        return None
    transforms = [transform_to(constraints[name]) for name in state.names]
    count = len(state.params)

    slots = _module_parameter_slots(modules, tuple(state.params))

    def loss_of(*tensors):
        values = {name: t(u) for name, t, u in zip(state.names, transforms, tensors[:count])}
        originals = [(module, name, module._parameters[name]) for module, name, _ in slots]
        try:
            for module, name, i in slots:
                module._parameters[name] = tensors[i]
            with poutine.substitute(data=values):
                return objective(*tensors[count:])
        finally:
            for module, name, original in originals:
                module._parameters[name] = original

    gradient_and_loss = torch.func.grad_and_value(loss_of, argnums=tuple(range(count)))

    def loss_and_gradients(*tensors):
        gradients, loss = gradient_and_loss(*tensors)
        return (loss, *gradients)

    example = [p.detach() for p in state.params] + list(inputs)

    def eager(*_):
        loss = objective(*inputs)
        return (loss, *torch.autograd.grad(loss, state.params, allow_unused=True))

    graph = capture_checked(loss_and_gradients, example, example, eager, rtol=1e-4, seed=0)
    if graph is None:
        return None
    params = tuple(state.params)

    def run(*batch):
        return graph(*(p.detach() for p in params), *batch)

    return run
