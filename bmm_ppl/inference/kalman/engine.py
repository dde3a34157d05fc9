"""The ``Kalman`` engine: exact evidence, smoothing posterior and type-II learning for linear-Gaussian SSMs."""

from __future__ import annotations

import math
from typing import Callable

import pyro
import torch
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError, UnsupportedModelError
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

    Example:
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


class Kalman:
    """Exact inference for linear-Gaussian state-space models (``LinearGaussianSSM`` and its builders).

    A conjugate linear regression with fixed ``alpha`` and ``beta`` (``BayesianLinearRegression``) is accepted
    too, as ``fit(model, x, y)``: its weights are a constant state, so it passes the conformance suite.

    The states are integrated by the Kalman filter, so ``log_evidence`` is exact; the posterior draws whole
    state trajectories from the RTS smoothing distribution. Arguments the model learns (``None``) are set
    by type-II: L-BFGS (default) or Adam on the exact evidence, or EM. The filtered, predicted and smoothed
    moments are on ``posterior.latent_distribution`` (a :class:`SmoothedStates`).

    Args:
        learning: ``"lbfgs"``, ``"adam"`` or ``"em"``.
        num_steps: optimiser iterations (L-BFGS iterations, Adam steps, EM iterations).
        lr: step size (L-BFGS's initial step, Adam's learning rate).
        tolerance: stop when an iteration changes the log evidence by less than ``tolerance * (1 + |log p|)``.
        method: ``"sequential"`` (Joseph-form loop), ``"parallel"`` (associative scan, O(log T) depth),
            ``"steady-state"`` (for the evidence while learning: steady-state gain and an FFT convolution,
            time-invariant matrices and complete data only; moments then come from the scan) or ``"auto"``
            (steady-state evidence from 512 steps where it applies, the scan from 32 steps, else the loop).
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar while learning.

    Example:
        >>> from bmm_ppl.models.state_space import local_level
        >>> y = torch.randn(50, 1, dtype=torch.float64).cumsum(0)
        >>> post = Kalman(progress=False).fit(local_level(initial_mean=0.0, initial_cov=10.0), y)
        >>> post.log_evidence.method.value, sorted(post.hyperparameters)
        ('exact', ['observation_cov', 'transition_cov'])
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
            loss_trace, converged = self._learn(describe, y, controls, form, learned)
            with torch.no_grad():
                form = describe(y, controls)
                filtered, smoothed = filter_and_smooth(form.params, form.observations, self.method)
                hyperparameters = {name: pyro.param(name).detach() for name in learned}
        total = filtered.log_likelihood.sum()
        if not bool(torch.isfinite(total)):
            raise DivergenceError(f"the Kalman log-likelihood is {float(total)}: the learned matrices diverged")
        diagnostics = {
            "learning": self.learning.value if learned else "none",
            "num_iterations": len(loss_trace),
            "converged": converged,
            "filter_method": "parallel" if _use_parallel(self.method, y) else "sequential",
            "series_log_evidence": filtered.log_likelihood.detach(),
        }
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

    # ------------------------------------------------------------ learning
    def _learn(self, describe, y, controls, form: StateSpaceForm, learned: list[str]) -> tuple[list, bool]:
        if not learned or self.num_steps == 0:
            return [], True
        if self.learning is Learning.EM:
            check_em_supported(form, learned)
            return self._em(describe, y, controls, learned)
        return self._gradient(describe, y, controls, learned)

    def _negative_evidence(self, describe, y, controls) -> torch.Tensor:
        form = describe(y, controls)
        return -log_likelihood(form.params, form.observations, self.method).sum()

    def _gradient(self, describe, y, controls, learned) -> tuple[list, bool]:
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
            converged = state.get("n_iter", 0) < self.num_steps
        else:
            optimiser = torch.optim.Adam(unconstrained, lr=0.05 if self.lr is None else self.lr)
            for _ in range(self.num_steps):
                optimiser.step(closure)
            converged = False
        bar.close()
        final = torch.stack(trace)
        if not bool(torch.isfinite(final).all()):
            raise DivergenceError("the negative log evidence became non-finite during type-II learning")
        return trace, converged

    def _em(self, describe, y, controls, learned) -> tuple[list, bool]:
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
        return trace, converged
