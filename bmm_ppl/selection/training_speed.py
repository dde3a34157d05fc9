"""The training-speed estimate of the log evidence (Lyle et al. 2020), for ranking models with ``compare``.

By the chain rule the log evidence is a sum of one-step-ahead predictions,
``log p(D) = sum_i log p(D_i | D_<i)``: a model whose training loss on each *new* minibatch falls fast
has high evidence. For a Bayesian linear model each term is a Gaussian posterior predictive and the sum
is exact. :class:`TrainingSpeed` estimates it for any Pyro model with gradient steps: it scores each new
minibatch at the current parameters (its training loss before the optimiser has seen it), then takes
``num_steps`` Adam steps on the negative log joint of the data seen so far, and sums the scores along the
pass — averaged over random orderings of the data. Each minibatch is scored by its log-likelihood at
the current parameters (``predictive="plug-in"``: Lyle et al.'s training-loss sum, any size of model), or
by a Monte-Carlo posterior predictive under a Laplace approximation at the current parameters
(``predictive="laplace"``: ``log mean_s p(D_i | theta_s)``, ``theta_s ~ N(theta, H^-1)``, ``H`` the Hessian
of the negative log joint of the data seen so far; small models). For a linear-Gaussian model trained to
convergence the Laplace terms are the exact one-step predictives and the sum is the exact log evidence
up to Monte-Carlo error. Either way the number is a heuristic for ranking, tagged
``method="training-speed"`` (``compare`` will not rank it against evidence estimates or bounds).

Lives in ``bmm_ppl.selection`` rather than ``bmm_ppl.inference``: it exists to rank models (its
"posterior" is a point estimate per ordering), and it shares the Pyro plumbing of the bilevel module.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.model_runs import pointwise_log_likelihood
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.selection.bilevel import FunctionalAdam, PyroDensity
from bmm_ppl.validation import check_same_device, check_same_length, check_tensor


class Predictive(StrEnum):
    """How :class:`TrainingSpeed` scores each new minibatch."""

    PLUG_IN = "plug-in"  # log p(D_i | theta): the training loss before the step (Lyle et al. 2020)
    LAPLACE = "laplace"  # log mean_s p(D_i | theta_s), theta_s ~ N(theta, H^-1): needs a dense Hessian


class TrainingSpeed:
    """Training-speed log-evidence estimate: the sum of each new minibatch's log-likelihood at the
    parameters trained on the minibatches before it, along one pass of gradient training.

    The data are the model's positional tensor arguments, all split along their first dimension (e.g.
    ``model(x, y)``); keyword arguments are passed to every call unchanged. Training starts at the origin
    of the latents' unconstrained space (the prior mean of a centred Gaussian prior).

    Args:
        batch_size: points per minibatch.
        num_steps: Adam steps on the negative log joint of the data seen so far after each minibatch.
        lr: Adam step size.
        num_orderings: random orderings of the data to average over; the standard error is their spread.
        predictive: ``"plug-in"`` or ``"laplace"`` (see the module docstring).
        num_predictive_samples: Monte-Carlo draws per minibatch for ``"laplace"``.
        seed: seed of the orderings (``None``: from the global torch generator).
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar over orderings.

    Returns from :meth:`fit`: a :class:`Posterior` whose ``log_evidence`` has ``method="training-speed"``,
    whose draws are the final parameters of each ordering (``(1, num_orderings, *shape)``; point
    estimates, not a posterior approximation), and whose ``diagnostics["minibatch_log_likelihoods"]`` holds
    the per-minibatch scores ``Tensor[num_orderings, num_batches]``.

    Example:
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(0, 1, 8, dtype=torch.float64); y = 2 * x
        >>> post = TrainingSpeed(batch_size=4, num_steps=20, num_orderings=2, seed=0, progress=False).fit(
        ...     BayesianLinearRegression(polynomial_features(1), 1.0, 25.0), x, y)
        >>> post.log_evidence.method.value
        'training-speed'
    """

    def __init__(
        self,
        batch_size: int = 1,
        num_steps: int = 100,
        lr: float = 0.05,
        num_orderings: int = 3,
        predictive: str | Predictive = Predictive.PLUG_IN,
        num_predictive_samples: int = 256,
        seed: int | None = None,
        device=None,
        progress: bool = True,
    ):
        for name, value in (("batch_size", batch_size), ("num_steps", num_steps), ("num_orderings", num_orderings)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.batch_size, self.num_steps, self.num_orderings = int(batch_size), int(num_steps), int(num_orderings)
        self.adam = FunctionalAdam(lr)
        self.predictive = Predictive.parse(predictive, "predictive")
        if int(num_predictive_samples) < 1:
            raise ValueError(f"num_predictive_samples must be a positive integer, got {num_predictive_samples}")
        self.num_predictive_samples = int(num_predictive_samples)
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Estimates the log evidence of ``model(*args, **kwargs)``; see the class docstring."""
        if self.device is not None:
            args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
        tensors = {f"argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        if not tensors:
            raise ValueError("TrainingSpeed needs the data as positional tensor arguments, e.g. fit(model, x, y)")
        for name, value in tensors.items():
            check_tensor(name, value)
        num_points = check_same_length(**tensors)
        device = check_same_device(**tensors)
        if num_points < 2:
            raise ValueError(f"the data have {num_points} point(s); training speed needs at least two minibatches")

        density = PyroDensity(model, args, kwargs)
        generator = torch.Generator(device="cpu")
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        # The orderings are host-side bookkeeping (CPU generator), moved to the data's device once.
        orderings = [torch.randperm(num_points, generator=generator, device="cpu").to(device) for _ in range(self.num_orderings)]

        scores, finals, losses = [], [], []
        for order in tqdm(orderings, disable=not self.progress, desc="training speed"):
            score, final, loss = self._one_pass(density, args, kwargs, order)
            scores.append(score)
            finals.append(final)
            losses.append(loss)
        scores = torch.stack(scores)  # Tensor[num_orderings, num_batches]
        totals = scores.sum(-1)
        if not bool(torch.isfinite(totals).all()):
            raise DivergenceError("the training-speed estimate is not finite: lower lr or check the model")
        stderr = float(totals.std() / math.sqrt(len(totals))) if len(totals) > 1 else None
        draws = {n: torch.stack([density.constrain(f)[n] for f in finals]).unsqueeze(0) for n in density.latent_sites}
        return Posterior(
            model,
            args,
            kwargs,
            draws=draws,
            log_evidence=Evidence(float(totals.mean()), stderr, "training-speed"),
            loss_trace=torch.stack(losses).mean(0),
            diagnostics={
                "minibatch_log_likelihoods": scores.detach(),
                "log_evidence_per_ordering": totals.detach(),
                "batch_size": self.batch_size,
                "num_steps": self.num_steps,
                "predictive": self.predictive.value,
            },
            engine="TrainingSpeed",
        )

    def _one_pass(self, density: PyroDensity, args: tuple, kwargs: dict, order: torch.Tensor):
        """One ordering: returns (Tensor[num_batches] scores, final unconstrained latents, Tensor[steps] losses)."""
        params = {n: torch.zeros_like(v) for n, v in density.unconstrain({}).items()}
        state = self.adam.init(params)

        def select(index):
            return tuple(a[index] if isinstance(a, torch.Tensor) else a for a in args)

        def negative_log_joint(p, seen):
            return -density.log_joint(p, {}, seen, kwargs)

        gradient = torch.func.grad_and_value(negative_log_joint)
        scores, losses = [], []
        for start in range(0, len(order), self.batch_size):
            batch = select(order[start : start + self.batch_size])
            seen = select(order[: start + self.batch_size])
            scores.append(self._score(density, params, batch, kwargs, seen_before=select(order[:start]) if start else None))
            try:
                for _ in range(self.num_steps):
                    g, loss = gradient(params, seen)
                    params, state = self.adam.step(params, g, state)
                    losses.append(loss.detach())
            except ValueError as error:
                # Pyro's argument validation is where non-finite parameters surface first.
                if all(bool(torch.isfinite(v).all()) for v in params.values()):
                    raise
                raise DivergenceError(f"training diverged (non-finite parameters); lower lr={self.adam.lr}") from error
        return torch.stack(scores), params, torch.stack(losses)

    def _score(self, density: PyroDensity, params, batch: tuple, kwargs: dict, seen_before: tuple) -> torch.Tensor:
        """The log predictive density of a new minibatch given the parameters trained so far."""
        if self.predictive is Predictive.PLUG_IN:
            with torch.no_grad():
                return density.log_likelihood(params, {}, batch, kwargs)
        names = list(params)
        shapes = [params[n].shape for n in names]
        sizes = [params[n].numel() for n in names]
        flat = torch.cat([params[n].reshape(-1) for n in names])

        def unflatten(vector):
            pieces = torch.split(vector, sizes, dim=-1)
            return {n: p.reshape(vector.shape[:-1] + shape) for n, p, shape in zip(names, pieces, shapes)}

        def negative_log_joint(vector):
            if seen_before is None:  # before the first minibatch: the prior alone
                return -density.log_joint(unflatten(vector), {}, batch, kwargs, observations=False)
            return -density.log_joint(unflatten(vector), {}, seen_before, kwargs)

        # Reverse-over-reverse (jacrev of grad): no forward-mode AD needed.
        hessian = torch.func.jacrev(torch.func.grad(negative_log_joint))(flat.detach())
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        # A Hessian that is not positive definite (training not converged, a saddle) is floored at a
        # small fraction of its largest curvature rather than failing.
        eigenvalues = eigenvalues.clamp_min(1e-8 * eigenvalues.abs().max())
        noise = torch.randn(self.num_predictive_samples, flat.shape[0], dtype=flat.dtype, device=flat.device)
        draws = flat.detach() + (noise / eigenvalues.sqrt()) @ eigenvectors.T
        constrained = density.constrain(unflatten(draws))
        with torch.no_grad():
            pointwise = pointwise_log_likelihood(density.model, batch, kwargs, constrained)
            per_draw = sum(v.sum(-1) for v in pointwise.values())
            return torch.logsumexp(per_draw, 0) - math.log(self.num_predictive_samples)

