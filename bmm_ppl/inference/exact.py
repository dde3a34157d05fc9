"""Exact posterior and exact log evidence for conjugate linear-Gaussian models."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference import linear_gaussian
from bmm_ppl.inference.errors import HyperparameterBoundaryError, HyperparameterBoundaryWarning, UnsupportedModelError
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.latents import GaussianLatents
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.type2 import maximise_evidence
from bmm_ppl.models.hyperparameters import Fixed, Hyperprior, Learned
from bmm_ppl.validation import check_same_device, check_tensor

_OTHER_ENGINES = "use bmm_ppl.inference.SVI (variational) or NUTS (sampling) for it instead"


class OnBoundary(StrEnum):
    """What :class:`Exact` does when a learned hyperparameter's evidence supremum is a limit."""

    RAISE = "raise"  # raise HyperparameterBoundaryError
    CLIP = "clip"  # warn, and return the fit at the last finite value reached


def _move(value, device):
    if device is None:
        return value
    return value.to(device) if isinstance(value, torch.Tensor) else value


class Exact:
    """Exact inference for conjugate linear-Gaussian models (e.g. ``BayesianLinearRegression``).

    The posterior over the weights is Gaussian and the log evidence is exact. Hyperparameters the model
    learns (``alpha=None`` / ``beta=None``) are set by type-II maximisation of the exact evidence. When
    the evidence keeps rising toward a boundary (``alpha -> inf``: the data prefer no signal) there is
    no meaningful optimum: ``on_boundary="raise"`` (default) raises
    :class:`~bmm_ppl.inference.errors.HyperparameterBoundaryError`, ``"clip"`` warns and returns the fit at
    the last value reached, with ``diagnostics["boundary"]`` saying which limit.

    Args:
        on_boundary: ``"raise"`` or ``"clip"``.
        max_iter: L-BFGS iterations for type-II.
        device: move the data here before fitting (``None``: follow the data).
        progress: accepted for a uniform engine signature; exact fits are too fast to need a bar.

    Example:
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
        describe = getattr(model, "conjugate_form", None)
        if describe is None:
            raise UnsupportedModelError(
                f"Exact handles conjugate linear-Gaussian models that describe their structure through "
                f"`conjugate_form` (BayesianLinearRegression); {type(model).__name__} does not: {_OTHER_ENGINES}"
            )
        args = tuple(_move(a, self.device) for a in args)
        kwargs = {k: _move(v, self.device) for k, v in kwargs.items()}
        tensors = {f"argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        tensors.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        check_same_device(**tensors)
        for name, value in tensors.items():
            check_tensor(name, value)
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
        }
        if result.boundary:
            self._report_boundary(result, model)
            diagnostics["limit_log_evidence"] = result.limit_log_evidence

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
