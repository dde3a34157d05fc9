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
import warnings
from typing import Callable

import pyro
import torch

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import ConvergenceWarning, DivergenceError, UnsupportedModelError
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.latents import GaussianLatents
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.validation import prepare_data


_JITTERS = (1e-10, 1e-8, 1e-6, 1e-4)  # retried in turn, relative to the mean diagonal of K + σ² I


def jittered_cholesky(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of ``matrix``, retried with growing diagonal jitter when round-off broke it.

    Args:
        matrix: Tensor[n, n], symmetric positive (semi-)definite in exact arithmetic.

    Returns:
        ``(factor, jitter)``: the lower factor of ``matrix + jitter * I`` and the jitter used
        (Tensor[], 0 when none was needed; at most 1e-4 of the mean diagonal).

    Raises:
        torch.linalg.LinAlgError: the matrix is not positive definite even with the largest jitter.

    Examples:
        >>> factor, jitter = jittered_cholesky(torch.ones(2, 2, dtype=torch.float64))
        >>> float(jitter) > 0, bool(torch.allclose(factor @ factor.T, torch.ones(2, 2, dtype=torch.float64), atol=1e-6))
        (True, True)
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    jitter = matrix.new_zeros(())
    if matrix.device.type == "meta" or not bool(info.any()):
        return factor, jitter
    eye = torch.eye(matrix.shape[-1], device=matrix.device, dtype=matrix.dtype)
    size = matrix.diagonal().mean().abs()
    for relative in _JITTERS:
        jitter = relative * size
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
        if not bool(info.any()):
            return factor, jitter
    raise torch.linalg.LinAlgError(
        f"the {matrix.shape[-1]} x {matrix.shape[-1]} GP covariance is not positive definite even with a "
        f"jitter of {float(jitter):.3g} on its diagonal"
    )


def _log_evidence_from_factor(factor: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, outputs = y.shape
    solved = torch.cholesky_solve(y, factor)
    log_det = 2 * torch.log(torch.diagonal(factor)).sum()
    return -0.5 * (y * solved).sum() - 0.5 * outputs * log_det - 0.5 * n * outputs * math.log(2 * math.pi)


def gaussian_log_evidence(covariance: torch.Tensor, noise: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Total ``log N(y | 0, K + σ² I)``, summed over the columns of ``targets``.

    Args:
        covariance: Tensor[n, n] prior covariance ``K``.
        noise: Tensor[] noise variance ``σ²``.
        targets: Tensor[n] or Tensor[n, C] (C independent outputs sharing ``K``).

    Returns:
        Tensor[] the log evidence, a total over all ``n * C`` observations.

    Examples:
        >>> K = torch.eye(3, dtype=torch.float64)
        >>> round(float(gaussian_log_evidence(K, torch.tensor(1.0, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))), 6)
        -3.796536
    """
    n = targets.shape[0]
    noisy = covariance + noise * torch.eye(n, device=covariance.device, dtype=covariance.dtype)
    return _log_evidence_from_factor(torch.linalg.cholesky(noisy), targets.reshape(n, -1))


def standardised_log_evidence(covariance: torch.Tensor, noise: torch.Tensor, targets: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``log N(y / c | 0, (K + σ² I) / c²)`` with a jittered Cholesky: the evidence on the standardised
    scale ``c``; on the user's scale it is this minus ``y.numel() * log c``.

    Args:
        covariance: Tensor[n, n].
        noise: Tensor[].
        targets: Tensor[n] or Tensor[n, C].
        scale: the target scale ``c`` (> 0).

    Returns:
        ``(log_evidence, jitter)``: Tensor[] on the standardised scale and the Cholesky jitter added
        there (Tensor[]; multiply by ``c²`` for the user's scale).

    Examples:
        >>> K = torch.eye(3, dtype=torch.float64); y = torch.ones(3, dtype=torch.float64)
        >>> value, _ = standardised_log_evidence(1e6 * K, torch.tensor(1e6, dtype=torch.float64), 1e3 * y, 1e3)
        >>> bool(torch.isclose(value - 3 * math.log(1e3), gaussian_log_evidence(1e6 * K, torch.tensor(1e6, dtype=torch.float64), 1e3 * y)))
        True
    """
    n = targets.shape[0]
    inverse_sq = 1.0 / (scale * scale)
    noisy = (covariance + noise * torch.eye(n, device=covariance.device, dtype=covariance.dtype)) * inverse_sq
    factor, jitter = jittered_cholesky(noisy)
    return _log_evidence_from_factor(factor, targets.reshape(n, -1) / scale), jitter


def gaussian_process_posterior(covariance: torch.Tensor, noise: torch.Tensor, targets: torch.Tensor):
    """The posterior of ``f`` at the data: mean ``K A⁻¹ y`` and covariance ``K - K A⁻¹ K`` (``A = K + σ²I``,
    with a jittered Cholesky when round-off broke it).

    Returns:
        ``(mean, scale_factor)``: mean shaped like ``targets.T`` (Tensor[n] or Tensor[C, n]) and a
        Tensor[n, n] factor ``F`` with ``F Fᵀ`` the covariance shared by every output.
    """
    n = covariance.shape[0]
    noisy = covariance + noise * torch.eye(n, device=covariance.device, dtype=covariance.dtype)
    factor, _ = jittered_cholesky(noisy)
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

    Examples:
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


# Sites holding a variance of the targets: their initial values are read in units of the targets' mean
# square, so that a fit of c * y starts (and runs) where the fit of y does, scaled.
_NOISE_SITE = "noise"
_OUTPUTSCALE_SUFFIX = "outputscale"
# Converged: |grad log p(y)| over the unconstrained hyperparameters at most this per observation. Near an
# optimum with curvature ~N that leaves the evidence ~1e-6 N nats from its maximum.
GRADIENT_TOLERANCE = 1e-3
# Monte-Carlo kernels: the mean loss over the last tenth of the steps may differ from the tenth before by
# at most two standard errors of that difference plus this per observation.
_STOCHASTIC_TOLERANCE = 1e-3


def _is_variance_site(name: str) -> bool:
    return name == _NOISE_SITE or name.endswith(_OUTPUTSCALE_SUFFIX)


class GPEvidence:
    """Type-II maximum of the exact GP evidence; posterior over ``f`` at the data; exact log evidence.

    The model is a Pyro program that exposes ``gp_form(*args, **kwargs)`` returning the prior covariance,
    the noise and the targets at the current ``pyro.param`` values (:class:`bmm_ppl.models.invariance.GPRegression`
    does). All of the program's ``pyro.param`` sites are learned. With a Monte-Carlo kernel the objective
    is stochastic (fresh draws each step, use Adam); the reported evidence is then the mean over
    ``num_evidence_draws`` kernel draws with its standard error, tagged ``method="monte-carlo"`` (not an
    exact evidence: it is noisy and Jensen-biased), and ``diagnostics["stochastic_kernel"]`` is True.

    The fit is scale-equivariant in the targets: they are standardised by their root mean square ``c``
    (``diagnostics["target_scale"]``; no centring, as the GP has mean zero), the evidence is computed on
    that scale and reported on the user's, ``log p(y) = log p(y / c) - N log c`` (``N = y.numel()``),
    and the initial values of the variance sites (``"noise"`` and any ``"...outputscale"``) are read in
    units of ``c²``. Fitting ``1e6 * y`` therefore follows the fit of ``y`` step for step. When round-off
    breaks the Cholesky factor a growing diagonal jitter is retried; the jitter added to ``K + σ² I`` for
    the reported evidence is ``diagnostics["cholesky_jitter"]`` (user scale, 0 when none was needed).

    Convergence is reported as every iterative engine reports it: ``diagnostics["converged"]``, with
    ``"gradient_norm"`` (of the log evidence over the unconstrained hyperparameters; converged when at
    most 1e-3 per observation), ``"relative_change"`` (of the mean loss over the last tenth of the steps
    against the tenth before; the test for a Monte-Carlo kernel), ``"num_iterations"`` and
    ``"max_iterations"``. A fit that stopped before converging issues a
    :class:`~bmm_ppl.inference.errors.ConvergenceWarning` naming what to change.

    Args:
        num_steps: optimiser steps (L-BFGS: outer iterations of up to 20 evaluations); 0 evaluates the
            evidence at the initial values (no convergence test).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"lbfgs"``.
        num_evidence_draws: kernel draws averaged for the reported evidence when the kernel is random.
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar.

    Examples:
        >>> from bmm_ppl.models.invariance import GPRegression
        >>> import gpytorch
        >>> x = torch.linspace(0, 1, 20, dtype=torch.float64).unsqueeze(-1); y = torch.sin(6 * x[:, 0])
        >>> post = GPEvidence(num_steps=20, optimizer="lbfgs", lr=1.0, progress=False).fit(GPRegression(gpytorch.kernels.RBFKernel()), x, y)
        >>> post.log_evidence.method.value, post.samples(3)["f"].shape, post.diagnostics["converged"]
        ('exact', torch.Size([3, 20]), True)
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
            if form.targets.numel() == 0:
                raise ValueError("y is empty: GPEvidence needs at least one observation")
            scale = self._target_scale(form.targets)
            store = pyro.get_param_store()
            for name in list(store.keys()):
                if _is_variance_site(name):
                    store[name] = pyro.param(name).detach() * scale**2
            unconstrained = [value for _, value in store.named_parameters()]
            num_observations = form.targets.numel()
            shift = num_observations * math.log(scale)  # log p(y) = log p(y / c) - N log c

            def standardised_loss():
                form = describe(*args, **kwargs)
                try:
                    value, _ = standardised_log_evidence(form.covariance, form.noise, form.targets, scale)
                except torch.linalg.LinAlgError as error:
                    raise DivergenceError(f"the GP covariance lost positive definiteness during type-II: {error}") from error
                return -value

            losses = self._optimise(standardised_loss, unconstrained)
            with torch.no_grad():
                forms = [describe(*args, **kwargs), describe(*args, **kwargs)]
                stochastic = not torch.equal(forms[0].covariance, forms[1].covariance)
                if stochastic:
                    forms += [describe(*args, **kwargs) for _ in range(self.num_evidence_draws - 2)]
                else:
                    forms = forms[:1]
                try:
                    evaluated = [standardised_log_evidence(f.covariance, f.noise, f.targets, scale) for f in forms]
                    mean, posterior_scale = gaussian_process_posterior(forms[0].covariance, forms[0].noise, forms[0].targets)
                except torch.linalg.LinAlgError as error:
                    raise DivergenceError(f"the GP covariance is not positive definite at the learned hyperparameters: {error}") from error
                values = torch.stack([value for value, _ in evaluated]) - shift
                jitter = torch.stack([j for _, j in evaluated]).max() * scale**2
                hyperparameters = {name: pyro.param(name).detach() for name in store.keys()}
            convergence = self._convergence(standardised_loss, unconstrained, losses, stochastic, num_observations)
        if not torch.isfinite(values).all():
            raise DivergenceError("the exact GP evidence is not finite at the learned hyperparameters")
        if unconstrained and self.num_steps > 0:
            self._report_convergence(model, convergence, stochastic)
        stderr = float(values.std() / math.sqrt(len(values))) if stochastic else None
        shape = tuple(mean.shape)
        outputs = 1 if mean.dim() == 1 else shape[0]
        factor = torch.block_diag(*([posterior_scale] * outputs)) if outputs > 1 else posterior_scale
        latents = GaussianLatents(mean.reshape(-1), factor, {form.latent_site: shape})
        return Posterior(
            model, args, kwargs,
            latent_distribution=latents,
            log_evidence=Evidence(float(values.mean()), stderr, "monte-carlo" if stochastic else "exact"),
            hyperparameters=hyperparameters,
            loss_trace=None if losses is None else losses + shift,
            diagnostics={"stochastic_kernel": stochastic, "optimizer": self.optimizer.value,
                         "num_steps": self.num_steps, "target_scale": scale,
                         "cholesky_jitter": float(jitter), **convergence},
            engine="GPEvidence",
        )

    @staticmethod
    def _target_scale(targets: torch.Tensor) -> float:
        """Root mean square of the targets (1 for all-zero targets): the unit the fit works in."""
        if targets.device.type == "meta":
            return 1.0
        value = float(targets.detach().double().pow(2).mean().sqrt())
        return value if math.isfinite(value) and value > 0 else 1.0

    def _convergence(self, loss_fn, unconstrained, losses, stochastic: bool, num_observations: int) -> dict:
        """The convergence entries of ``diagnostics`` (gradient and loss-change tests)."""
        iterations = 0 if losses is None else len(losses)
        if not unconstrained:
            return {"converged": True, "gradient_norm": 0.0, "relative_change": 0.0,
                    "num_iterations": 0, "max_iterations": self.num_steps}
        loss = loss_fn()
        grads = torch.autograd.grad(loss, unconstrained, allow_unused=True)
        gradient_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
        window = max(1, iterations // 10)
        relative_change, change_ok = None, False
        if iterations >= 2 * window and iterations >= 2:
            last, before = losses[-window:].double(), losses[-2 * window:-window].double()
            change = float((last.mean() - before.mean()).abs())
            relative_change = change / max(1.0, float(last.mean().abs()))
            noise = 0.0
            if window > 1:
                noise = 2 * math.sqrt(float(last.var()) / window + float(before.var()) / window)
            change_ok = change <= noise + _STOCHASTIC_TOLERANCE * num_observations
        if stochastic:
            converged = change_ok
        else:
            converged = gradient_norm <= GRADIENT_TOLERANCE * num_observations
        return {"converged": bool(converged), "gradient_norm": gradient_norm, "relative_change": relative_change,
                "num_iterations": iterations, "max_iterations": self.num_steps}

    def _report_convergence(self, model, convergence: dict, stochastic: bool) -> None:
        if convergence["converged"]:
            return
        if stochastic:
            test = f"the mean loss still changed by a relative {convergence['relative_change']:.3g} over the last tenth of the steps"
        else:
            test = f"gradient norm {convergence['gradient_norm']:.3g} of the log evidence"
        if self.optimizer is Optimizer.ADAM:
            advice = "raise num_steps or lr" + ("" if stochastic else ", or use optimizer='lbfgs' with lr=1.0")
        else:
            advice = "raise num_steps"
        warnings.warn(
            f"GPEvidence stopped after {convergence['num_iterations']} {self.optimizer.value} steps before "
            f"converging ({test}) on {model!r}: {advice}",
            ConvergenceWarning, stacklevel=3,
        )

    def _optimise(self, loss_fn, unconstrained) -> torch.Tensor | None:
        """Minimises ``loss_fn`` (the standardised negative log evidence) over ``unconstrained``; returns
        the trace of losses (on the standardised scale), or ``None`` when nothing is learned."""
        from tqdm.auto import tqdm

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
