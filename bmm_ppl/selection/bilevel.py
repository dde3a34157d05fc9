"""One API for gradient-based hyperparameter optimisation: a bilevel problem, a hypergradient method, and
an optimiser that alternates inner (training) and outer (hyperparameter) steps.

- :class:`BilevelProblem` holds ``inner(params, hyperparameters)`` (training loss, negative log joint,
  negative ELBO), ``outer(params, hyperparameters)`` (validation loss, predictive NLL), the starting
  parameters and hyperparameters. :meth:`BilevelProblem.from_module` takes an ``nn.Module``;
  :meth:`BilevelProblem.from_pyro` builds both objectives from a Pyro model whose hyperparameters are
  ``pyro.param`` sites (e.g. a prior precision).
- :class:`Unrolled` and :class:`Implicit` say how the hypergradient is taken
  (:mod:`bmm_ppl.selection.hypergradients`).
- :class:`HyperparameterOptimiser` runs Adam on the hyperparameters and returns a
  :class:`BilevelResult` with the trajectory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch
from torch.distributions import biject_to
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError, UnsupportedModelError
from bmm_ppl.inference.program.functional_density import PyroDensity
from bmm_ppl.selection.hypergradients import (
    HypergradientResult,
    InverseHVP,
    Objective,
    Tensors,
    check_tensors,
    learning_rate_at,
    implicit_hypergradient,
    unrolled_hypergradient,
)


# ------------------------------------------------------------------------------------------ optimiser
class FunctionalAdam:
    """Adam over a dict of tensors, as a pure ``init`` / ``step`` pair (no ``torch.optim`` state, so no
    tensor is made on the default device).

    Examples:
        >>> adam = FunctionalAdam(lr=0.1)
        >>> x = {"a": torch.tensor(1.0)}; state = adam.init(x)
        >>> x, state = adam.step(x, {"a": torch.tensor(2.0)}, state)
        >>> round(float(x["a"]), 4)
        0.9
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr, self.betas, self.eps = float(lr), betas, eps

    def init(self, tensors: Mapping[str, torch.Tensor]) -> dict:
        zeros = {k: torch.zeros_like(v) for k, v in tensors.items()}
        return {"m": zeros, "v": dict(zeros), "t": 0}

    def step(self, tensors: Tensors, grads: Tensors, state: dict) -> tuple[Tensors, dict]:
        b1, b2 = self.betas
        t = state["t"] + 1
        m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in tensors}
        v = {k: b2 * state["v"][k] + (1 - b2) * grads[k] ** 2 for k in tensors}
        scale = self.lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
        new = {k: tensors[k] - scale * m[k] / (v[k].sqrt() + self.eps) for k in tensors}
        return new, {"m": m, "v": v, "t": t}


# ------------------------------------------------------------------------------------------- problem
def _identity(hyperparameters: Tensors) -> Tensors:
    return dict(hyperparameters)


@dataclasses.dataclass
class BilevelProblem:
    """``min_lambda outer(theta*(lambda), lambda)`` with ``theta*(lambda) = argmin_theta inner(theta, lambda)``.

    Args:
        inner: ``inner(params, hyperparameters) -> Tensor[]``, the training objective.
        outer: ``outer(params, hyperparameters) -> Tensor[]``, the validation objective.
        params: ``{name: Tensor[...]}`` starting inner parameters.
        hyperparameters: ``{name: Tensor[...]}`` starting hyperparameters, in the space they are optimised
            in (e.g. a log weight decay).
        constrain: maps optimised hyperparameters to the values reported (identity by default;
            :meth:`from_pyro` maps unconstrained values through each ``pyro.param``'s constraint).

    Examples:
        >>> x = torch.randn(20, 3); y = x.sum(-1)
        >>> problem = BilevelProblem(
        ...     inner=lambda p, h: ((x[:10] @ p["w"] - y[:10]) ** 2).mean() + h["log_decay"].exp() * p["w"].square().sum(),
        ...     outer=lambda p, h: ((x[10:] @ p["w"] - y[10:]) ** 2).mean(),
        ...     params={"w": torch.zeros(3)}, hyperparameters={"log_decay": torch.tensor(0.0)})
        >>> sorted(problem.hyperparameters)
        ['log_decay']
    """

    inner: Objective
    outer: Objective
    params: Tensors
    hyperparameters: Tensors
    constrain: Callable[[Tensors], Tensors] = _identity

    def __post_init__(self):
        if not callable(self.inner) or not callable(self.outer):
            raise TypeError("inner and outer must be callables objective(params, hyperparameters) -> Tensor[]")
        self.params = {k: v.detach() for k, v in check_tensors("params", self.params).items()}
        self.hyperparameters = {k: v.detach() for k, v in check_tensors("hyperparameters", self.hyperparameters).items()}

    @classmethod
    def from_module(
        cls, module: torch.nn.Module, inner: Objective, outer: Objective, hyperparameters: Mapping[str, torch.Tensor]
    ) -> "BilevelProblem":
        """A problem over the parameters of ``module`` (``dict(module.named_parameters())``, detached
        copies; the module itself is not changed). Inside the objectives, run the network as
        ``torch.func.functional_call(module, params, inputs)``; see :func:`per_parameter_weight_decay`.
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        params = {name: p.detach().clone() for name, p in module.named_parameters()}
        return cls(inner, outer, params, dict(hyperparameters))

    @classmethod
    def from_pyro(
        cls,
        model: Callable,
        train: tuple,
        validation: tuple,
        hyperparameters: list[str] | None = None,
        init: Mapping[str, torch.Tensor] | None = None,
        objective: str | InnerObjective = "map",
        num_particles: int = 8,
    ) -> "BilevelProblem":
        """A bilevel problem for a Pyro model whose hyperparameters are ``pyro.param`` sites.

        ``objective="map"``: the inner objective is the negative log joint ``-log p(y_train, theta |
        lambda)`` in the unconstrained space of the latent sites, and the outer one the negative
        log-likelihood of the validation observations at the inner parameters, ``-log p(y_val | theta,
        lambda)``. ``objective="elbo"``: the inner parameters are a mean-field Gaussian over the
        unconstrained latents (``"{site}.loc"``, ``"{site}.log_scale"``), the inner objective the negative
        ELBO with ``num_particles`` reparametrised draws whose base noise is drawn once (so that the
        objective is a deterministic function, as the implicit function theorem needs), and the outer one
        the predictive NLL ``-log mean_k p(y_val | theta_k)`` over the same draws. The hyperparameters are
        optimised in the unconstrained space of their constraint; the result reports them constrained.

        Args:
            model: a Pyro program called as ``model(*train)`` and ``model(*validation)``.
            train: the model's positional arguments for the inner (training) problem, observations included.
            validation: the model's positional arguments for the outer (validation) objective, observations
                included.
            hyperparameters: names of ``pyro.param`` sites to tune (default: all of them).
            init: starting values of latent sites (constrained); a prior draw by default.
            objective: ``"map"`` or ``"elbo"``.
            num_particles: draws for ``"elbo"``.
        """
        objective = InnerObjective.parse(objective, "objective")
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
        density = PyroDensity(model, train)
        names = list(density.param_constraints) if hyperparameters is None else list(hyperparameters)
        unknown = [n for n in names if n not in density.param_constraints]
        if unknown:
            raise ValueError(
                f"hyperparameters {unknown} are not pyro.param sites of the model; it has {sorted(density.param_constraints)}"
            )
        if not names:
            raise UnsupportedModelError("the model has no pyro.param sites to tune; make its hyperparameters learned (None)")
        hyper_bijections = {n: biject_to(density.param_constraints[n]) for n in names}
        params = density.unconstrain(init or {})
        hypers = {n: hyper_bijections[n].inv(density.param_values[n]) for n in names}

        def constrain(h: Tensors) -> Tensors:
            return {n: hyper_bijections[n](h[n]) for n in h}

        if objective is InnerObjective.ELBO:
            inner, outer, params = _elbo_objectives(density, params, constrain, train, validation, int(num_particles))
            return cls(inner, outer, params, hypers, constrain)

        def inner(p: Tensors, h: Tensors) -> torch.Tensor:
            return -density.log_joint(p, constrain(h), train)

        def outer(p: Tensors, h: Tensors) -> torch.Tensor:
            return -density.log_likelihood(p, constrain(h), validation)

        return cls(inner, outer, params, hypers, constrain)


class InnerObjective(StrEnum):
    """The inner objective :meth:`BilevelProblem.from_pyro` builds."""

    MAP = "map"  # negative log joint
    ELBO = "elbo"  # negative ELBO of a mean-field Gaussian, fixed base noise


def _elbo_objectives(density, start: Tensors, constrain, train: tuple, validation: tuple, num_particles: int):
    """Negative ELBO and predictive NLL of a mean-field Gaussian over the unconstrained latents."""
    sites = list(start)
    noise = {n: torch.randn((num_particles,) + v.shape, dtype=v.dtype, device=v.device) for n, v in start.items()}
    params = {f"{n}.loc": v for n, v in start.items()}
    params.update({f"{n}.log_scale": torch.full_like(v, -2.0) for n, v in start.items()})

    def particles(p: Tensors) -> list[Tensors]:
        return [{n: p[f"{n}.loc"] + p[f"{n}.log_scale"].exp() * noise[n][k] for n in sites} for k in range(num_particles)]

    def inner(p: Tensors, h: Tensors) -> torch.Tensor:
        values = constrain(h)
        expected = sum(density.log_joint(z, values, train) for z in particles(p)) / num_particles
        entropy = sum(p[f"{n}.log_scale"].sum() for n in sites)  # of the Gaussian, up to a constant
        return -(expected + entropy)

    def outer(p: Tensors, h: Tensors) -> torch.Tensor:
        values = constrain(h)
        per_particle = torch.stack([density.log_likelihood(z, values, validation) for z in particles(p)])
        return -(torch.logsumexp(per_particle, 0) - math.log(num_particles))

    return inner, outer, params


def per_parameter_weight_decay(params: Mapping[str, torch.Tensor], log_decays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum_k exp(log_decay_k) * theta_k^2`` elementwise: one weight decay per scalar parameter for every
    parameter named in ``log_decays`` (each shaped like its parameter, or broadcastable to it).

    Examples:
        >>> per_parameter_weight_decay({"w": torch.ones(3)}, {"w": torch.zeros(3)})
        tensor(3.)
    """
    return sum((log_decays[k].exp() * params[k].square()).sum() for k in log_decays)


# ------------------------------------------------------------------------------- hypergradient methods
@dataclasses.dataclass
class Unrolled:
    """Hypergradients through ``num_steps`` unrolled gradient-descent steps, warm-started from the last
    outer step's parameters (the online variant); ``truncate=K`` bounds memory to ``K`` steps.

    ``lr`` may name a hyperparameter (a scalar or a per-step schedule) to tune the inner learning rate.
    """

    num_steps: int = 20
    lr: float | str = 0.1
    momentum: float = 0.0
    truncate: int | None = None

    def hypergradient(self, problem: BilevelProblem, params: Tensors, hypers: Tensors, check: bool) -> HypergradientResult:
        return unrolled_hypergradient(
            problem.inner, problem.outer, params, hypers, num_steps=self.num_steps, lr=self.lr,
            momentum=self.momentum, truncate=self.truncate, check=check,
        )

    def train(self, problem: BilevelProblem, params: Tensors, hypers: Tensors) -> Tensors:
        """The inner parameters after ``num_steps`` steps at fixed hyperparameters (no graph)."""
        inner_grad = torch.func.grad(problem.inner)
        velocity = {k: torch.zeros_like(v) for k, v in params.items()}
        with torch.no_grad():
            for step in range(self.num_steps):
                g = inner_grad(params, hypers)
                velocity = {k: self.momentum * velocity[k] + g[k] for k in g}
                params = {k: params[k] - learning_rate_at(self.lr, hypers, step) * velocity[k] for k in params}
        return params


class InnerOptimiser(StrEnum):
    """How :class:`Implicit` trains the inner parameters before each hypergradient."""

    ADAM = "adam"
    SGD = "sgd"  # full-batch gradient descent with heavy-ball momentum 0.9: converges tightly on smooth convex problems


@dataclasses.dataclass
class Implicit:
    """Hypergradients by the implicit function theorem after ``inner_steps`` steps of ``inner_optimiser``
    (``"adam"`` or ``"sgd"``) on the inner objective (warm-started), with a CG or Neumann
    inverse-Hessian-vector product. The result is only as good as the inner optimum: where the inner
    problem has a better solver (a linear solve, L-BFGS), pass it as
    ``inner_solver(problem, params, hyperparameters) -> params`` and it replaces the optimiser steps."""

    method: str | InverseHVP = InverseHVP.CG
    num_iterations: int = 50
    step_size: float | None = None
    damping: float = 0.0
    inner_steps: int = 100
    inner_lr: float = 1e-2
    inner_optimiser: str | InnerOptimiser = InnerOptimiser.ADAM
    inner_solver: Callable[[BilevelProblem, Tensors, Tensors], Tensors] | None = None

    def __post_init__(self):
        self.method = InverseHVP.parse(self.method, "method")
        self.inner_optimiser = InnerOptimiser.parse(self.inner_optimiser, "inner_optimiser")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be non-negative, got {self.inner_steps}")

    def train(self, problem: BilevelProblem, params: Tensors, hypers: Tensors) -> Tensors:
        if self.inner_solver is not None:
            return {k: v.detach() for k, v in self.inner_solver(problem, params, hypers).items()}
        inner_grad = torch.func.grad(problem.inner)
        if self.inner_optimiser is InnerOptimiser.SGD:
            return Unrolled(self.inner_steps, self.inner_lr, momentum=0.9).train(problem, params, hypers) if self.inner_steps else params
        adam = FunctionalAdam(self.inner_lr)
        state = adam.init(params)
        with torch.no_grad():
            for _ in range(self.inner_steps):
                params, state = adam.step(params, inner_grad(params, hypers), state)
        return params

    def hypergradient(self, problem: BilevelProblem, params: Tensors, hypers: Tensors, check: bool) -> HypergradientResult:
        params = self.train(problem, params, hypers)
        return implicit_hypergradient(
            problem.inner, problem.outer, params, hypers, method=self.method, num_iterations=self.num_iterations,
            step_size=self.step_size, damping=self.damping, check=check,
        )


# ---------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class BilevelResult:
    """What :meth:`HyperparameterOptimiser.fit` found.

    Attributes:
        hyperparameters: ``{name: Tensor}`` final values, reported through ``problem.constrain`` (the best
            step's values when early stopping is on).
        unconstrained: the same in the optimised space.
        params: ``{name: Tensor}`` inner parameters trained at the final hyperparameters.
        trajectory: ``{name: Tensor[num_steps + 1, *shape]}`` reported hyperparameters at every outer step.
        outer_trace: Tensor[num_steps], the outer objective at each step (before its update).
        hypergradient_norm: Tensor[num_steps].
        num_steps: outer steps taken.
        stopped_early: whether early stopping ended the run.
    """

    hyperparameters: Tensors
    unconstrained: Tensors
    params: Tensors
    trajectory: Tensors
    outer_trace: torch.Tensor
    hypergradient_norm: torch.Tensor
    num_steps: int
    stopped_early: bool


class HyperparameterOptimiser:
    """Gradient-based hyperparameter optimisation: alternates inner training with Adam steps on the
    hyperparameters along their hypergradient.

    Args:
        hypergradient: :class:`Unrolled` or :class:`Implicit` (how each hypergradient is taken).
        num_steps: outer (hyperparameter) steps.
        lr: Adam step size for the hyperparameters.
        patience: stop after this many outer steps without the outer objective improving by ``min_delta``,
            and return the best step's hyperparameters (``None``: no early stopping; with it, one number
            per outer step is read back to the host).
        min_delta: improvement that resets the patience counter.
        progress: show a tqdm bar.

    Examples:
        >>> x = torch.linspace(-1, 1, 30, dtype=torch.float64).unsqueeze(-1) ** torch.arange(4.0, dtype=torch.float64)
        >>> y = torch.sin(3 * x[:, 1])
        >>> problem = BilevelProblem(
        ...     inner=lambda p, h: ((x[::2] @ p["w"] - y[::2]) ** 2).sum() + h["log_decay"].exp() * p["w"].square().sum(),
        ...     outer=lambda p, h: ((x[1::2] @ p["w"] - y[1::2]) ** 2).sum(),
        ...     params={"w": torch.zeros(4, dtype=torch.float64)}, hyperparameters={"log_decay": torch.tensor(0.0, dtype=torch.float64)})
        >>> result = HyperparameterOptimiser(Implicit(inner_steps=50, inner_lr=0.1), num_steps=5, progress=False).fit(problem)
        >>> result.trajectory["log_decay"].shape
        torch.Size([6])
    """

    def __init__(
        self,
        hypergradient: Unrolled | Implicit,
        num_steps: int = 100,
        lr: float = 0.05,
        patience: int | None = None,
        min_delta: float = 0.0,
        progress: bool = True,
    ):
        if not isinstance(hypergradient, (Unrolled, Implicit)):
            raise TypeError(f"hypergradient must be Unrolled(...) or Implicit(...), got {type(hypergradient).__name__}")
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        if patience is not None and int(patience) < 1:
            raise ValueError(f"patience must be a positive number of steps or None, got {patience}")
        self.method = hypergradient
        self.num_steps = int(num_steps)
        self.adam = FunctionalAdam(lr)
        self.patience = None if patience is None else int(patience)
        self.min_delta = float(min_delta)
        self.progress = progress

    def fit(self, problem: BilevelProblem) -> BilevelResult:
        """Optimises ``problem.hyperparameters``; see :class:`BilevelResult`."""
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a BilevelProblem, got {type(problem).__name__}")
        params, hypers = dict(problem.params), dict(problem.hyperparameters)
        state = self.adam.init(hypers)
        trajectory = [problem.constrain(hypers)]
        values, norms = [], []
        best_value, best_hypers, since_best, stopped_early = None, hypers, 0, False
        bar = tqdm(range(self.num_steps), disable=not self.progress, desc="hyperparameters")
        for step in bar:
            result = self.method.hypergradient(problem, params, hypers, check=step == 0)
            params = result.params
            values.append(result.outer_value)
            norms.append(sum(g.square().sum() for g in result.hypergradient.values()).sqrt())
            if self.patience is not None:
                value = float(result.outer_value)
                if best_value is None or value < best_value - self.min_delta:
                    best_value, best_hypers, since_best = value, hypers, 0
                else:
                    since_best += 1
                bar.set_postfix(outer=f"{value:.4g}")
            hypers, state = self.adam.step(hypers, result.hypergradient, state)
            trajectory.append(problem.constrain(hypers))
            if self.patience is not None and since_best >= self.patience:
                stopped_early = True
                break
        if self.patience is not None:
            hypers = best_hypers
        params = self.method.train(problem, params, hypers)
        outer_trace = torch.stack(values)
        if not bool(torch.isfinite(outer_trace).all()):
            raise DivergenceError("the outer objective became non-finite during hyperparameter optimisation")
        return BilevelResult(
            hyperparameters={k: v.detach() for k, v in problem.constrain(hypers).items()},
            unconstrained=hypers,
            params=params,
            trajectory={k: torch.stack([t[k] for t in trajectory]).detach() for k in hypers},
            outer_trace=outer_trace,
            hypergradient_norm=torch.stack(norms),
            num_steps=len(values),
            stopped_early=stopped_early,
        )
