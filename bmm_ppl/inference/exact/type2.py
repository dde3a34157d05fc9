"""Type-II maximum likelihood (evidence maximisation) of ``alpha`` and ``beta`` for linear-Gaussian models.

A coarse grid over ``(log alpha, log beta)`` finds the basin, L-BFGS on the exact log evidence refines
it, and a boundary test asks whether the evidence keeps rising as a learned hyperparameter is pushed
1000-fold further toward ``inf``: if it does, the supremum is a limit, not an optimum.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bmm_ppl.inference.exact.isotropic_prior import SpectralData

_GRID_HALF_WIDTH = 25.0  # natural-log units either side of the data-scaled centre
_GRID_POINTS = 101
_BOUNDARY_STEP = math.log(1e3)
_BOUNDARY_TOLERANCE = 1e-7  # nats: "no lower" allowing for round-off
# Converged: |grad log p(y)| per observation below this, in units of the log-hyperparameters. At a
# stationary point with curvature ~N a gradient of 1e-5 N leaves the evidence 1e-10 N nats from its top.
GRADIENT_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class TypeIIResult:
    """Outcome of evidence maximisation.

    Attributes:
        alpha: the prior precision reached (a float64 scalar on the data's device).
        beta: the noise precision reached (a float64 scalar on the data's device).
        log_evidence: the total log evidence there.
        boundary: ``{name: "+inf"}`` for hyperparameters whose supremum is a limit; empty when the
            optimum is interior.
        limit_log_evidence: the evidence of the limiting model (e.g. ``alpha -> inf``: no signal) where
            it is known in closed form, else ``None``.
        num_iterations: L-BFGS function evaluations.
        gradient_norm: Euclidean norm of the gradient of the log evidence over the learned
            ``(log alpha, log beta)`` where the optimiser stopped.
        converged: ``gradient_norm <= GRADIENT_TOLERANCE * max(1, N)`` (``N`` observations), the test
            every type-II engine applies to its own objective.
        iterations: L-BFGS iterations run (the cap is ``max_iter``).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    log_evidence: float
    boundary: dict
    limit_log_evidence: float | None
    num_iterations: int
    gradient_norm: float = 0.0
    converged: bool = True
    iterations: int = 0


class _Sufficient:
    """Sums over targets that share alpha and beta; everything below broadcasts over alpha, beta shapes."""

    def __init__(self, data: SpectralData):
        self.sq = data.singular.double().pow(2)
        projected = data.projected.double().reshape(data.singular.shape[0], -1)
        self.z2 = projected.pow(2).sum(1)
        self.resid = data.residual_sq.double().sum()
        self.y2 = self.z2.sum() + self.resid
        self.n = data.num_data
        self.m = projected.shape[1]
        self.r = data.singular.shape[0]

    def log_evidence(self, log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
        alpha, beta = log_alpha.exp(), log_beta.exp()
        a = alpha.unsqueeze(-1) + beta.unsqueeze(-1) * self.sq
        quadratic = (alpha.unsqueeze(-1) * beta.unsqueeze(-1) * self.z2 / a).sum(-1) + beta * self.resid
        log_det = self.m * (torch.log(a).sum(-1) - self.r * log_alpha - self.n * log_beta)
        return -0.5 * (self.m * self.n * math.log(2 * math.pi) + log_det + quadratic)

    def no_signal_log_evidence(self, log_beta: torch.Tensor | None) -> float:
        """The ``alpha -> inf`` limit, ``y ~ N(0, beta^-1 I)``, at the given or the best ``beta``."""
        nm = self.n * self.m
        if log_beta is None:
            log_beta = torch.log(nm / self.y2)
        beta = log_beta.exp()
        return float(-0.5 * (nm * math.log(2 * math.pi) - nm * log_beta + beta * self.y2))


def _lbfgs(objective, start: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int, int]:
    theta = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-11, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )
    evaluations = [0]

    def closure():
        optimiser.zero_grad()
        loss = objective(theta)
        loss.backward()
        evaluations[0] += 1
        return loss

    optimiser.step(closure)
    iterations = optimiser.state[theta].get("n_iter", 0)
    return theta.detach(), evaluations[0], iterations


def _gradient_norm(objective, theta: torch.Tensor) -> float:
    point = theta.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective(point), point)
    return float(gradient.norm())


def maximise_evidence(
    data: SpectralData,
    alpha: float | None,
    beta: float | None,
    max_iter: int = 500,
) -> TypeIIResult:
    """Maximises the exact evidence over whichever of ``alpha``, ``beta`` is ``None`` (learned).

    Args:
        data: the decomposed design and targets (targets in a batch share the hyperparameters).
        alpha: the prior precision: a fixed value, or ``None`` to learn.
        beta: the noise precision: a fixed value, or ``None`` to learn.

    Examples:
        >>> from bmm_ppl.inference.exact.isotropic_prior import spectral_data
        >>> x = torch.linspace(-1, 1, 40, dtype=torch.float64)
        >>> phi = torch.stack([x**0, x, x**2], -1); y = torch.sin(3 * x) + 0.1 * torch.cos(17 * x)
        >>> result = maximise_evidence(spectral_data(phi, y), alpha=None, beta=None)
        >>> result.boundary
        {}
    """
    stats = _Sufficient(data)
    device = stats.sq.device
    learn = [name for name, v in (("alpha", alpha), ("beta", beta)) if v is None]
    fixed_log = {
        name: torch.tensor(math.log(v), dtype=torch.float64, device=device)
        for name, v in (("alpha", alpha), ("beta", beta))
        if v is not None
    }

    def unpack(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = dict(fixed_log)
        for i, name in enumerate(learn):
            values[name] = theta[..., i]
        return values["alpha"], values["beta"]

    if not learn:
        log_a, log_b = unpack(torch.zeros(0, dtype=torch.float64, device=device))
        value = float(stats.log_evidence(log_a, log_b))
        return TypeIIResult(log_a.exp(), log_b.exp(), value, {}, None, 0)

    # Centre: noise precision from the target scale, prior precision putting signal on that scale.
    mean_sq = max(float(stats.y2) / (stats.n * stats.m), 1e-300)
    centre = {"beta": -math.log(mean_sq), "alpha": -math.log(mean_sq) + math.log(max(float(stats.sq.mean()), 1e-300))}
    axes = [
        torch.linspace(centre[n] - _GRID_HALF_WIDTH, centre[n] + _GRID_HALF_WIDTH, _GRID_POINTS, dtype=torch.float64, device=device)
        for n in learn
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(learn))
    values = stats.log_evidence(*unpack(grid))
    start = grid[torch.nan_to_num(values, nan=-math.inf).argmax()]

    def negative(theta):
        return -stats.log_evidence(*unpack(theta))

    theta, evaluations, iterations = _lbfgs(negative, start, max_iter)
    best = float(-negative(theta))
    gradient_norm = _gradient_norm(negative, theta)
    converged = gradient_norm <= GRADIENT_TOLERANCE * max(1, stats.n * stats.m)

    # Only "+inf" can be a supremum: as alpha -> 0 the evidence falls like (r/2) log alpha and as
    # beta -> 0 like (n/2) log beta, whereas alpha -> inf (no signal) and beta -> inf (interpolation,
    # n <= d) have finite limits that may exceed every interior value.
    boundary = {}
    for i, name in enumerate(learn):
        for direction, label in ((1.0, "+inf"),):
            pushed = theta.clone()
            pushed[i] += direction * _BOUNDARY_STEP
            others = [j for j in range(len(learn)) if j != i]
            if others:
                # Re-optimise the other learned hyperparameter at the pushed value (profile evidence).
                def profile(rest, pushed=pushed, others=others):
                    full = pushed.clone()
                    full[others] = rest
                    return negative(full)

                rest, _, _ = _lbfgs(profile, pushed[others], max_iter)
                pushed[others] = rest
            if float(-negative(pushed)) >= best - _BOUNDARY_TOLERANCE * max(1.0, abs(best)):
                boundary[name] = label
    limit = None
    if boundary.get("alpha") == "+inf":
        limit = stats.no_signal_log_evidence(None if beta is None else fixed_log["beta"])
    log_a, log_b = unpack(theta)
    return TypeIIResult(log_a.exp(), log_b.exp(), best, boundary, limit, evaluations, gradient_norm, converged, iterations)
