"""The training-speed estimate of the log evidence (Lyle et al. 2020), for ranking models with ``compare``.

By the chain rule the log evidence is a sum of one-step-ahead predictions,
``log p(D) = sum_i log p(D_i | D_<i)``: a model whose loss on each *new* minibatch falls fast has high
evidence. :class:`TrainingSpeed` walks through the data one minibatch at a time, trains on the data seen
so far, and sums a score of each new minibatch under the model trained on the minibatches before it —
averaged over random orderings of the data. The score (``predictive=``) is

- ``"plug-in"``: ``log p(D_i | theta_<i)`` at the trained parameters: the minibatch's training loss before
  the optimiser has seen it, Lyle et al.'s sum over training losses (any size of model). It ignores the
  posterior's spread, so it is *not* an estimate of ``log p(D_i | D_<i)``: it rewards a model whose point
  estimate happens to predict well and penalises nothing for width. On the foundation tutorial
  (polynomial degrees 0-9, ``alpha=5e-3``, ``beta=11.1``) even its exact, converged version ranks the
  degrees against the evidence (Spearman -0.24 over 500 orderings), and so does Lyle et al.'s bound
  ``L(D) = sum_i E_{p(theta|D_<i)}[-log p(D_i|theta)]`` (-0.32): under a broad prior the first
  minibatches' expected losses grow with the number of weights and dominate the sum.
- ``"laplace"`` (the default): ``log p(D_i | D_<i)`` under Laplace approximations of the posteriors, by
  importance sampling. After the optimiser steps, five damped Newton steps polish the mode of the
  posterior of ``D_<=i`` and give its Hessian ``H_<=i``; the proposal is ``N(theta_<=i, H_<=i^-1)`` and
  each draw is weighted by ``p(D_i | theta) N(theta; theta_<i, H_<i^-1) / N(theta; theta_<=i, H_<=i^-1)``.
  A few draws (5%) come from the posterior before ``D_i`` instead (a defensive mixture), which bounds
  the weights. For a linear-Gaussian model the other weights are all equal and the sum is the exact log
  evidence up to a small Monte-Carlo error; elsewhere the proposal already contains ``D_i``, so the
  weights vary far less than when drawing from the posterior before ``D_i`` (which under a broad prior
  needs astronomically many draws: the mean of ``p(D_i | theta)`` is carried by the rare draws that land
  near the data), and the sum carries the Laplace approximation's error (1-D logistic regression, 30
  points: -0.3 to -0.5 nats). Needs a dense Hessian: small models.

Either way the number is tagged ``method="training-speed"`` (``compare`` will not rank it against
evidence estimates or bounds).

Lives in ``bmm_ppl.selection`` rather than ``bmm_ppl.inference``: it exists to rank models (its
"posterior" is a point estimate per ordering), and it shares the Pyro plumbing of the bilevel module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.program.runs import pointwise_log_likelihood
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.program.functional_density import PyroDensity
from bmm_ppl.selection.bilevel import FunctionalAdam
from bmm_ppl.validation import check_same_device, check_same_length, check_tensor

_NEWTON_STEPS = 5  # exact in one step for a quadratic log joint; the others converge non-quadratic ones (logistic: 2 were too few)
_STEP_LENGTHS = (1.0, 0.5, 0.25, 0.125, 0.0)  # damped Newton: the best of these, chosen on the device
_DEFENSIVE_SHARE = 0.05  # of the importance-sampling draws taken from the posterior before the minibatch


class Predictive(StrEnum):
    """How :class:`TrainingSpeed` scores each new minibatch (see the module docstring)."""

    PLUG_IN = "plug-in"  # log p(D_i | theta_<i): the training loss before the step (Lyle et al. 2020)
    LAPLACE = "laplace"  # log p(D_i | D_<i) under Laplace posteriors, importance-sampled: needs a dense Hessian


@dataclasses.dataclass
class LaplaceGaussian:
    """``N(mean, H^-1)`` over a flat parameter vector, kept as the eigendecomposition of ``H``.

    Args:
        mean: Tensor[p].
        eigenvalues: Tensor[p], positive.
        eigenvectors: Tensor[p, p], columns.

    Examples:
        >>> g = LaplaceGaussian.from_hessian(torch.zeros(2), 4 * torch.eye(2))
        >>> round(float(g.log_prob(torch.zeros(1, 2))[0]), 4)  # log N(0; 0, I/4) = log(4 / (2 pi))
        -0.4516
    """

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    @classmethod
    def from_hessian(cls, mean: torch.Tensor, hessian: torch.Tensor) -> "LaplaceGaussian":
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        # A Hessian that is not positive definite (a saddle, training not converged) is floored at a
        # small fraction of its largest curvature rather than failing.
        return cls(mean, eigenvalues.clamp_min(1e-8 * eigenvalues.abs().max()), eigenvectors)

    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Tensor[num_samples, p]."""
        noise = torch.randn(num_samples, self.mean.shape[0], generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + (noise / self.eigenvalues.sqrt()) @ self.eigenvectors.T

    def log_prob(self, points: torch.Tensor) -> torch.Tensor:
        """Tensor[S] for points Tensor[S, p]."""
        whitened = ((points - self.mean) @ self.eigenvectors) * self.eigenvalues.sqrt()
        dimension = self.mean.shape[0]
        return 0.5 * (self.eigenvalues.log().sum() - whitened.square().sum(-1) - dimension * math.log(2 * math.pi))


class TrainingSpeed:
    """Training-speed log-evidence estimate: the sum over minibatches of each new minibatch's score under
    the model trained on the minibatches before it, along one pass of training.

    The data are the model's positional tensor arguments, all split along their first dimension (e.g.
    ``model(x, y)``); keyword arguments are passed to every call unchanged. ``"plug-in"`` training starts at
    a draw from the prior (the one the program's first trace made: at the origin a network's hidden
    layers sit at a saddle, where every gradient vanishes and nothing trains); ``"laplace"`` starts at the
    origin of the latents' unconstrained space and moves to the prior's mode by Newton steps.

    Args:
        batch_size: points per minibatch.
        num_steps: Adam steps on the negative log joint of the data seen so far after each minibatch
            (``"laplace"`` polishes their result with Newton steps, so it needs few).
        lr: Adam step size.
        num_orderings: random orderings of the data to average over.
        predictive: ``"laplace"`` or ``"plug-in"`` (see the module docstring).
        num_predictive_samples: importance-sampling draws per minibatch for ``"laplace"``.
        seed: seed of the orderings and draws (``None``: from the global torch generator).
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar over orderings.

    Returns from :meth:`fit`: a :class:`Posterior` whose ``log_evidence`` has ``method="training-speed"``
    and, as ``stderr``, the spread over orderings (with one ordering: the Monte-Carlo error); whose draws
    are the final parameters of each ordering (``(1, num_orderings, *shape)``; point estimates, not a
    posterior approximation); and whose ``diagnostics`` hold ``"minibatch_log_likelihoods"`` (the scores,
    ``Tensor[num_orderings, num_batches]``), ``"log_evidence_per_ordering"``,
    ``"minibatch_monte_carlo_variances"`` (delta-method variances of the importance-sampling scores, same
    shape; 0 for ``"plug-in"``) and ``"monte_carlo_stderr"`` (their total, for the mean over orderings).

    Cost (``"laplace"``): five Hessians and ``num_predictive_samples`` likelihood evaluations (one vectorised
    model run) per minibatch. On the foundation tutorial (ten points, degrees 0-9, ``batch_size=1``) the
    defaults take about 1 s per degree and ordering on one CPU thread, and reproduce the exact evidence
    within their Monte-Carlo error (about 0.03 nats; Spearman 1 over the ten degrees, same order). Lyle et
    al.'s sum of training losses (``"plug-in"``, 100 Adam steps, no Hessian; about 2.5 s per degree and
    ordering) ranks those degrees against the evidence (Spearman -0.32, top four 1, 0, 2, 5).

    Examples:
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(0, 1, 8, dtype=torch.float64); y = 2 * x
        >>> post = TrainingSpeed(batch_size=4, num_orderings=2, seed=0, progress=False).fit(
        ...     BayesianLinearRegression(polynomial_features(1), 1.0, 25.0), x, y)
        >>> post.log_evidence.method.value
        'training-speed'
    """

    def __init__(
        self,
        batch_size: int = 1,
        num_steps: int = 10,
        lr: float = 0.05,
        num_orderings: int = 3,
        predictive: str | Predictive = Predictive.LAPLACE,
        num_predictive_samples: int = 256,
        seed: int | None = None,
        device=None,
        progress: bool = True,
    ):
        for name, value in (("batch_size", batch_size), ("num_orderings", num_orderings), ("num_predictive_samples", num_predictive_samples)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if int(num_steps) < 0:
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps}")
        self.batch_size, self.num_steps, self.num_orderings = int(batch_size), int(num_steps), int(num_orderings)
        self.adam = FunctionalAdam(lr)
        self.predictive = Predictive.parse(predictive, "predictive")
        if self.predictive is Predictive.PLUG_IN and self.num_steps == 0:
            raise ValueError("num_steps=0 with predictive='plug-in' never trains: give num_steps >= 1")
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

        generator = torch.Generator(device="cpu")
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        # The orderings are host-side bookkeeping (CPU generator), moved to the data's device once; the
        # importance-sampling draws come from a generator on the data's device, seeded from the first.
        orderings = [torch.randperm(num_points, generator=generator, device="cpu").to(device) for _ in range(self.num_orderings)]
        draws_generator = torch.Generator(device=device)
        draws_generator.manual_seed(int(torch.randint(2**62, (), generator=generator, device="cpu")))
        with torch.random.fork_rng(devices=[]):  # the prior draw plug-in training starts from follows the seed
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator, device="cpu")))
            density = PyroDensity(model, args, kwargs)

        scores, variances, finals, losses = [], [], [], []
        for order in tqdm(orderings, disable=not self.progress, desc="training speed"):
            score, variance, final, loss = self._one_pass(density, args, kwargs, order, draws_generator)
            scores.append(score)
            variances.append(variance)
            finals.append(final)
            losses.append(loss)
        scores = torch.stack(scores)  # Tensor[num_orderings, num_batches]
        totals = scores.sum(-1)
        if not bool(torch.isfinite(totals).all()):
            raise DivergenceError("the training-speed estimate is not finite: lower lr or check the model")
        # Each ordering's Monte-Carlo variance is the sum of its minibatches' (independent draws).
        variances = torch.stack(variances)
        monte_carlo_stderr = float(variances.sum(-1).mean().sqrt() / math.sqrt(len(totals)))
        if len(totals) > 1:
            stderr = float(totals.std() / math.sqrt(len(totals)))
        else:
            stderr = monte_carlo_stderr if self.predictive is Predictive.LAPLACE else None
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
                "minibatch_monte_carlo_variances": variances.detach(),
                "monte_carlo_stderr": monte_carlo_stderr,
                "batch_size": self.batch_size,
                "num_steps": self.num_steps,
                "predictive": self.predictive.value,
            },
            engine="TrainingSpeed",
        )

    def _one_pass(self, density: PyroDensity, args: tuple, kwargs: dict, order: torch.Tensor, draws_generator: torch.Generator):
        """One ordering: returns (Tensor[num_batches] scores, Tensor[num_batches] their Monte-Carlo
        variances, final unconstrained latents, Tensor[steps] training losses)."""
        if self.predictive is Predictive.PLUG_IN:
            # A draw from the prior (the program's first trace), as networks are trained from a random
            # start: at the origin a network's hidden layers sit at a saddle (all their gradients vanish).
            params = density.unconstrain({})
        else:
            params = {n: torch.zeros_like(v) for n, v in density.unconstrain({}).items()}
        state = self.adam.init(params)
        flat = _Flattener(params)

        def select(index):
            return tuple(a[index] if isinstance(a, torch.Tensor) else a for a in args)

        def negative_log_joint(p, seen):
            return -density.log_joint(p, {}, seen, kwargs)

        gradient = torch.func.grad_and_value(negative_log_joint)
        before = None
        if self.predictive is Predictive.LAPLACE:
            first = select(order[: self.batch_size])
            # The prior's Laplace approximation: Newton from the origin on the negative log prior.
            before, _ = self._laplace(lambda v: -density.log_joint(flat.unflatten(v), {}, first, kwargs, observations=False), flat.flatten(params))
            params = flat.unflatten(before.mean)
        scores, variances, losses = [], [], []
        for start in range(0, len(order), self.batch_size):
            batch = select(order[start : start + self.batch_size])
            seen = select(order[: start + self.batch_size])
            if self.predictive is Predictive.PLUG_IN:
                with torch.no_grad():
                    scores.append(density.log_likelihood(params, {}, batch, kwargs))
                variances.append(torch.zeros_like(scores[-1]))
            try:
                for _ in range(self.num_steps):
                    g, loss = gradient(params, seen)
                    params, state = self.adam.step(params, g, state)
                    losses.append(loss.detach())
                if self.predictive is Predictive.LAPLACE:
                    after, loss = self._laplace(lambda v: negative_log_joint(flat.unflatten(v), seen), flat.flatten(params))
                    params = flat.unflatten(after.mean)
                    losses.append(loss)
                    score, variance = self._importance_sampled_score(density, flat, batch, kwargs, before, after, draws_generator)
                    scores.append(score)
                    variances.append(variance)
                    before = after
            except ValueError as error:
                # Pyro's argument validation is where non-finite parameters surface first.
                if all(bool(torch.isfinite(v).all()) for v in params.values()):
                    raise
                raise DivergenceError(f"training diverged (non-finite parameters); lower lr={self.adam.lr}") from error
        return torch.stack(scores), torch.stack(variances), params, torch.stack(losses)

    @staticmethod
    def _laplace(objective: Callable, start: torch.Tensor) -> tuple[LaplaceGaussian, torch.Tensor]:
        """``N(mode, H^-1)`` for a negative log density over Tensor[p], by damped Newton steps from
        ``start`` (each step the best of a few lengths, picked on the device: no host synchronisation).
        The Hessian is the one of the last step (exact for a quadratic; a step stale otherwise).
        Returns the Gaussian and the objective at its mean."""
        # Reverse-over-reverse (jacrev of grad): no forward-mode AD needed.
        hessian_of = torch.func.jacrev(torch.func.grad(objective))
        point = start.detach()
        for _ in range(_NEWTON_STEPS):
            gradient, hessian = torch.func.grad(objective)(point), hessian_of(point)
            curvature = LaplaceGaussian.from_hessian(point, hessian)
            step = curvature.eigenvectors @ ((curvature.eigenvectors.T @ gradient) / curvature.eigenvalues)
            candidates = torch.stack([point - length * step for length in _STEP_LENGTHS])
            values = torch.stack([objective(c) for c in candidates]).detach()
            values = torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf))
            point = candidates[values.argmin()].detach()
        return LaplaceGaussian(point, curvature.eigenvalues, curvature.eigenvectors), values.min()

    def _importance_sampled_score(
        self, density: PyroDensity, flat: "_Flattener", batch: tuple, kwargs: dict, before: LaplaceGaussian, after: LaplaceGaussian, generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p(D_i | D_<i)`` under the Laplace posterior ``before`` with the proposal ``after`` (the
        Laplace posterior that includes ``D_i``), and the delta-method variance of that estimate (which
        can understate the error when the weights are skewed: a posterior far from Gaussian)."""
        # A defensive mixture (Hesterberg 1995): a share of the draws comes from ``before``, so that each
        # weight is at most p(D_i | theta) / share and the variance is finite even where the
        # posterior is skewed and a Gaussian proposal alone would give heavy-tailed weights.
        num_defensive = max(1, round(_DEFENSIVE_SHARE * self.num_predictive_samples))
        draws = torch.cat([after.sample(self.num_predictive_samples - num_defensive, generator), before.sample(num_defensive, generator)])
        constrained = density.constrain(flat.unflatten(draws))
        with torch.no_grad():
            pointwise = pointwise_log_likelihood(density.model, batch, kwargs, constrained)
            log_likelihood = sum(v.sum(-1) for v in pointwise.values())
            log_before = before.log_prob(draws)
            # The mixture's weights are the shares actually drawn (unbiased under this fixed allocation).
            share = num_defensive / self.num_predictive_samples
            log_proposal = torch.logaddexp(math.log1p(-share) + after.log_prob(draws), math.log(share) + log_before) if share < 1 else log_before
            log_weights = log_likelihood + log_before - log_proposal
            score = torch.logsumexp(log_weights, 0) - math.log(self.num_predictive_samples)
            normalised = torch.softmax(log_weights, 0)
            # Var[log mean w] ~ Var[w] / (S E[w]^2) = (S sum(normalised^2) - 1) / S.
            variance = (normalised.square().sum() * self.num_predictive_samples - 1).clamp_min(0) / self.num_predictive_samples
        return score, variance


class _Flattener:
    """Dict of latents <-> one flat vector (Tensor[p]; leading batch dimensions allowed on the way back)."""

    def __init__(self, template: dict[str, torch.Tensor]):
        self.names = list(template)
        self.shapes = [template[n].shape for n in self.names]
        self.sizes = [template[n].numel() for n in self.names]

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(vector, self.sizes, dim=-1)
        return {n: p.reshape(vector.shape[:-1] + shape) for n, p, shape in zip(self.names, pieces, self.shapes)}
