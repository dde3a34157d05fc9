"""The ``Kalman`` engine: exact evidence, smoothing posterior and type-II learning for linear-Gaussian SSMs."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pyro
import torch
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import (
    ConvergenceWarning, DivergenceError, HyperparameterBoundaryError, HyperparameterBoundaryWarning, OnBoundary,
    UnsupportedModelError,
)
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.kalman import steady_state
from bmm_ppl.inference.kalman.em import check_em_supported, em_update
from bmm_ppl.inference.kalman.filtering import FilterResult, SmootherResult, kalman_filter, rts_smoother
from bmm_ppl.inference.kalman.latents import SmoothedStates
from bmm_ppl.inference.kalman.parallel import parallel_kalman_filter, parallel_rts_smoother
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.latents import GaussianLatents
from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior
from bmm_ppl.contracts.state_space import StateSpaceForm
from bmm_ppl.contracts.state_space import LinearGaussianParams, psd_sqrt

_PARALLEL_FROM = 32  # below this many steps the sequential loop is as fast as the scan
_STEADY_STATE_FROM = 512  # from here the steady-state FFT path wins for the evidence alone
_COVARIANCES = ("transition_cov", "observation_cov", "initial_cov")
# Converged: |grad log p(y)| over the unconstrained parameters at most this per observed entry.
GRADIENT_TOLERANCE = 1e-4
_BOUNDARY_PUSH = 1e-3  # a learned variance is pushed 1000-fold toward 0 ...
_BOUNDARY_TOLERANCE = 1e-7  # ... and is at a boundary when the evidence is no lower (relative, round-off)


class FilterMethod(StrEnum):
    """How the filter runs over time: a sequential loop, an associative scan, or chosen by length."""

    AUTO = "auto"
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"
    STEADY_STATE = "steady-state"  # log-likelihood only: time-invariant matrices, complete data


class Learning(StrEnum):
    """How learned matrices are fitted: gradient ascent on the exact evidence, or EM."""

    LBFGS = "lbfgs"
    ADAM = "adam"
    EM = "em"


def filter_and_smooth(params: LinearGaussianParams, y: torch.Tensor, method: FilterMethod | str = "auto") -> tuple[FilterResult, SmootherResult]:
    """Filters and RTS-smooths ``y: Tensor[*batch, T, p]`` with either implementation."""
    method = FilterMethod.parse(method, "method")
    if _use_parallel(method, y):
        filtered = parallel_kalman_filter(params, y)
        return filtered, parallel_rts_smoother(params, filtered)
    filtered = kalman_filter(params, y)
    return filtered, rts_smoother(params, filtered)


def log_likelihood(params: LinearGaussianParams, y: torch.Tensor, method: FilterMethod | str = "auto") -> torch.Tensor:
    """Exact ``log p(y)`` of each series, Tensor[*batch]; differentiable in the matrices.

    Examples:
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> log_likelihood(p, torch.zeros(3, 1)).shape
        torch.Size([])
    """
    method = FilterMethod.parse(method, "method")
    if method is FilterMethod.STEADY_STATE or (
        method is FilterMethod.AUTO and y.shape[-2] >= _STEADY_STATE_FROM and steady_state.applies(params, y)
    ):
        if not steady_state.applies(params, y):
            raise ValueError("method='steady-state' needs time-invariant matrices and complete data")
        return steady_state.steady_state_log_likelihood(params, y)
    run = parallel_kalman_filter if _use_parallel(method, y) else kalman_filter
    return run(params, y).log_likelihood


def _use_parallel(method: FilterMethod, y: torch.Tensor) -> bool:
    long = method in (FilterMethod.AUTO, FilterMethod.STEADY_STATE) and y.shape[-2] >= _PARALLEL_FROM
    return method is FilterMethod.PARALLEL or long


def _check_series(y) -> None:
    """Refuses series the filter would answer vacuously: no time steps, or no observed entry."""
    if not isinstance(y, torch.Tensor):
        return  # the model's own checks name the type
    if y.dim() >= 2 and y.shape[-2] == 0:
        raise ValueError(f"y has no time steps (shape {tuple(y.shape)}): Kalman needs Tensor[T, p] with T >= 1")
    if y.numel() == 0:
        raise ValueError(f"y is empty (shape {tuple(y.shape)}): Kalman needs at least one observation")
    if y.device.type == "meta" or not y.is_floating_point() or y.dim() < 2:
        return
    observed = (~torch.isnan(y)).flatten(-2).any(-1)
    if y.dim() == 2 and not bool(observed):
        raise ValueError(
            "y is entirely missing (all NaN): its evidence would be a vacuous 0 and nothing can be learned; "
            "pass a series with at least one observed entry"
        )
    if y.dim() > 2 and not bool(observed.all()):
        empty = torch.nonzero(~observed.reshape(-1)).reshape(-1).tolist()
        raise ValueError(f"y has series with no observed entry (all NaN), at flattened batch indices {empty[:10]}; drop them")


class Kalman:
    """Exact inference for linear-Gaussian state-space models (``LinearGaussianSSM`` and its builders).

    A conjugate linear regression with fixed ``alpha`` and ``beta`` (``BayesianLinearRegression``) is accepted
    too, as ``fit(model, x, y)``: its weights are a constant state, so it passes the conformance suite.

    The states are integrated by the Kalman filter, so ``log_evidence`` is exact; the posterior draws whole
    state trajectories from the RTS smoothing distribution. Arguments the model learns (``None``) are set
    by type-II: L-BFGS (default) or Adam on the exact evidence, or EM. The filtered, predicted and smoothed
    moments are on ``posterior.latent_distribution`` (a :class:`SmoothedStates`).

    The series is checked first: a zero-length series and a series with no observed entry (all NaN,
    whose "evidence" would be a vacuous 0) are refused with a ``ValueError`` naming ``y``.

    Type-II learning reports boundaries as :class:`~bmm_ppl.inference.Exact` does: when the evidence
    keeps rising as a learned variance runs to 0 (a local level fitted to white noise drives the level
    variance there: the data prefer a constant level), there is no interior optimum. Each learned
    variance (entry of a diagonal covariance, smallest eigenvalue of a full one) is pushed 1000-fold
    toward 0 after learning; if the evidence is no lower, ``on_boundary="raise"`` (default) raises
    :class:`~bmm_ppl.inference.errors.HyperparameterBoundaryError` and ``"clip"`` warns
    (:class:`~bmm_ppl.inference.errors.HyperparameterBoundaryWarning`) and returns the fit reached, with
    ``diagnostics["boundary"]`` (``{"transition_cov": "0"}``; entries of a vector as
    ``"transition_cov[1]"``) and ``diagnostics["limit_log_evidence"]``, the evidence with that variance
    exactly 0 where it can be evaluated. Convergence is reported as every iterative engine reports it:
    ``diagnostics["converged"]`` (gradient norm of the log evidence over the unconstrained parameters at
    most 1e-4 per observed entry; for EM, the change test of ``tolerance``), ``"gradient_norm"``,
    ``"relative_change"`` (of the last step), ``"num_iterations"``, ``"max_iterations"``; a fit that did
    not converge issues a :class:`~bmm_ppl.inference.errors.ConvergenceWarning` naming what to change.

    Args:
        learning: ``"lbfgs"``, ``"adam"`` or ``"em"``.
        num_steps: optimiser iterations (L-BFGS iterations, Adam steps, EM iterations).
        lr: step size (L-BFGS's initial step, Adam's learning rate).
        tolerance: stop when an iteration changes the log evidence by less than ``tolerance * (1 + |log p|)``.
        method: ``"sequential"`` (Joseph-form loop), ``"parallel"`` (associative scan, O(log T) depth),
            ``"steady-state"`` (for the evidence while learning: steady-state gain and an FFT convolution,
            time-invariant matrices and complete data only; moments then come from the scan) or ``"auto"``
            (steady-state evidence from 512 steps where it applies, the scan from 32 steps, else the loop).
        on_boundary: ``"raise"`` or ``"clip"`` (see above).
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar while learning.

    Examples:
        >>> from bmm_ppl.models.state_space import local_level
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randn(50, 1, generator=g, dtype=torch.float64).cumsum(0) + torch.randn(50, 1, generator=g, dtype=torch.float64)
        >>> post = Kalman(progress=False).fit(local_level(initial_mean=0.0, initial_cov=10.0), y)
        >>> post.log_evidence.method.value, sorted(post.hyperparameters), post.diagnostics["converged"]
        ('exact', ['observation_cov', 'transition_cov'], True)
        >>> post.latent_distribution.smoothed_means.shape
        torch.Size([50, 1])
    """

    def __init__(
        self,
        learning: str | Learning = Learning.LBFGS,
        num_steps: int = 200,
        lr: float | None = None,
        tolerance: float = 1e-10,
        method: str | FilterMethod = FilterMethod.AUTO,
        on_boundary: str | OnBoundary = OnBoundary.RAISE,
        device=None,
        progress: bool = True,
    ):
        self.learning = Learning.parse(learning, "learning")
        self.num_steps = int(num_steps)
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be non-negative, got {num_steps}")
        self.lr = lr
        self.tolerance = float(tolerance)
        self.method = FilterMethod.parse(method, "method")
        self.on_boundary = OnBoundary.parse(on_boundary, "on_boundary")
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    def fit(self, model: Callable, y: torch.Tensor, controls: torch.Tensor | None = None) -> Posterior:
        """Fits ``model(y, controls)`` and returns a :class:`Posterior` with ``method="exact"`` evidence.

        Args:
            y: Tensor[T, p] or Tensor[B, T, p] (a batch of series sharing the matrices); NaN = missing.
            controls: Tensor[T, c] or Tensor[B, T, c], or ``None``.
        """
        describe = getattr(model, "state_space_form", None)
        if describe is None and hasattr(model, "conjugate_form"):
            return self._fit_regression(model, y, controls)
        if describe is None:
            raise UnsupportedModelError(
                f"Kalman handles linear-Gaussian state-space models that describe their structure through "
                f"`state_space_form` (LinearGaussianSSM); {type(model).__name__} does not"
            )
        if self.device is not None:
            y = y.to(self.device)
            controls = None if controls is None else controls.to(self.device)
        _check_series(y)
        with pyro.get_param_store().scope():
            form = describe(y, controls)
            priors = [name for name, spec in form.specs.items() if isinstance(spec, Hyperprior)]
            if priors:
                raise UnsupportedModelError(
                    f"Kalman integrates the states but not a prior on {priors}; fix them (tensors) or learn them "
                    f"(None), or fit the model with SVI or NUTS"
                )
            store = pyro.get_param_store()
            learned = [name for name in form.specs if name in store]
            loss_trace, converged, iterations = self._learn(describe, y, controls, form, learned)
            convergence = self._convergence(describe, y, controls, learned, loss_trace, converged, iterations)
            with torch.no_grad():
                form = describe(y, controls)
                filtered, smoothed = filter_and_smooth(form.params, form.observations, self.method)
                hyperparameters = {name: pyro.param(name).detach() for name in learned}
            total = filtered.log_likelihood.sum()
            if not bool(torch.isfinite(total)):
                raise DivergenceError(f"the Kalman log-likelihood is {float(total)}: the learned matrices diverged")
            boundary, limit = {}, None
            if loss_trace:
                boundary, limit = self._find_boundary(describe, y, controls, learned, float(total))
        diagnostics = {
            "learning": self.learning.value if learned else "none",
            **convergence,
            "boundary": boundary,
            "filter_method": "parallel" if _use_parallel(self.method, y) else "sequential",
            "series_log_evidence": filtered.log_likelihood.detach(),
        }
        if boundary:
            diagnostics["limit_log_evidence"] = limit
            self._report_boundary(model, boundary, limit)
        elif loss_trace:
            self._report_convergence(model, convergence)
        return Posterior(
            model,
            (y,) if controls is None else (y, controls),
            {},
            latent_distribution=SmoothedStates.from_results(filtered, smoothed, form.states_site),
            log_evidence=Evidence(float(total), None, "exact"),
            hyperparameters=hyperparameters,
            loss_trace=torch.stack(loss_trace) if loss_trace else y.new_zeros(0),
            diagnostics=diagnostics,
            engine="Kalman",
        )

    def _fit_regression(self, model, x, y) -> Posterior:
        """A conjugate linear regression read as a state-space model: the weights are a constant state
        (``F = I``, ``Q = 0``, ``x_0 ~ N(0, I / alpha)``) observed through ``H_t = phi(x_t)`` with noise ``1 / beta``;
        the filter's last moments are the exact posterior and its likelihood the exact evidence."""
        if y is None:
            raise ValueError("y is required: the evidence is of observed data")
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        form = model.conjugate_form(x, y)
        if not all(isinstance(spec, Fixed) for spec in (form.alpha, form.beta)):
            raise UnsupportedModelError(
                "Kalman fits a linear regression with fixed alpha and beta; learn them with bmm_ppl.inference.Exact"
            )
        design, targets = form.design, form.targets
        d = design.shape[-1]
        eye = torch.eye(d, dtype=design.dtype, device=design.device)
        alpha = design.new_full((), float(form.alpha.value))
        beta = design.new_full((), float(form.beta.value))
        params = LinearGaussianParams(
            eye, design.unsqueeze(-2), torch.zeros_like(eye), (1.0 / beta).reshape(1, 1), design.new_zeros(d), eye / alpha
        )
        method = FilterMethod.SEQUENTIAL if self.method is FilterMethod.STEADY_STATE else self.method
        filtered = (parallel_kalman_filter if _use_parallel(method, targets.unsqueeze(-1)) else kalman_filter)(params, targets.unsqueeze(-1))
        mean, cov = filtered.filtered_means[-1], filtered.filtered_covs[-1]
        latents = GaussianLatents(mean, psd_sqrt(cov), {form.weight_site: (d,)})
        total = filtered.log_likelihood
        return Posterior(
            model, (x, y), {}, latent_distribution=latents, log_evidence=Evidence(float(total), None, "exact"),
            diagnostics={"filter_method": "parallel" if _use_parallel(method, targets.unsqueeze(-1)) else "sequential"},
            engine="Kalman",
        )

    # ------------------------------------------------------------ convergence and boundaries
    def _convergence(self, describe, y, controls, learned, trace, converged_by_tolerance, iterations) -> dict:
        """The convergence entries of ``diagnostics``: gradient norm at the end, last relative change."""
        entries = {"converged": True, "gradient_norm": 0.0, "relative_change": None,
                   "num_iterations": 0, "max_iterations": self.num_steps}
        if not trace:
            return entries
        # L-BFGS counts iterations (each may evaluate several times); Adam and EM one evaluation each.
        entries["num_iterations"] = iterations
        entries["num_evaluations"] = len(trace)
        store = pyro.get_param_store()
        unconstrained = [store.get_param(name).unconstrained() for name in learned]
        loss = self._negative_evidence(describe, y, controls)
        grads = torch.autograd.grad(loss, unconstrained, allow_unused=True)
        gradient_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
        if len(trace) >= 2:
            last, before = float(trace[-1]), float(trace[-2])
            entries["relative_change"] = abs(last - before) / (1.0 + abs(last))
        observed = int((~torch.isnan(y)).sum()) if y.device.type != "meta" else y.numel()
        if self.learning is Learning.EM:
            converged = converged_by_tolerance
        else:
            converged = gradient_norm <= GRADIENT_TOLERANCE * max(1, observed)
        entries.update(converged=bool(converged), gradient_norm=gradient_norm)
        return entries

    def _report_convergence(self, model, convergence: dict) -> None:
        if convergence["converged"]:
            return
        capped = convergence["num_iterations"] >= self.num_steps
        if self.learning is Learning.ADAM:
            advice = f"raise num_steps (now {self.num_steps}) or lr, or use learning='lbfgs'"
        elif self.learning is Learning.EM:
            advice = f"raise num_steps (now {self.num_steps}) or use learning='lbfgs' (EM is slow on flat evidence)"
        elif capped:
            advice = f"raise num_steps (now {self.num_steps})"
        else:
            advice = "the evidence is badly conditioned here: rescale y, or fix a matrix"
        warnings.warn(
            f"Kalman type-II learning of {model!r} stopped before converging: gradient norm "
            f"{convergence['gradient_norm']:.3g} after {convergence['num_iterations']} "
            f"{self.learning.value} iterations; {advice}",
            ConvergenceWarning, stacklevel=3,
        )

    def _find_boundary(self, describe, y, controls, learned, best: float) -> tuple[dict, float | None]:
        """``({label: "0"}, limit evidence)`` for learned variances whose evidence supremum is at 0."""
        store = pyro.get_param_store()
        boundary, zeroed = {}, {}
        threshold = best - _BOUNDARY_TOLERANCE * max(1.0, abs(best))
        with torch.no_grad():
            for name in learned:
                if name not in _COVARIANCES:
                    continue
                value = pyro.param(name).detach().clone()
                if value.device.type == "meta":
                    continue
                if value.dim() == 1:  # a diagonal covariance: its variances
                    candidates = []
                    for i in range(value.shape[0]):
                        pushes = []
                        for factor in (_BOUNDARY_PUSH, _BOUNDARY_PUSH**2):
                            pushed = value.clone()
                            pushed[i] = pushed[i] * factor
                            pushes.append(pushed)
                        limit = value.clone()
                        limit[i] = 0.0
                        label = name if value.shape[0] == 1 else f"{name}[{i}]"
                        candidates.append((label, pushes, limit))
                else:  # a full covariance: its smallest eigenvalue
                    eigenvalues, vectors = torch.linalg.eigh(0.5 * (value + value.mT))
                    pushes = []
                    for factor in (_BOUNDARY_PUSH, _BOUNDARY_PUSH**2):
                        shrunk = eigenvalues.clone()
                        shrunk[0] = shrunk[0] * factor
                        pushes.append((vectors * shrunk) @ vectors.mT)
                    candidates = [(name, pushes, None)]
                for label, pushes, limit in candidates:
                    # A boundary: the evidence is no lower 1000-fold closer to 0, and no lower again a further
                    # 1000-fold (an unconverged run short of an interior optimum passes the first test only).
                    values = []
                    for pushed in pushes:
                        store[name] = pushed
                        try:
                            values.append(float(-self._negative_evidence(describe, y, controls)))
                        except (RuntimeError, ValueError):  # a push that breaks a factorisation is no boundary
                            values.append(-math.inf)
                    store[name] = value
                    slack = best - threshold
                    if values[0] >= threshold and values[1] >= values[0] - slack:
                        boundary[label] = "0"
                        zeroed[name] = limit if name not in zeroed or limit is None else torch.minimum(zeroed[name], limit)
            limit_value = None
            if boundary and all(limit is not None for limit in zeroed.values()):
                originals = {name: pyro.param(name).detach().clone() for name in zeroed}
                for name, limit in zeroed.items():
                    store[name] = limit
                try:
                    limit_value = float(-self._negative_evidence(describe, y, controls))
                except (RuntimeError, ValueError):
                    limit_value = None
                for name, value in originals.items():
                    store[name] = value
                if limit_value is not None and not math.isfinite(limit_value):
                    limit_value = None
        return boundary, limit_value

    def _report_boundary(self, model, boundary: dict, limit: float | None) -> None:
        described = ", ".join(f"{label} -> {value}" for label, value in boundary.items())
        message = (
            f"Kalman type-II learning of {model!r} has no interior optimum: the evidence keeps rising as "
            f"{described}"
        )
        if limit is not None:
            message += f" (with it exactly 0 the log evidence is {limit:.6g})"
        message += (". Fix that matrix (e.g. transition_cov=0.0 for a constant level), give it a prior, or pass "
                    "on_boundary='clip' to keep the fit reached.")
        if self.on_boundary is OnBoundary.RAISE:
            raise HyperparameterBoundaryError(message, dict(boundary))
        warnings.warn(message, HyperparameterBoundaryWarning, stacklevel=3)

    # ------------------------------------------------------------ learning
    def _learn(self, describe, y, controls, form: StateSpaceForm, learned: list[str]) -> tuple[list, bool, int]:
        """``(loss trace, converged by the optimiser's own test, iterations)``."""
        if not learned or self.num_steps == 0:
            return [], True, 0
        if self.learning is Learning.EM:
            check_em_supported(form, learned)
            return self._em(describe, y, controls, learned)
        return self._gradient(describe, y, controls, learned)

    def _negative_evidence(self, describe, y, controls) -> torch.Tensor:
        form = describe(y, controls)
        return -log_likelihood(form.params, form.observations, self.method).sum()

    def _gradient(self, describe, y, controls, learned) -> tuple[list, bool, int]:
        store = pyro.get_param_store()
        unconstrained = [store.get_param(name).unconstrained() for name in learned]
        trace = []
        bar = tqdm(total=self.num_steps, disable=not self.progress, desc="Kalman type-II")

        def closure():
            optimiser.zero_grad()
            loss = self._negative_evidence(describe, y, controls)
            loss.backward()
            trace.append(loss.detach())
            bar.update(1)
            return loss

        if self.learning is Learning.LBFGS:
            # One call runs the whole L-BFGS optimisation (it reads scalars internally anyway).
            optimiser = torch.optim.LBFGS(
                unconstrained, lr=1.0 if self.lr is None else self.lr, max_iter=self.num_steps,
                max_eval=2 * self.num_steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                tolerance_change=self.tolerance, history_size=20,
            )
            optimiser.step(closure)
            state = optimiser.state[optimiser._params[0]]
            iterations = state.get("n_iter", 0)
            converged = iterations < self.num_steps
        else:
            optimiser = torch.optim.Adam(unconstrained, lr=0.05 if self.lr is None else self.lr)
            for _ in range(self.num_steps):
                optimiser.step(closure)
            converged = False
            iterations = self.num_steps
        bar.close()
        final = torch.stack(trace)
        if not bool(torch.isfinite(final).all()):
            raise DivergenceError("the negative log evidence became non-finite during type-II learning")
        return trace, converged, iterations

    def _em(self, describe, y, controls, learned) -> tuple[list, bool, int]:
        store = pyro.get_param_store()
        trace, converged, previous = [], False, None
        bar = tqdm(range(self.num_steps), disable=not self.progress, desc="Kalman EM")
        for _ in bar:
            with torch.no_grad():
                form = describe(y, controls)
                filtered, smoothed = filter_and_smooth(form.params, form.observations, self.method)
                loss = -filtered.log_likelihood.sum()
                trace.append(loss)
                value = float(loss)  # EM needs the evidence to decide when to stop
                if not math.isfinite(value):
                    raise DivergenceError(f"the negative log evidence became {value} during EM")
                if previous is not None and abs(previous - value) <= self.tolerance * (1.0 + abs(value)):
                    converged = True
                    break
                previous = value
                for name, value_ in em_update(form, filtered, smoothed, learned).items():
                    store[name] = value_
        return trace, converged, len(trace)
