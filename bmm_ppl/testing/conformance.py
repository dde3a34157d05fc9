"""A conformance suite: every engine must recover exact answers on conjugate oracles.

An engine joins by one line in ``tests/test_conformance.py``; users run it on their own engines::

    from bmm_ppl.testing import conformance
    conformance.check_engine(MyEngine(num_samples=2000))

Tolerances come from Monte-Carlo standard errors: posterior means within ``4 * sd / sqrt(ESS)`` of the
exact ones (ESS from ArviZ for stored draws, the number of independent draws otherwise), posterior
standard deviations within ``sd_tolerance`` (relative), and the log evidence within what its method
promises (exact: 1e-6 nats; an estimate: ``evidence_tolerance`` nats plus 3 reported stderrs; a lower
bound: not above the exact value by more than 3 stderrs, and not below it by more than
``evidence_tolerance``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from bmm_ppl.inference.evidence import EvidenceMethod
from bmm_ppl.inference.exact.engine import Exact
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.models.features import polynomial_features
from bmm_ppl.models.linear_regression import BayesianLinearRegression


@dataclasses.dataclass
class Oracle:
    """A model, its data and its exact posterior."""

    name: str
    model: Callable
    args: tuple
    exact: Posterior


def _exact_oracle(name, model, x, y) -> Oracle:
    return Oracle(name, model, (x, y), Exact().fit(model, x, y))


def conjugate_gaussian_oracle(dtype=torch.float64, device="cpu") -> Oracle:
    """Unknown mean of Gaussian data: ``mu ~ N(0, 1 / 0.5)``, ``y_i ~ N(mu, 1 / 4)``, 20 points."""
    g = torch.Generator(device="cpu").manual_seed(11)
    y = (1.3 + 0.5 * torch.randn(20, generator=g, dtype=torch.float64, device="cpu")).to(dtype=dtype, device=device)
    x = torch.zeros(20, dtype=dtype, device=device)
    return _exact_oracle("conjugate Gaussian mean", BayesianLinearRegression(polynomial_features(0), 0.5, 4.0), x, y)


def linear_regression_oracle(dtype=torch.float64, device="cpu") -> Oracle:
    """Cubic Bayesian regression on 30 noisy points of ``sin(pi x)``, ``alpha = 1``, ``beta = 25``."""
    g = torch.Generator(device="cpu").manual_seed(12)
    x = torch.rand(30, generator=g, dtype=torch.float64, device="cpu") * 2 - 1
    y = torch.sin(math.pi * x) + 0.2 * torch.randn(30, generator=g, dtype=torch.float64, device="cpu")
    model = BayesianLinearRegression(polynomial_features(3), 1.0, 25.0)
    return _exact_oracle("cubic linear regression", model, x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device))


ORACLES: dict[str, Callable[..., Oracle]] = {
    "conjugate_gaussian": conjugate_gaussian_oracle,
    "linear_regression": linear_regression_oracle,
}
"""The reference problems of the conformance suite by name: each builds an :class:`Oracle` (its model, data
and exact posterior moments and evidence) for a ``dtype`` and ``device``."""


def effective_sample_sizes(draws: torch.Tensor) -> torch.Tensor:
    """ArviZ's bulk ESS of each entry of ``draws: Tensor[chain, draw, *shape]``: Tensor[prod(shape)] (CPU)."""
    import arviz as az

    flat = draws.detach().to("cpu", torch.float64).reshape(draws.shape[0], draws.shape[1], -1).numpy()
    ess = [float(az.ess(flat[:, :, j], method="bulk")) for j in range(flat.shape[-1])]
    return torch.tensor(ess, dtype=torch.float64, device="cpu")


def _effective_sample_sizes(posterior: Posterior, site: str, num_samples: int) -> torch.Tensor:
    if not posterior.has_stored_draws:
        return None
    return effective_sample_sizes(posterior.draws()[site])


def check_moments(posterior: Posterior, oracle: Oracle, num_samples: int = 4000, sd_tolerance: float = 0.1) -> dict:
    """Posterior means within 4 MCSE and standard deviations within ``sd_tolerance`` of the exact ones.

    Returns a report ``{site: {"max_mean_error_in_mcse": ..., "max_sd_relative_error": ...}}``;
    raises ``AssertionError`` naming the site when a check fails.
    """
    report = {}
    exact = oracle.exact.latent_distribution
    exact_mean = exact.mean
    exact_sd = exact.covariance_matrix.diagonal().sqrt()
    for site, mean in exact_mean.items():
        draws = posterior.samples(None if posterior.has_stored_draws else num_samples)[site].detach().to("cpu", torch.float64)
        flat = draws.reshape(draws.shape[0], -1)
        ess = _effective_sample_sizes(posterior, site, num_samples)
        if ess is None:
            ess = torch.full((flat.shape[1],), float(flat.shape[0]), dtype=torch.float64, device="cpu")
        sd = exact_sd.to("cpu", torch.float64)
        mcse = sd / ess.sqrt()
        mean_error = (flat.mean(0) - mean.to("cpu", torch.float64).reshape(-1)).abs() / mcse
        sd_error = (flat.std(0) / sd - 1).abs()
        report[site] = {
            "max_mean_error_in_mcse": float(mean_error.max()),
            "max_sd_relative_error": float(sd_error.max()),
            "min_ess": float(ess.min()),
        }
        assert float(mean_error.max()) < 4, f"{oracle.name}: mean of {site!r} off by {float(mean_error.max()):.2f} MCSE (> 4)"
        assert float(sd_error.max()) < sd_tolerance, (
            f"{oracle.name}: sd of {site!r} off by {100 * float(sd_error.max()):.1f}% (> {100 * sd_tolerance:.0f}%)"
        )
    return report


def check_log_evidence(posterior: Posterior, oracle: Oracle, evidence_tolerance: float = 0.1) -> float | None:
    """Checks the posterior's log evidence against the exact one as its method promises; returns the error."""
    if posterior.log_evidence is None:
        return None
    return log_evidence_error(posterior.log_evidence, oracle.exact.log_evidence.value, evidence_tolerance, oracle.name)


def log_evidence_error(evidence, exact: float, evidence_tolerance: float = 0.1, name: str = "model") -> float:
    """``evidence.value - exact``, after checking it as ``evidence.method`` promises (see the module
    docstring); raises ``AssertionError`` starting with ``name`` when the check fails."""
    error = evidence.value - exact
    stderr = evidence.stderr or 0.0
    if evidence.method is EvidenceMethod.EXACT:
        assert abs(error) < 1e-6, f"{name}: exact evidence off by {error:.3g} nats"
    elif evidence.is_lower_bound:
        assert error <= 3 * stderr + 1e-9, f"{name}: {evidence.method.value} bound exceeds the evidence by {error:.3g} nats"
        assert error > -evidence_tolerance - 3 * stderr, f"{name}: {evidence.method.value} bound is {-error:.3g} nats below"
    elif evidence.method is not EvidenceMethod.TRAINING_SPEED:
        assert abs(error) < evidence_tolerance + 3 * stderr, (
            f"{name}: {evidence.method.value} evidence off by {error:.3g} nats (stderr {stderr:.3g})"
        )
    return error


def check_engine(engine, oracles=("conjugate_gaussian", "linear_regression"), sd_tolerance: float = 0.1,
                 evidence_tolerance: float = 0.1, dtype=torch.float64) -> dict:
    """Fits every oracle with ``engine`` and checks moments and evidence. Returns the reports by oracle."""
    reports = {}
    for name in oracles:
        oracle = ORACLES[name](dtype=dtype)
        posterior = engine.fit(oracle.model, *oracle.args)
        reports[name] = {
            "moments": check_moments(posterior, oracle, sd_tolerance=sd_tolerance),
            "log_evidence_error": check_log_evidence(posterior, oracle, evidence_tolerance),
        }
    return reports
