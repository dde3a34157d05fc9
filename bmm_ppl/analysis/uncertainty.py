"""Predictive uncertainty split into aleatoric and epistemic parts, for any Posterior or ensemble.

Classification: total predictive entropy ``H[E_θ p(y|x,θ)]`` = aleatoric ``E_θ H[p(y|x,θ)]`` (expected
entropy) + epistemic (the mutual information between ``y`` and ``θ``). Regression, by the law of total
variance: ``Var[y] = E_θ Var[y|θ]`` (aleatoric) + ``Var_θ E[y|θ]`` (epistemic).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
import torch.distributions as tdist

from bmm_ppl.inference.program.runs import inspect_model, run_under_draws


def decompose_classification(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy decomposition from per-draw class probabilities.

    Args:
        probs: Tensor[S, n, K] (S posterior draws or ensemble members; K classes; rows sum to 1), or
            Tensor[S, n] of Bernoulli probabilities of class 1.

    Returns:
        ``{"total", "aleatoric", "epistemic"}``, each Tensor[n] in nats; ``total = aleatoric + epistemic``.

    Examples:
        >>> p = torch.tensor([[0.9, 0.5], [0.1, 0.5]])  # two members disagree on point 0, agree on point 1
        >>> {k: [round(v, 3) for v in t.tolist()] for k, t in decompose_classification(p).items()}
        {'total': [0.693, 0.693], 'aleatoric': [0.325, 0.693], 'epistemic': [0.368, 0.0]}
    """
    if probs.dim() == 2:
        probs = torch.stack([1 - probs, probs], -1)
    if probs.dim() != 3:
        raise ValueError(f"probs must be Tensor[S, n, K] or Tensor[S, n], got shape {tuple(probs.shape)}")

    def entropy(p):
        return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)

    total = entropy(probs.mean(0))
    aleatoric = entropy(probs).mean(0)
    return {"total": total, "aleatoric": aleatoric, "epistemic": (total - aleatoric).clamp_min(0.0)}


def decompose_regression(means: torch.Tensor, variances: torch.Tensor) -> dict[str, torch.Tensor]:
    """Variance decomposition from per-draw predictive means and variances, each Tensor[S, n].

    Returns:
        ``{"total", "aleatoric", "epistemic"}``, each Tensor[n]; ``total = aleatoric + epistemic``.

    Examples:
        >>> d = decompose_regression(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
        >>> d["aleatoric"].item(), d["epistemic"].item(), d["total"].item()
        (1.0, 1.0, 2.0)
    """
    if means.shape != variances.shape or means.dim() != 2:
        raise ValueError(f"means and variances must both be Tensor[S, n], got {tuple(means.shape)} and {tuple(variances.shape)}")
    aleatoric = variances.mean(0)
    epistemic = means.var(0, unbiased=False)
    return {"total": aleatoric + epistemic, "aleatoric": aleatoric, "epistemic": epistemic}


def uncertainty_decomposition(posterior, *args, site: str = "obs", num_samples: int = 500, **kwargs) -> dict[str, torch.Tensor]:
    """Decomposes the predictive uncertainty of ``site`` at the model arguments ``args`` (e.g. new inputs).

    The model runs under ``num_samples`` posterior draws; the observation site's distribution gives the
    per-draw class probabilities (Bernoulli, Categorical: entropy decomposition) or mean and variance
    (anything else with ``mean``/``variance``: variance decomposition).

    Returns:
        ``{"total", "aleatoric", "epistemic"}``, each Tensor[n], plus ``"kind"``: ``"entropy"`` or ``"variance"``.
    """
    model = posterior.model_or_raise()
    draws = posterior.samples(num_samples)
    num = next(iter(draws.values())).shape[0]
    structure = inspect_model(model, args, kwargs, posterior.hyperparameters)
    if site not in structure.sites:
        raise KeyError(f"the model has no sample site {site!r}; its sites are {sorted(structure.sites)}")
    traces, vectorised = run_under_draws(model, args, kwargs, draws, posterior.hyperparameters, structure)
    info = structure.sites[site]
    n = max(1, math.prod(info.value_shape[: len(info.value_shape) - len(info.event_shape)]))
    fns = [_unwrap(t.nodes[site]["fn"]) for t in traces]
    base = fns[0]

    def per_draw(values, trailing=()):
        """Tensor[S, n, *trailing] from one vectorised value or S per-draw values."""
        if not vectorised:
            return torch.stack([v.reshape((n,) + trailing) for v in values])
        value, size = values[0], n * math.prod(trailing)
        if value.numel() == num * size:
            return value.reshape((num, n) + trailing)
        return value.reshape((n,) + trailing).expand((num, n) + trailing)  # does not depend on the draw

    if isinstance(base, tdist.Bernoulli):
        return {**decompose_classification(per_draw([f.probs for f in fns])), "kind": "entropy"}
    if isinstance(base, tdist.Categorical):
        k = fns[0].probs.shape[-1]
        return {**decompose_classification(per_draw([f.probs for f in fns], (k,))), "kind": "entropy"}
    means = per_draw([f.mean.expand(f.batch_shape) for f in fns])
    variances = per_draw([f.variance.expand(f.batch_shape) for f in fns])
    return {**decompose_regression(means, variances), "kind": "variance"}


def _unwrap(fn):
    while isinstance(fn, tdist.Independent):
        fn = fn.base_dist
    return fn


def plot_uncertainty(x: torch.Tensor, decomposition: dict, ax=None):
    """Stacked aleatoric and epistemic parts over 1-D inputs ``x: Tensor[n]``; returns the ``Figure``."""
    grid = x.detach().double().cpu().numpy()
    aleatoric = decomposition["aleatoric"].detach().double().cpu().numpy()
    epistemic = decomposition["epistemic"].detach().double().cpu().numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ax.stackplot(grid, aleatoric, epistemic, labels=["aleatoric", "epistemic"], alpha=0.7)
    unit = "entropy (nats)" if decomposition.get("kind") == "entropy" else "variance"
    ax.set_xlabel("x")
    ax.set_ylabel(f"predictive {unit}")
    ax.legend()
    return ax.figure
