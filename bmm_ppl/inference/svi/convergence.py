"""Whether an SVI fit converged, and whether it degenerated.

Two questions are asked of every fit. *Did it converge?* For stochastic gradient steps (Adam and the
like) the windowed mean of ``-ELBO`` over the last window is compared with the window before it: the
fit has converged when the drop is within two standard errors of the ELBO noise plus a relative
tolerance (:func:`loss_stationarity`). For the sample-average L-BFGS route the objective is
deterministic and its gradient says it directly (:func:`gradient_converged`). *Did it degenerate?*
Scales that collapse toward 0 or explode (by many orders of magnitude from where they started) and an
ELBO that falls far below the best value it reached are not a fit; :class:`DegenerationMonitor` raises
:class:`~bmm_ppl.inference.DivergenceError` for both.
"""

from __future__ import annotations

import dataclasses
import math

import pyro
import torch
from torch.distributions import constraints

from bmm_ppl.inference.errors import DivergenceError

STATIONARITY_Z = 2.0  # standard errors of the window-mean difference allowed as noise
STATIONARITY_RTOL = 1e-3  # ... plus this fraction of |loss| (floating-point and schedule effects)
# Fewest steps per window: with shorter windows a noisy ELBO (one particle) hides a trend that is still
# large (measured: 40 Adam steps at lr 0.01, windows of 10, passed the test at -ELBO 19.6 against an
# optimum near 10.4), so a run shorter than two such windows is reported as not tested, never converged.
MIN_STATIONARITY_WINDOW = 25
GRADIENT_TOL = 1e-3  # L-BFGS: largest |d(-ELBO)/d(unconstrained parameter)|, in nats per unit
SCALE_FACTOR_LIMIT = 1e9  # a scale moving this many-fold from its initial value has degenerated
LOSS_RISE_LIMIT = 10.0  # -ELBO rising this many times max(|best|, 1) above its best has degenerated



def _scale_kind(constraint) -> str | None:
    """``"value"`` for a positive constraint (lower bound 0), ``"diagonal"`` for a Cholesky factor or a
    positive-definite matrix (its diagonal holds the scales), else ``None``."""
    base = getattr(constraint, "base_constraint", constraint)
    if isinstance(base, (constraints._GreaterThan, constraints._GreaterThanEq)) and float(base.lower_bound) == 0.0:
        return "value"
    if isinstance(base, (constraints._LowerCholesky, constraints._PositiveDefinite)):
        return "diagonal"
    return None


def loss_stationarity(losses: torch.Tensor, window: int) -> dict:
    """Tests whether the loss has stopped improving: the last two windows' means against their noise.

    Args:
        losses: Tensor[T] of ``-ELBO`` per step (any device); ``T >= 2 * window`` for a test.
        window: steps per window.

    Returns:
        ``{"converged": bool, "window": int, "loss_change": float, "loss_noise": float, "tolerance": float}``:
        ``loss_change`` is the previous window's mean minus the last's (positive while still improving),
        ``loss_noise`` the standard error of that difference (steps treated as independent), and
        ``converged`` says ``loss_change <= 2 * loss_noise + 1e-3 * max(|mean|, 1)``. With fewer than
        ``2 * window`` steps, or windows shorter than ``MIN_STATIONARITY_WINDOW`` (25) steps, there is
        nothing to compare: ``converged`` is False and the other figures are NaN.

    Examples:
        >>> flat = 10 + torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> loss_stationarity(flat, 100)["converged"], loss_stationarity(torch.linspace(50, 10, 400), 100)["converged"]
        (True, False)
        >>> loss_stationarity(flat[:40], 10)["converged"]   # windows of 10 steps: too short to judge
        False
    """
    window = int(window)
    if window < MIN_STATIONARITY_WINDOW or losses.shape[0] < 2 * window:
        return {"converged": False, "window": window, "loss_change": math.nan, "loss_noise": math.nan, "tolerance": math.nan}
    last, previous = losses[-window:], losses[-2 * window : -window]
    stats = torch.stack([previous.mean(), last.mean(), previous.var(), last.var()]).tolist()
    change = stats[0] - stats[1]
    noise = math.sqrt((stats[2] + stats[3]) / window)
    tolerance = STATIONARITY_Z * noise + STATIONARITY_RTOL * max(abs(stats[1]), 1.0)
    return {
        "converged": bool(change <= tolerance), "window": window, "loss_change": change, "loss_noise": noise,
        "tolerance": tolerance,
    }


def gradient_converged(gradients, loss: float, dtype: torch.dtype = torch.float32) -> dict:
    """The gradient test of a deterministic objective: ``max |grad| <= 1e-3`` nats per unit of the
    unconstrained parameters, loosened to ``4 * sqrt(eps) * |loss|`` where that is larger (float32: about
    the gradient a line search can still resolve).

    Args:
        gradients: the gradient tensors (``None`` entries are zeros).
        loss: the objective's value.
        dtype: the precision to assume when ``gradients`` is empty (the tolerance alone is wanted).

    Returns:
        ``{"converged": bool, "grad_max": float, "grad_tol": float}``.

    Examples:
        >>> gradient_converged([torch.tensor([1e-5, -2e-4])], 35.0)["converged"]
        True
    """
    present = [g.detach().abs().max() for g in gradients if g is not None and g.numel()]
    grad_max = float(torch.stack(present).max()) if present else 0.0
    dtype = next((g.dtype for g in gradients if g is not None), dtype)
    # a line search resolves a gradient of about sqrt(2 * curvature * eps * |loss|), and the curvature
    # grows with |loss| (both with the data): in low precision the tolerance grows as sqrt(eps) * |loss|
    tol = max(GRADIENT_TOL, 4 * math.sqrt(torch.finfo(dtype).eps) * max(abs(loss), 1.0))
    return {"converged": bool(grad_max <= tol), "grad_max": grad_max, "grad_tol": tol}


@dataclasses.dataclass
class _Scale:
    name: str
    diagonal: bool  # the value is a (batch of) matrices whose diagonal holds the scales
    initial_log: torch.Tensor


def _log_scales(value: torch.Tensor, diagonal: bool) -> torch.Tensor:
    value = value.detach()
    if diagonal:
        value = value.diagonal(dim1=-2, dim2=-1)
    return value.abs().log()


class DegenerationMonitor:
    """Raises :class:`~bmm_ppl.inference.DivergenceError` when a fit degenerates.

    Watches the positive (scale) parameters of the param store among ``names`` — ``positive`` and
    ``softplus_positive`` values and the diagonals of Cholesky factors —, the positive latent sites as the
    guide draws them (``probe``), and the per-step losses.

    Args:
        names: param-store names of the parameters being fitted.
        advice: what to tell the user to change, appended to the error message.
        probe: ``() -> {site: Tensor}``, one guide draw of the latent sites with positive support.
    """

    def __init__(self, names, advice: str, probe=None):
        store = pyro.get_param_store()
        constraint_of = store.get_state()["constraints"]
        self.advice = advice
        self.scales: list[_Scale] = []
        for name in names:
            constraint = constraint_of.get(name)
            if constraint is None:
                continue
            kind = _scale_kind(constraint)
            if kind is not None:
                diagonal, value = kind == "diagonal", store[name]
                if diagonal and value.dim() < 2:
                    continue
                self.scales.append(_Scale(name, diagonal, _log_scales(value, diagonal)))
        self.best_median = math.inf
        self.best_spread = 0.0
        self.probe = probe
        self.initial_latents = {} if probe is None else {name: _log_scales(v, False) for name, v in probe().items()}

    def check_losses(self, window: torch.Tensor, last_step: int) -> None:
        """Checks one window of losses (a device tensor; synchronises once): finite, and not far above
        the best window median so far."""
        if window.numel() == 0:
            return
        finite = torch.isfinite(window)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0, 0])
            at = last_step - window.shape[0] + 1 + index
            raise DivergenceError(f"the ELBO diverged at step {at} (loss {float(window[index])}). {self.advice}")
        quantiles = torch.quantile(window, window.new_tensor([0.25, 0.5, 0.75])).tolist()
        median, spread = quantiles[1], quantiles[2] - quantiles[0]
        rise = median - self.best_median
        if rise > LOSS_RISE_LIMIT * max(abs(self.best_median), 1.0) + 10 * self.best_spread:
            raise DivergenceError(
                f"the ELBO degenerated by step {last_step}: its median over the last {window.shape[0]} steps is "
                f"{-median:.4g}, far below the best {-self.best_median:.4g} reached earlier. {self.advice}"
            )
        if median < self.best_median:
            self.best_median, self.best_spread = median, spread

    def check_scales(self, last_step: int) -> None:
        """Checks the scale parameters (synchronises once): finite and within ``1e9``-fold of their
        initial values."""
        store = pyro.get_param_store()
        limit = math.log(SCALE_FACTOR_LIMIT)
        if self.probe is not None:
            # a positive latent (a variance, a scale) drawn 1e9-fold from where the guide started
            for name, value in self.probe().items():
                moved = (_log_scales(value, False) - self.initial_latents[name]).reshape(-1)
                if moved.numel():
                    worst = float(moved.abs().nan_to_num(math.inf).max())
                    if not math.isfinite(worst) or worst > limit:
                        raise DivergenceError(
                            f"the fit degenerated by step {last_step}: the guide draws the positive latent site "
                            f"{name!r} at {float(value.reshape(-1)[int(moved.abs().nan_to_num(math.inf).argmax())]):.3g}, "
                            f"more than {SCALE_FACTOR_LIMIT:.0e}-fold from where it started. {self.advice}"
                        )
        for scale in self.scales:
            moved = (_log_scales(store[scale.name], scale.diagonal) - scale.initial_log).reshape(-1)
            if not moved.numel():
                continue
            index = int(moved.abs().nan_to_num(math.inf).argmax())
            worst = float(moved[index])
            if not math.isfinite(worst) or abs(worst) > limit:
                values = store[scale.name].detach()
                if scale.diagonal:
                    values = values.diagonal(dim1=-2, dim2=-1)
                raise DivergenceError(
                    f"the fit degenerated by step {last_step}: the scale parameter {scale.name!r} "
                    f"{'collapsed' if worst < 0 else 'exploded'} to {float(values.reshape(-1)[index]):.3g}, more "
                    f"than {SCALE_FACTOR_LIMIT:.0e}-fold from where it started. {self.advice}"
                )
