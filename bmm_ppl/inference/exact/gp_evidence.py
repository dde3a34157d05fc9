"""Exact Gaussian-process evidence: type-II learning of kernel hyperparameters, and GPyTorch conversions.

:class:`GPEvidence` fits Pyro programs that describe a GP with Gaussian noise through ``gp_form(x, y)``
(e.g. :class:`bmm_ppl.models.invariance.GPRegression`): it integrates the latent function exactly,
maximises the total log evidence ``log p(y | θ)`` over the program's ``pyro.param`` sites (kernel
hyperparameters, invariance ranges, noise), and returns a :class:`Posterior` over ``f`` at the data with
``Evidence(method="exact")``.

GPyTorch's ``ExactMarginalLogLikelihood`` returns ``(log p(y) + Σ log priors) / n`` and
``VariationalELBO`` returns ``ELBO / n`` (plus log priors / n): :func:`total_exact_log_evidence` and
:func:`total_elbo` undo that, giving totals over the data as :class:`Evidence` requires.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import torch

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError, UnsupportedModelError
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.latents import GaussianLatents
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.validation import prepare_data


def gaussian_log_evidence(covariance: torch.Tensor, noise: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Total ``log N(y | 0, K + σ² I)``, summed over the columns of ``targets``.

    Args:
        covariance: Tensor[n, n] prior covariance ``K``.
        noise: Tensor[] noise variance ``σ²``.
        targets: Tensor[n] or Tensor[n, C] (C independent outputs sharing ``K``).

    Returns:
        Tensor[] the log evidence, a total over all ``n * C`` observations.

    Example:
        >>> K = torch.eye(3, dtype=torch.float64)
        >>> round(float(gaussian_log_evidence(K, torch.tensor(1.0, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))), 6)
        -3.796536
    """
    n = targets.shape[0]
    y = targets.reshape(n, -1)
    outputs = y.shape[1]
    noisy = covariance + noise * torch.eye(n, device=covariance.device, dtype=covariance.dtype)
    factor = torch.linalg.cholesky(noisy)
    solved = torch.cholesky_solve(y, factor)
    log_det = 2 * torch.log(torch.diagonal(factor)).sum()
    return -0.5 * (y * solved).sum() - 0.5 * outputs * log_det - 0.5 * n * outputs * math.log(2 * math.pi)


def gaussian_process_posterior(covariance: torch.Tensor, noise: torch.Tensor, targets: torch.Tensor):
    """The posterior of ``f`` at the data: mean ``K A⁻¹ y`` and covariance ``K - K A⁻¹ K`` (``A = K + σ²I``).

    Returns:
        ``(mean, scale_factor)``: mean shaped like ``targets.T`` (Tensor[n] or Tensor[C, n]) and a
        Tensor[n, n] factor ``F`` with ``F Fᵀ`` the covariance shared by every output.
    """
    n = covariance.shape[0]
    noisy = covariance + noise * torch.eye(n, device=covariance.device, dtype=covariance.dtype)
    factor = torch.linalg.cholesky(noisy)
    mean = covariance @ torch.cholesky_solve(targets.reshape(n, -1), factor)
    whitened = torch.linalg.solve_triangular(factor, covariance, upper=False)
    posterior_cov = covariance - whitened.T @ whitened
    values, vectors = torch.linalg.eigh(0.5 * (posterior_cov + posterior_cov.T))
    scale = vectors * values.clamp_min(0).sqrt()
    mean = mean[:, 0] if targets.dim() == 1 else mean.T
    return mean, scale


def _log_priors(model: torch.nn.Module) -> torch.Tensor | float:
    total = 0.0
    for _, module, prior, closure, _ in model.named_priors():
        total = total + prior.log_prob(closure(module)).sum()
    return total


def total_exact_log_evidence(mll, function_dist, target: torch.Tensor) -> torch.Tensor:
    """The total ``log p(y)`` from a ``gpytorch.mlls.ExactMarginalLogLikelihood``, which divides by ``n``
    and adds the model's log priors: ``n * mll(output, y) - Σ log priors``, summed over any batch.

    Example:
        >>> from bmm_ppl.models.invariance._gpytorch import gpytorch
        >>> x = torch.linspace(0, 1, 4, dtype=torch.float64); y = torch.sin(x)
        >>> class GP(gpytorch.models.ExactGP):
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(x * 0, gpytorch.kernels.RBFKernel()(x))
        >>> gp = GP(x, y, gpytorch.likelihoods.GaussianLikelihood()).double()
        >>> mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
        >>> bool(total_exact_log_evidence(mll, gp(x), y) < 0)
        True
    """
    n = target.shape[-1]
    return (n * mll(function_dist, target) - _log_priors(mll.model)).sum()


def total_elbo(elbo, approximate_dist_f, target: torch.Tensor) -> torch.Tensor:
    """The total ELBO from a ``gpytorch.mlls.VariationalELBO`` evaluated on the *whole* data set:
    ``num_data * elbo(output, y) - Σ log priors`` (GPyTorch returns it per data point)."""
    if target.shape[-1] != elbo.num_data:
        raise ValueError(f"total_elbo needs the whole data set ({elbo.num_data} points), got {target.shape[-1]}")
    return (elbo.num_data * elbo(approximate_dist_f, target) - _log_priors(elbo.model)).sum()


class Optimizer(StrEnum):
    """How :class:`GPEvidence` maximises the evidence over the hyperparameters."""

    ADAM = "adam"  # any objective, stochastic (Monte-Carlo kernels) included
    LBFGS = "lbfgs"  # deterministic objectives (quadrature or finite-group kernels)


class GPEvidence:
    """Type-II maximum of the exact GP evidence; posterior over ``f`` at the data; exact log evidence.

    The model is a Pyro program that exposes ``gp_form(*args, **kwargs)`` returning the prior covariance,
    the noise and the targets at the current ``pyro.param`` values (:class:`bmm_ppl.models.invariance.GPRegression`
    does). All of the program's ``pyro.param`` sites are learned. With a Monte-Carlo kernel the objective
    is stochastic (fresh draws each step, use Adam); the reported evidence is then the mean over
    ``num_evidence_draws`` kernel draws with its standard error, tagged ``method="monte-carlo"`` (not an
    exact evidence: it is noisy and Jensen-biased), and ``diagnostics["stochastic_kernel"]`` is True.

    Args:
        num_steps: optimiser steps (L-BFGS: outer iterations of up to 20 evaluations).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"lbfgs"``.
        num_evidence_draws: kernel draws averaged for the reported evidence when the kernel is random.
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar.

    Example:
        >>> from bmm_ppl.models.invariance import GPRegression
        >>> import gpytorch
        >>> x = torch.linspace(0, 1, 20, dtype=torch.float64).unsqueeze(-1); y = torch.sin(6 * x[:, 0])
        >>> post = GPEvidence(num_steps=20, progress=False).fit(GPRegression(gpytorch.kernels.RBFKernel()), x, y)
        >>> post.log_evidence.method.value, post.samples(3)["f"].shape
        ('exact', torch.Size([3, 20]))
    """

    def __init__(self, num_steps: int = 200, lr: float = 0.05, optimizer: str | Optimizer = Optimizer.ADAM,
                 num_evidence_draws: int = 8, device=None, progress: bool = True):
        self.num_steps = int(num_steps)
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        self.lr = float(lr)
        self.optimizer = Optimizer.parse(optimizer, "optimizer")
        self.num_evidence_draws = int(num_evidence_draws)
        if self.num_evidence_draws < 2:
            raise ValueError(f"num_evidence_draws must be >= 2 (a standard error needs two), got {num_evidence_draws}")
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Learns the hyperparameters of ``model(*args, **kwargs)`` by the exact evidence; returns a Posterior."""
        describe = getattr(model, "gp_form", None)
        if describe is None:
            raise UnsupportedModelError(
                f"GPEvidence fits GP programs that expose `gp_form` (bmm_ppl.models.invariance.GPRegression); "
                f"{type(model).__name__} does not"
            )
        if getattr(model, "has_hyperprior", False):
            raise UnsupportedModelError("GPEvidence learns hyperparameters by type-II; it does not integrate hyperpriors")
        args, kwargs = prepare_data(args, kwargs, self.device)

        with pyro.get_param_store().scope():
            form = describe(*args, **kwargs)
            if form.targets is None:
                raise ValueError("GPEvidence needs the observations: pass y")
            store = pyro.get_param_store()
            unconstrained = [value for _, value in store.named_parameters()]
            losses = self._optimise(describe, args, kwargs, unconstrained)
            with torch.no_grad():
                forms = [describe(*args, **kwargs), describe(*args, **kwargs)]
                stochastic = not torch.equal(forms[0].covariance, forms[1].covariance)
                if stochastic:
                    forms += [describe(*args, **kwargs) for _ in range(self.num_evidence_draws - 2)]
                else:
                    forms = forms[:1]
                values = torch.stack([gaussian_log_evidence(f.covariance, f.noise, f.targets) for f in forms])
                mean, scale = gaussian_process_posterior(forms[0].covariance, forms[0].noise, forms[0].targets)
                hyperparameters = {name: pyro.param(name).detach() for name in store.keys()}
        if not torch.isfinite(values).all():
            raise DivergenceError("the exact GP evidence is not finite at the learned hyperparameters")
        stderr = float(values.std() / math.sqrt(len(values))) if stochastic else None
        shape = tuple(mean.shape)
        outputs = 1 if mean.dim() == 1 else shape[0]
        factor = torch.block_diag(*([scale] * outputs)) if outputs > 1 else scale
        latents = GaussianLatents(mean.reshape(-1), factor, {form.latent_site: shape})
        return Posterior(
            model, args, kwargs,
            latent_distribution=latents,
            log_evidence=Evidence(float(values.mean()), stderr, "monte-carlo" if stochastic else "exact"),
            hyperparameters=hyperparameters,
            loss_trace=losses,
            diagnostics={"stochastic_kernel": stochastic, "optimizer": self.optimizer.value,
                         "num_steps": self.num_steps},
            engine="GPEvidence",
        )

    def _optimise(self, describe, args, kwargs, unconstrained) -> torch.Tensor:
        from tqdm.auto import tqdm

        def loss_fn():
            form = describe(*args, **kwargs)
            try:
                return -gaussian_log_evidence(form.covariance, form.noise, form.targets)
            except torch.linalg.LinAlgError as error:
                raise DivergenceError(f"the GP covariance lost positive definiteness during type-II: {error}") from error

        losses = []
        if not unconstrained or self.num_steps == 0:
            return torch.stack([loss_fn().detach()]) if unconstrained else None
        if self.optimizer is Optimizer.LBFGS:
            optimiser = torch.optim.LBFGS(unconstrained, lr=self.lr, max_iter=20, line_search_fn="strong_wolfe")

            def closure():
                optimiser.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            for _ in tqdm(range(self.num_steps), disable=not self.progress, desc="GPEvidence"):
                losses.append(optimiser.step(closure).detach())
        else:
            optimiser = torch.optim.Adam(unconstrained, lr=self.lr)
            for _ in tqdm(range(self.num_steps), disable=not self.progress, desc="GPEvidence"):
                optimiser.zero_grad()
                loss = loss_fn()
                loss.backward()
                optimiser.step()
                losses.append(loss.detach())
        trace = torch.stack(losses)
        if not torch.isfinite(trace).all():
            raise DivergenceError("the negative log evidence became NaN/inf during type-II optimisation")
        return trace
