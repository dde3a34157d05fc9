"""Exact posterior and exact log evidence for conjugate linear-Gaussian models."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from bmm_ppl.inference.exact import general_prior as gaussian_linear, isotropic_prior as linear_gaussian
from bmm_ppl.inference.errors import (
    ConvergenceWarning, DivergenceError, HyperparameterBoundaryError, HyperparameterBoundaryWarning, OnBoundary,
    UnsupportedModelError,
)
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.latents import GaussianLatents
from bmm_ppl.inference.optimisation import backing_off_closure
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.exact.type2 import GRADIENT_TOLERANCE, maximise_evidence
from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior, Learned
from bmm_ppl.validation import prepare_data

_OTHER_ENGINES = "use bmm_ppl.inference.SVI (variational) or NUTS (sampling) for it instead"


def _convergence(converged: bool, gradient_norm: float, iterations: int, max_iterations: int) -> dict:
    """The convergence entries every iterative engine puts in ``Posterior.diagnostics``."""
    return {
        "converged": bool(converged),
        "gradient_norm": float(gradient_norm),
        "num_iterations": int(iterations),
        "max_iterations": int(max_iterations),
    }


def _vanishing(hyperparameters: dict | None) -> str:
    """Names learned variances (vector entries, or a matrix's smallest eigenvalue) far below the others:
    the usual reason a type-II run cannot converge is one running to 0, where the evidence has no top."""
    if not hyperparameters:
        return ""
    small = []
    for name, value in hyperparameters.items():
        if value.device.type == "meta" or value.numel() == 0 or not value.is_floating_point():
            continue
        if value.dim() == 2 and value.shape[0] == value.shape[1] and torch.allclose(value, value.mT):
            entries = torch.linalg.eigvalsh(value)
        else:
            entries = value.reshape(-1)
        top = float(entries.abs().max())
        lowest = float(entries.min())
        if top > 0 and 0 <= lowest < 1e-8 * top:
            small.append(f"{name} reaches {lowest:.3g}")
        if len(small) == 3:
            break
    if not small:
        return ""
    return (f"; {', '.join(small)}: a learned variance running to 0 (the evidence may have no maximum), "
            "so fix it, give it a floor, or use more data per group")


class Exact:
    """Exact inference for conjugate linear-Gaussian models (e.g. ``BayesianLinearRegression``).

    The posterior over the weights is Gaussian and the log evidence is exact. Hyperparameters the model
    learns (``alpha=None`` / ``beta=None``) are set by type-II maximisation of the exact evidence. When
    the evidence keeps rising toward a boundary (``alpha -> inf``: the data prefer no signal) there is
    no meaningful optimum: ``on_boundary="raise"`` (default) raises
    :class:`~bmm_ppl.inference.errors.HyperparameterBoundaryError`, ``"clip"`` warns and returns the fit at
    the last value reached, with ``diagnostics["boundary"]`` saying which limit. The optimiser's
    convergence is reported as every iterative engine reports it: ``diagnostics["converged"]`` (the
    gradient norm of the log evidence over the unconstrained hyperparameters at most 1e-5 per
    observation), ``"gradient_norm"``, ``"num_iterations"`` and ``"max_iterations"``; when it did not
    converge a :class:`~bmm_ppl.inference.errors.ConvergenceWarning` says what to change.

    Args:
        on_boundary: ``"raise"`` or ``"clip"``.
        max_iter: L-BFGS iterations for type-II.
        device: move the data here before fitting (``None``: follow the data).
        progress: accepted for a uniform engine signature; exact fits are too fast to need a bar.

    Examples:
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(-1, 1, 40, dtype=torch.float64)
        >>> y = torch.sin(3 * x) + 0.1 * torch.cos(17 * x)
        >>> post = Exact().fit(BayesianLinearRegression(polynomial_features(3)), x, y)
        >>> post.log_evidence.method, sorted(post.hyperparameters)
        (<EvidenceMethod.EXACT: 'exact'>, ['alpha', 'beta'])
    """

    def __init__(self, on_boundary: str | OnBoundary = OnBoundary.RAISE, max_iter: int = 500, device=None, progress: bool = True):
        self.on_boundary = OnBoundary.parse(on_boundary, "on_boundary")
        self.max_iter = int(max_iter)
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Fits ``model(*args, **kwargs)`` exactly and returns a :class:`Posterior` with ``method="exact"``."""
        if hasattr(model, "gaussian_form"):
            return self._fit_general(model, args, kwargs)
        describe = getattr(model, "conjugate_form", None)
        if describe is None:
            raise UnsupportedModelError(
                f"Exact handles conjugate linear-Gaussian models that describe their structure through "
                f"`conjugate_form` or `gaussian_form` (BayesianLinearRegression, MultiTaskRegression); "
                f"{type(model).__name__} does not: {_OTHER_ENGINES}"
            )
        args, kwargs = prepare_data(args, kwargs, self.device)
        form = describe(*args, **kwargs)
        for name, spec in (("alpha", form.alpha), ("beta", form.beta)):
            if isinstance(spec, Hyperprior):
                raise UnsupportedModelError(
                    f"Exact integrates the weights but not a hyperprior on {name}; fix {name} (a number) or "
                    f"learn it by type-II (None), or {_OTHER_ENGINES}"
                )
        design, targets = form.design, form.targets
        data = linear_gaussian.spectral_data(design, targets)

        fixed = {
            name: float(spec.value) if isinstance(spec, Fixed) else None
            for name, spec in (("alpha", form.alpha), ("beta", form.beta))
        }
        result = maximise_evidence(data, fixed["alpha"], fixed["beta"], self.max_iter)
        diagnostics = {
            "type2_evaluations": result.num_iterations,
            "boundary": dict(result.boundary),
            **_convergence(result.converged, result.gradient_norm, result.iterations, self.max_iter),
        }
        if result.boundary:
            self._report_boundary(result, model)
            diagnostics["limit_log_evidence"] = result.limit_log_evidence
        elif fixed["alpha"] is None or fixed["beta"] is None:
            self._report_convergence(diagnostics, model)

        alpha = result.alpha.to(design.dtype)
        beta = result.beta.to(design.dtype)
        mean = linear_gaussian.posterior_mean(data, alpha, beta)
        factor = linear_gaussian.posterior_scale_factor(data, alpha, beta)
        diagnostics["effective_num_parameters"] = float(linear_gaussian.effective_num_parameters(data, alpha, beta))
        evidence = linear_gaussian.log_evidence(data, alpha, beta)
        latents = GaussianLatents(mean, factor, {form.weight_site: (design.shape[1],)})
        learned = {
            name: value
            for name, spec, value in (("alpha", form.alpha, alpha), ("beta", form.beta, beta))
            if isinstance(spec, Learned)
        }
        return Posterior(
            model,
            args,
            kwargs,
            latent_distribution=latents,
            log_evidence=Evidence(float(evidence), None, "exact"),
            hyperparameters=learned,
            diagnostics=diagnostics,
            engine="Exact",
        )

    def _fit_general(self, model, args, kwargs) -> Posterior:
        """Models with a general Gaussian prior (``gaussian_form``): type-II by L-BFGS on the exact evidence."""
        args, kwargs = prepare_data(args, kwargs, self.device)
        try:
            learnable = model.learnable_hyperparameters(*args, **kwargs)
        except TypeError as error:
            raise UnsupportedModelError(f"Exact cannot integrate a hyperprior: {error}; {_OTHER_ENGINES}") from None
        transforms = {name: torch.distributions.transform_to(constraint) for name, (_, constraint) in learnable.items()}
        unconstrained = {name: transforms[name].inv(init).detach().clone().requires_grad_(True) for name, (init, _) in learnable.items()}

        def values():
            return {name: transforms[name](u) for name, u in unconstrained.items()}

        def negative_log_evidence():
            log_evidence, _, _ = gaussian_linear.exact_solution(model.gaussian_form(*args, **kwargs, hyperparameters=values()))
            return -log_evidence

        evaluations = 0
        iterations = 0
        if unconstrained:
            optimiser = torch.optim.LBFGS(
                list(unconstrained.values()), lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-9,
                tolerance_change=1e-12, line_search_fn="strong_wolfe",
            )

            def counted():
                nonlocal evaluations
                evaluations += 1
                return negative_log_evidence()

            optimiser.step(backing_off_closure(optimiser, counted))
            iterations = optimiser.state[optimiser._params[0]].get("n_iter", 0)
        with torch.no_grad():
            learned = {name: value.detach() for name, value in values().items()}
            form = model.gaussian_form(*args, **kwargs, hyperparameters=learned)
            try:
                log_evidence, mean, covariance = gaussian_linear.exact_solution(form)
            except torch.linalg.LinAlgError as error:
                raise DivergenceError(
                    f"type-II optimisation of {model!r} ended at singular covariances ({error}); a learned "
                    "covariance or noise variance is running to zero: fix it or give it a hyperprior"
                ) from None
        if not torch.isfinite(log_evidence):
            raise DivergenceError(f"type-II optimisation of {model!r} reached a non-finite evidence")
        diagnostics = {"type2_evaluations": evaluations}
        if unconstrained:
            loss = negative_log_evidence()
            grads = torch.autograd.grad(loss, list(unconstrained.values()))
            gradient_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
            converged = gradient_norm <= GRADIENT_TOLERANCE * max(1, form.targets.numel())
            diagnostics.update(_convergence(converged, gradient_norm, iterations, self.max_iter))
            diagnostics["type2_gradient_norm"] = gradient_norm
            self._report_convergence(diagnostics, model, learned)
        else:
            diagnostics.update(_convergence(True, 0.0, 0, self.max_iter))
        latents = GaussianLatents(mean, gaussian_linear.psd_square_root(covariance), {form.weight_site: (mean.shape[0],)})
        return Posterior(
            model, args, kwargs,
            latent_distribution=latents,
            log_evidence=Evidence(float(log_evidence), None, "exact"),
            hyperparameters=learned,
            diagnostics=diagnostics,
            engine="Exact",
        )

    def _report_convergence(self, diagnostics: dict, model, hyperparameters: dict | None = None) -> None:
        if diagnostics["converged"]:
            return
        capped = diagnostics["num_iterations"] >= self.max_iter
        warnings.warn(
            f"type-II evidence maximisation for {model!r} stopped before converging: gradient norm "
            f"{diagnostics['gradient_norm']:.3g} after {diagnostics['num_iterations']} L-BFGS iterations"
            + (f" (the cap, max_iter={self.max_iter}): raise max_iter" if capped else
               ": the evidence is badly conditioned here; rescale the data or fix a hyperparameter")
            + _vanishing(hyperparameters),
            ConvergenceWarning, stacklevel=3,
        )

    def _report_boundary(self, result, model) -> None:
        described = ", ".join(f"{name} -> {limit}" for name, limit in result.boundary.items())
        message = (
            f"type-II evidence maximisation for {model!r} has no interior optimum: the evidence keeps "
            f"rising as {described}"
        )
        if result.boundary.get("alpha") == "+inf":
            message += (
                f" (the data prefer a model with no signal, w = 0; its log evidence is "
                f"{result.limit_log_evidence:.6g})"
            )
        message += ". Fix the hyperparameter, give it a hyperprior, or pass on_boundary='clip' to keep the limit fit."
        if self.on_boundary is OnBoundary.RAISE:
            raise HyperparameterBoundaryError(message, dict(result.boundary))
        warnings.warn(message, HyperparameterBoundaryWarning, stacklevel=3)
