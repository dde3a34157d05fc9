"""Log evidence from posterior draws by bridge sampling (Meng & Wong 1996; Gronau et al. 2017).

The optimal bridge function links the unnormalised posterior ``q(z) = p(data, T(z)) |det dT/dz|`` (in the
sampler's unconstrained space) with a Gaussian proposal ``g`` fitted to the first half of each chain; the
second half and as many proposal draws enter Meng & Wong's fixed-point iteration. The standard error is
the relative-MSE approximation of Frühwirth-Schnatter (2004), with the autocorrelation of the posterior
draws taken into account through their effective sample size.
"""

from __future__ import annotations

import math

import pyro
import torch

from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.program.potential import ModelPotential


def _effective_size(values: torch.Tensor) -> float:
    """ArviZ bulk ESS of ``values: Tensor[chain, draw]``."""
    import arviz as az

    data = az.convert_to_dataset({"v": values.detach().cpu().double().numpy()})
    ess = float(az.ess(data, method="bulk")["v"].values)
    return ess if math.isfinite(ess) else float(values.numel())


def bridge_log_evidence(
    log_q_posterior: torch.Tensor,
    log_g_posterior: torch.Tensor,
    log_q_proposal: torch.Tensor,
    log_g_proposal: torch.Tensor,
    effective_posterior_size: float | None = None,
    max_iterations: int = 1000,
    tolerance: float = 1e-10,
) -> tuple[float, float, int]:
    """Meng & Wong's iterative bridge estimate of ``log ∫ q``, from log densities at both sets of draws.

    Args:
        log_q_posterior: Tensor[chain, draw], the unnormalised target at the posterior draws.
        log_g_posterior: Tensor[chain, draw], the normalised proposal at the posterior draws.
        log_q_proposal: Tensor[N2], the unnormalised target at the proposal draws.
        log_g_proposal: Tensor[N2], the normalised proposal at the proposal draws.
        effective_posterior_size: the posterior draws' effective size for the weights ``s1, s2`` (``None``:
            the ArviZ ESS of ``log_q_posterior - log_g_posterior``).

    Returns:
        ``(log_evidence, stderr, iterations)``; ``stderr`` approximates the sd of the log estimate.

    Examples:
        >>> g = torch.distributions.Normal(0.0, 1.0)
        >>> post, prop = g.sample((2, 500)).double(), g.sample((1000,)).double()
        >>> q = lambda z: g.log_prob(z) + 3.0  # normaliser e^3
        >>> value, stderr, _ = bridge_log_evidence(q(post), g.log_prob(post), q(prop), g.log_prob(prop))
        >>> round(value, 6), stderr < 1e-6
        (3.0, True)
    """
    l1 = (log_q_posterior - log_g_posterior).double()
    l2 = (log_q_proposal - log_g_proposal).double()
    n1, n2 = l1.numel(), l2.numel()
    if effective_posterior_size is None:
        effective_posterior_size = _effective_size(torch.nan_to_num(l1, nan=0.0, neginf=-1e300))
    n1_eff = min(float(effective_posterior_size), float(n1))
    s1, s2 = n1_eff / (n1_eff + n2), n2 / (n1_eff + n2)
    flat1 = l1.reshape(-1)
    shift = flat1.median()  # keeps the exponentials near 1
    e1, e2 = torch.exp(flat1 - shift), torch.exp(l2 - shift)
    log_r = torch.zeros((), dtype=torch.float64, device=l1.device)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        r = torch.exp(log_r)
        numerator = torch.mean(e2 / (s1 * e2 + s2 * r))
        denominator = torch.mean(1.0 / (s1 * e1 + s2 * r))
        new_log_r = torch.log(numerator) - torch.log(denominator)
        if not bool(torch.isfinite(new_log_r)):
            raise FloatingPointError("bridge sampling iteration produced a non-finite estimate")
        converged = bool(torch.abs(new_log_r - log_r) < tolerance)
        log_r = new_log_r
        if converged:
            break
    log_evidence = log_r + shift

    # Frühwirth-Schnatter (2004) relative MSE, with the unadjusted sizes as in Gronau et al.'s error measure.
    t1, t2 = n1 / (n1 + n2), n2 / (n1 + n2)
    f1 = 1.0 / (t1 + t2 * torch.exp(log_evidence - l2))  # at proposal draws
    f2 = 1.0 / (t1 * torch.exp(l1 - log_evidence) + t2)  # at posterior draws, Tensor[chain, draw]
    term1 = f1.var() / f1.mean() ** 2 / n2
    tau = n1 / _effective_size(f2)  # integrated autocorrelation time of f2
    term2 = tau * f2.var() / f2.mean() ** 2 / n1
    stderr = float(torch.sqrt(term1 + term2))
    return float(log_evidence), stderr, iterations


def bridge_sampling(posterior, max_iterations: int = 1000, tolerance: float = 1e-10, seed: int | None = 0) -> Evidence:
    """The log evidence of a sampled posterior's model by bridge sampling.

    Args:
        posterior: a :class:`~bmm_ppl.inference.Posterior` with stored draws of every latent site (NUTS,
            HMC, SGLD), at least 4 per chain, and its model and data.
        max_iterations: the iteration cap of the fixed-point iteration on the log scale.
        tolerance: the convergence tolerance of that iteration (on the log scale).
        seed: seeds the proposal draws (``None``: the global generator).

    Returns:
        ``Evidence(value, stderr, method="bridge")``.

    Examples:
        >>> import pyro.distributions as dist
        >>> from bmm_ppl.inference.hmc import NUTS
        >>> def model(y):
        ...     m = pyro.sample("m", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(m, 1.0), obs=y)
        >>> post = NUTS(num_samples=1000, warmup_steps=200, progress=False).fit(model, torch.zeros(4, dtype=torch.float64))
        >>> bridge_sampling(post).method
        <EvidenceMethod.BRIDGE: 'bridge'>
    """
    if not getattr(posterior, "has_stored_draws", False):
        raise ValueError("bridge_sampling needs a posterior with stored draws (a sampling engine's)")
    if posterior.model is None:
        raise ValueError("bridge_sampling needs the posterior's model: this one was loaded or sampled without one")
    with pyro.get_param_store().scope():
        potential = ModelPotential(posterior.model, posterior.args, posterior.kwargs)
        draws = posterior.draws()
        missing = [site.name for site in potential.sites if site.name not in draws]
        if missing:
            raise ValueError(f"the posterior has no draws of the latent sites {missing}")
        chains, per_chain = draws[potential.sites[0].name].shape[:2]
        if per_chain < 4:
            raise ValueError(f"bridge sampling needs at least 4 draws per chain, got {per_chain}")
        flat = potential.unconstrain({s.name: draws[s.name].reshape((-1,) + s.value_shape) for s in potential.sites})
        flat = flat.reshape(chains, per_chain, potential.dim).double()
        half = per_chain // 2
        fit_part, bridge_part = flat[:, :half].reshape(-1, potential.dim), flat[:, half:]
        mean = fit_part.mean(0)
        centred = fit_part - mean
        covariance = centred.T @ centred / max(fit_part.shape[0] - 1, 1)
        covariance = covariance + 1e-10 * torch.eye(potential.dim, dtype=covariance.dtype, device=covariance.device)
        proposal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        num_proposals = bridge_part.shape[0] * bridge_part.shape[1]
        generator = None if seed is None else torch.Generator(device=mean.device).manual_seed(seed)
        noise = torch.randn(num_proposals, potential.dim, generator=generator, dtype=mean.dtype, device=mean.device)
        proposal_draws = mean + noise @ proposal.scale_tril.T
        dtype = potential.dtype
        with torch.no_grad():
            log_q_post = -potential(bridge_part.reshape(-1, potential.dim).to(dtype)).double().reshape(chains, -1)
            log_q_prop = -potential(proposal_draws.to(dtype)).double()
        log_g_post = proposal.log_prob(bridge_part)
        log_g_prop = proposal.log_prob(proposal_draws)
        log_q_prop = torch.nan_to_num(log_q_prop, nan=-math.inf)
    value, stderr, _ = bridge_log_evidence(
        log_q_post, log_g_post, log_q_prop, log_g_prop, max_iterations=max_iterations, tolerance=tolerance
    )
    return Evidence(value, stderr, "bridge")
