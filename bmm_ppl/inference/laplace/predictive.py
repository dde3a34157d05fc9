"""The linearised (GLM) predictive of a Laplace posterior (Immer, Korzepa & Bauer 2021; MacKay 1992):
the network is replaced by its first-order expansion at the mode, ``f(x; theta) ~= f(x; theta*) +
J(x) (theta - theta*)``, so that under ``theta ~ N(theta*, Sigma)`` the output at each input is Gaussian,
``N(f(x; theta*), J(x) Sigma J(x)^T)``, with no network run at sampled weights.
"""

from __future__ import annotations

import math

import torch

from bmm_ppl.inference.latents import split_sites
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.program.outputs import output_at


def linearised_predictive(posterior: Posterior, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The output's mean and covariance at new inputs under the linearised network.

    Args:
        posterior: a :class:`~bmm_ppl.inference.laplace.Laplace` fit with a GGN curvature (it names its
            output site in ``diagnostics["output"]``).
        *args: the model's positional arguments at the new inputs (observations may be left out).
        **kwargs: the model's keyword arguments at the new inputs (observations may be left out).

    Returns:
        ``(mean, covariance)``: Tensor[n, K] and Tensor[n, K, K] per point (``K`` outputs per point;
        Tensor[n] and Tensor[n] for a scalar output). For a Gaussian likelihood the predictive of ``y``
        adds the noise variance; for classification see :func:`probit_probabilities`.

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> from bmm_ppl.inference import Laplace
        >>> def model(x, y=None):
        ...     w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Normal(pyro.deterministic("mean", x @ w), 0.5), obs=y)
        >>> x = torch.randn(20, 2, dtype=torch.float64)
        >>> post = Laplace(progress=False).fit(model, x, x.sum(-1))
        >>> mean, variance = linearised_predictive(post, x[:3])
        >>> mean.shape, variance.shape
        (torch.Size([3]), torch.Size([3]))
    """
    output = posterior.diagnostics.get("output")
    if not output:
        raise ValueError("the linearised predictive needs a Laplace posterior with a GGN output site "
                         "(diagnostics['output']); this one has none")
    latents = posterior.latent_distribution
    shapes = latents.site_shapes
    hyperparameters = posterior.hyperparameters or {}
    mode = latents.loc.detach()

    def output_of(flat):
        return output_at(posterior.model, split_sites(flat, shapes), hyperparameters, args, kwargs, output)

    mean = output_of(mode).detach()
    scalar = mean.dim() == 1
    n = mean.shape[0]
    jacobian = torch.func.jacrev(lambda flat: output_of(flat).reshape(n, -1))(mode)  # [n, K, P]
    covariance = latents.output_covariance(jacobian)
    if scalar:
        return mean, covariance[:, 0, 0]
    return mean, covariance


def probit_probabilities(mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Class probabilities of Gaussian logits by the (extended) probit approximation,
    ``softmax(mean_k / sqrt(1 + pi/8 var_k))`` (MacKay 1992; Gibbs 1997): Tensor[n, K] from
    ``mean`` Tensor[n, K] and ``covariance`` Tensor[n, K, K].

    Examples:
        >>> probit_probabilities(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2, 2)).round(decimals=3)
        tensor([[0.8810, 0.1190]])
    """
    variance = covariance.diagonal(dim1=-2, dim2=-1)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variance), dim=-1)


__all__ = ["linearised_predictive", "probit_probabilities"]
