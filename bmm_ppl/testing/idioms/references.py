"""Exact posterior moments for the idiom programs: conjugate closed forms and grid quadrature.

Every reference here is written from the densities by hand (``torch.distributions`` log-probabilities,
never a Pyro trace of the program itself), so that it does not share the Pyro semantics that the
engines under test must get right (masks, scales, plates, supports).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import pyro
import pyro.distributions
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from torch.distributions import biject_to


@dataclasses.dataclass(frozen=True)
class SiteMoments:
    """The exact posterior mean and standard deviation of one site, entry by entry.

    Args:
        mean: Tensor[*site_shape]. An entry whose ``mean`` is NaN is not checked (e.g. a direction
            the posterior leaves improper).
        sd: Tensor[*site_shape]. An entry with ``sd == 0`` is a constant and must be matched to ``1e-6``
            relative.
        discrete: the site takes discrete values (an enumerated assignment): its mean is a probability
            and its sd follows from it, so only the mean is checked.
    """

    mean: torch.Tensor
    sd: torch.Tensor
    discrete: bool = False

    def __post_init__(self):
        if self.mean.shape != self.sd.shape:
            raise ValueError(f"mean {tuple(self.mean.shape)} and sd {tuple(self.sd.shape)} shapes differ")


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


@dataclasses.dataclass
class IdiomProgram:
    """One small Pyro program, its data and its exact posterior.

    Args:
        name: a short identifier (``"mask_tensor"``).
        feature: the Pyro idiom it exercises (``"poutine.mask"``), one item of the suite's coverage list.
        model: the program, called as ``model(*args, **kwargs)``.
        args: its positional arguments.
        kwargs: its keyword arguments.
        reference: ``{site: SiteMoments}`` exact posterior moments of each checked site (latent,
            deterministic or enumerated-out discrete sites).
        log_evidence: the exact log evidence where the posterior is proper and it is cheap, else ``None``.
        step_scale: roughly the smallest posterior standard deviation in the unconstrained coordinates a
            sampler moves in: a hint for fixed-step samplers (SGLD's ``lr``), never used as a reference.
        refusable: why refusing this program by name is an acceptable answer (``None``: it must match).
    """

    name: str
    feature: str
    model: Callable
    args: tuple
    reference: dict[str, SiteMoments]
    kwargs: dict = dataclasses.field(default_factory=dict)
    log_evidence: float | None = None
    step_scale: float = 0.1
    refusable: str | None = None

    def to(self, dtype=torch.float64, device="cpu") -> "IdiomProgram":
        """This program with its floating data and reference moved to ``dtype`` on ``device`` (integer
        and boolean data keep their dtype)."""

        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device=device)

        reference = {name: dataclasses.replace(m, mean=move(m.mean), sd=move(m.sd)) for name, m in self.reference.items()}
        return dataclasses.replace(
            self, args=tuple(move(a) for a in self.args), kwargs={k: move(v) for k, v in self.kwargs.items()},
            reference=reference,
        )


def _initial_value(site):
    # Pyro's samplers start at init_to_uniform, which samples for the shape; ImproperUniform cannot sample.
    fn = site["fn"]
    if isinstance(fn, pyro.distributions.ImproperUniform):
        return biject_to(fn.support)(torch.zeros(fn.batch_shape + fn.event_shape))
    return fn.sample() if fn.support.is_discrete else init_to_uniform(site)


def trace_program(program: IdiomProgram) -> poutine.Trace:
    """One trace of the program, its latent sites started as Pyro's samplers start them (also for
    ``ImproperUniform``, which cannot be sampled), without touching the global param store."""
    with pyro.get_param_store().scope(), InitMessenger(_initial_value), warnings.catch_warnings():
        # torch 2.x's Wishart.sample warns "Singular sample detected" for every non-singular draw.
        warnings.filterwarnings("ignore", "Singular sample detected", UserWarning)
        return poutine.trace(program.model).get_trace(*program.args, **program.kwargs)


# ------------------------------------------------------------------------------------ closed forms
def normal_mean_posterior(prior_loc, prior_sd, y: torch.Tensor, noise_sd, weights: torch.Tensor | None = None):
    """``mu ~ N(prior_loc, prior_sd^2)``, ``y_i ~ N(mu, noise_sd^2)`` with each term's log-likelihood
    multiplied by ``weights[i]`` (1 by default; 0 drops a point).

    Args:
        y: Tensor[n].
        weights: Tensor[n] or ``None``.

    Returns:
        ``(SiteMoments of mu, log evidence or None)``: the evidence only for unit weights, where it is
        the normalised ``log N(y; prior_loc 1, noise_sd^2 I + prior_sd^2 1 1^T)``.

    Examples:
        >>> moments, log_z = normal_mean_posterior(0.0, 1.0, torch.tensor([1.0, 1.0], dtype=torch.float64), 1.0)
        >>> float(moments.mean), round(float(moments.sd) ** 2, 4)
        (0.6666666666666666, 0.3333)
    """
    w = torch.ones_like(y) if weights is None else weights.to(y)
    precision = 1.0 / prior_sd**2 + w.sum() / noise_sd**2
    mean = (prior_loc / prior_sd**2 + (w * y).sum() / noise_sd**2) / precision
    moments = SiteMoments(mean.reshape(()), precision.rsqrt().reshape(()))
    if weights is not None:
        return moments, None
    n = y.shape[0]
    covariance = noise_sd**2 * torch.eye(n, dtype=y.dtype, device=y.device) + prior_sd**2
    marginal = torch.distributions.MultivariateNormal(torch.full_like(y, float(prior_loc)), covariance)
    return moments, float(marginal.log_prob(y))


def beta_posterior(a, b, successes: torch.Tensor, trials: torch.Tensor) -> SiteMoments:
    """Moments of ``Beta(a + successes, b + trials - successes)`` (entry by entry, broadcast)."""
    alpha, beta = a + successes, b + trials - successes
    total = alpha + beta
    return SiteMoments(alpha / total, (alpha * beta / (total**2 * (total + 1))).sqrt())


def beta_binomial_log_evidence(a, b, successes: torch.Tensor, trials: torch.Tensor) -> float:
    """``log p(k)`` for ``k_i ~ Binomial(trials_i, p)`` iid given one ``p ~ Beta(a, b)``."""
    k, n = successes, trials
    log_binom = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    a_post, b_post = a + k.sum(), b + (n - k).sum()
    log_beta = lambda p, q: torch.lgamma(p) + torch.lgamma(q) - torch.lgamma(p + q)  # noqa: E731
    return float(log_binom.sum() + log_beta(a_post, b_post) - log_beta(_scalar(a, k), _scalar(b, k)))


def gamma_poisson_posterior(a, b, counts: torch.Tensor) -> tuple[SiteMoments, float]:
    """``rate ~ Gamma(a, b)`` (rate ``b``), ``counts_i ~ Poisson(rate)``: moments and log evidence."""
    a_post, b_post = a + counts.sum(), _scalar(b + counts.shape[0], counts)
    a_t, b_t = _scalar(a, counts), _scalar(b, counts)
    log_z = (
        -torch.lgamma(counts + 1).sum() + a_t * b_t.log() - torch.lgamma(a_t)
        + torch.lgamma(a_post) - a_post * torch.log(b_post)
    )
    return SiteMoments(a_post / b_post, a_post.sqrt() / b_post), float(log_z)


def dirichlet_posterior(concentration: torch.Tensor, counts: torch.Tensor) -> SiteMoments:
    """Marginal moments of ``Dirichlet(concentration + counts)``: each coordinate is a Beta."""
    alpha = concentration + counts
    total = alpha.sum()
    return SiteMoments(alpha / total, (alpha * (total - alpha) / (total**2 * (total + 1))).sqrt())


def dirichlet_categorical_log_evidence(concentration: torch.Tensor, counts: torch.Tensor) -> float:
    """``log p(x_1..x_N)`` of a categorical sequence with category ``counts`` under a Dirichlet prior."""
    a0, n = concentration.sum(), counts.sum()
    return float(
        torch.lgamma(a0) - torch.lgamma(a0 + n) + (torch.lgamma(concentration + counts) - torch.lgamma(concentration)).sum()
    )


def normal_gamma_posterior(loc, kappa, a, b, y: torch.Tensor) -> tuple[dict[str, SiteMoments], float]:
    """``tau ~ Gamma(a, b)``, ``mu | tau ~ N(loc, 1 / (kappa tau))``, ``y_i ~ N(mu, 1 / tau)``.

    The posterior is Normal-Gamma: ``tau ~ Gamma(a_n, b_n)`` and ``mu`` a Student t with ``2 a_n``
    degrees of freedom, location ``loc_n`` and squared scale ``b_n / (a_n kappa_n)``.

    Returns:
        ``({"mu": ..., "tau": ...}, log evidence)``.
    """
    n, ybar = y.shape[0], y.mean()
    kappa_n = kappa + n
    loc_n = (kappa * loc + n * ybar) / kappa_n
    a_n = _scalar(a + n / 2, y)
    b_n = b + 0.5 * ((y - ybar) ** 2).sum() + kappa * n * (ybar - loc) ** 2 / (2 * kappa_n)
    mu_var = b_n / (a_n * kappa_n) * (2 * a_n) / (2 * a_n - 2)
    a_t, b_t = _scalar(a, y), _scalar(b, y)
    log_z = (
        torch.lgamma(a_n) - torch.lgamma(a_t) + a_t * b_t.log() - a_n * b_n.log()
        + 0.5 * math.log(kappa / kappa_n) - 0.5 * n * math.log(2 * math.pi)
    )
    moments = {"mu": SiteMoments(loc_n.reshape(()), mu_var.sqrt().reshape(())),
               "tau": SiteMoments((a_n / b_n).reshape(()), (a_n.sqrt() / b_n).reshape(()))}
    return moments, float(log_z)


# -------------------------------------------------------------------------------------- quadrature
@dataclasses.dataclass(frozen=True)
class Grid:
    """A tensor-product midpoint grid over a box: ``points: Tensor[G, d]`` and the cell volume."""

    points: torch.Tensor
    log_cell_volume: float

    @classmethod
    def box(cls, bounds: list[tuple[float, float]], sizes: int | list[int], dtype=torch.float64, device="cpu") -> "Grid":
        """Midpoints of ``sizes[i]`` equal cells on each ``bounds[i] = (low, high)``.

        The midpoint rule is second-order for any smooth density and spectrally accurate where the
        density vanishes smoothly at the edges of the box; it never evaluates the edges themselves (an
        open support's boundary is safe).
        """
        sizes = [sizes] * len(bounds) if isinstance(sizes, int) else list(sizes)
        axes, log_volume = [], 0.0
        for (low, high), size in zip(bounds, sizes):
            width = (high - low) / size
            axes.append(low + width * (torch.arange(size, dtype=dtype, device=device) + 0.5))
            log_volume += math.log(width)
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(bounds))
        return cls(points, log_volume)


def quadrature_moments(
    log_joint: Callable[[torch.Tensor], torch.Tensor], grid: Grid, sites: dict[str, Callable[[torch.Tensor], torch.Tensor]],
) -> tuple[dict[str, SiteMoments], float]:
    """Posterior moments of functions of the grid's coordinates, by quadrature of the log joint.

    Args:
        log_joint: ``points: Tensor[G, d] -> Tensor[G]``, the log prior plus log likelihood (a density
            with respect to Lebesgue measure on the coordinates).
        grid: the :class:`Grid`, which must hold all but a negligible part of the posterior mass.
        sites: ``{site: points -> Tensor[G, *site_shape]}``, the site's value at each grid point.

    Returns:
        ``({site: SiteMoments}, log evidence)``, the evidence ``log int exp(log_joint)``.

    Examples:
        >>> grid = Grid.box([(-15.0, 17.0)], 2001)
        >>> prior = torch.distributions.Normal(torch.tensor(1.0, dtype=torch.float64), 2.0)
        >>> log_joint = lambda z: prior.log_prob(z[:, 0])
        >>> moments, log_z = quadrature_moments(log_joint, grid, {"z": lambda z: z[:, 0]})
        >>> round(float(moments["z"].mean), 6), round(float(moments["z"].sd), 6), abs(log_z) < 1e-6
        (1.0, 2.0, True)
    """
    log_density = log_joint(grid.points)
    log_z = torch.logsumexp(log_density, 0)
    weights = (log_density - log_z).exp()
    moments = {}
    for name, value_of in sites.items():
        values = value_of(grid.points)
        w = weights.reshape((-1,) + (1,) * (values.dim() - 1))
        mean = (w * values).sum(0)
        variance = (w * (values - mean) ** 2).sum(0)
        constant = (values == values[:1]).all(0)  # exactly 0, not a rounding error's 1e-8
        moments[name] = SiteMoments(mean, torch.where(constant, torch.zeros_like(variance), variance.clamp_min(0).sqrt()))
    return moments, float(log_z) + grid.log_cell_volume
