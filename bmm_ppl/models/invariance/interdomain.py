"""Sparse invariant GP with inducing points in the *base* domain and an unbiased ELBO estimate.

This is the construction of van der Wilk et al. (2018, §4). The invariant GP is ``f(x) = E_α g(t(x; α))``
for a base GP ``g ~ GP(0, k)``. Inducing variables are values of ``g`` at ``Z`` (not of ``f``), so

* ``p(u) = N(0, K_zz)`` uses the base kernel only — no Monte-Carlo in the prior or its Cholesky;
* ``c(x, z) = cov(f(x), g(z)) = E_α k(t(x; α), z)`` is a *single* expectation, linear in the samples;
* for a Gaussian likelihood the expected log-likelihood is a quadratic in ``c`` and linear in
  ``k_inv(x, x)``: ``E_q (y - f)^2 = y^2 - 2 y bᵀμ + bᵀ (μμᵀ + Σ - I) b + k_inv(x, x)`` with
  ``b = L_zz⁻¹ c`` (whitened ``q(v) = N(μ, Σ)``, ``u = L_zz v``).

Unbiasedness needs independent samples exactly where products appear: the quadratic form uses two
independent estimates, ``b¹ᵀ M b²`` (``E[b¹ᵀ M b²] = bᵀ M b``), the linear term their mean, and
``k_inv(x, x)`` the two-sample estimator ``S^-2 Σ k(t(x;α_s), t(x;β_s'))`` — never the same ``α`` on
both sides of the diagonal, which would over-estimate it. The resulting ELBO estimate is unbiased for
the ELBO of the *exact* invariant kernel (with Monte-Carlo ``estimator``), and works on minibatches.
With ``estimator="quadrature"`` the two "independent" estimates coincide and the ELBO is the exact
(deterministic) ELBO of the quadrature kernel, a lower bound on that GP's log evidence.
"""

from __future__ import annotations

import math

import torch

from bmm_ppl.models.invariance._gpytorch import gpytorch
from bmm_ppl.models.invariance.kernels import InvariantKernel
from bmm_ppl.models.invariance.transforms import Transform


class InterDomainInvariantSVGP(torch.nn.Module):
    """Sparse variational invariant GP regression with base-domain inducing points (unbiased ELBO).

    Args:
        kernel: an :class:`InvariantKernel` with a continuous ``Transform``; its ``base_kernel`` (e.g.
            ``ScaleKernel(RBFKernel())``) is the kernel of ``g`` and its ranges are learned.
        inducing_points: Tensor[m, d] initial inducing inputs (in the base domain; learned).
        noise: initial Gaussian noise variance (learned, positive).
        jitter: added to ``K_zz``.

    Examples:
        >>> from bmm_ppl.models.invariance import AffineImageTransform
        >>> k = InvariantKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), AffineImageTransform((4, 4)),
        ...                     estimator="shared", num_samples=3)
        >>> model = InterDomainInvariantSVGP(k, torch.rand(5, 16))
        >>> model.elbo(torch.rand(8, 16), torch.randn(8)).shape
        torch.Size([])
    """

    def __init__(self, kernel: InvariantKernel, inducing_points: torch.Tensor, noise: float = 0.1, jitter: float = 1e-6):
        super().__init__()
        if not isinstance(kernel, InvariantKernel) or not isinstance(kernel.transform, Transform):
            raise TypeError("kernel must be an InvariantKernel with a continuous Transform (ranges to learn)")
        if inducing_points.dim() != 2:
            raise ValueError(f"inducing_points must be Tensor[m, d], got shape {tuple(inducing_points.shape)}")
        if not noise > 0:
            raise ValueError(f"noise must be positive, got {noise}")
        m = inducing_points.shape[0]
        like = inducing_points
        self.kernel = kernel
        self.inducing_points = torch.nn.Parameter(inducing_points.detach().clone())
        self.variational_mean = torch.nn.Parameter(like.new_zeros(m))
        self.variational_scale_raw = torch.nn.Parameter(like.new_zeros(m, m))  # lower-triangular, log diagonal
        self.raw_noise = torch.nn.Parameter(torch.log(torch.expm1(like.new_tensor(float(noise)))))
        self.jitter = float(jitter)

    @property
    def noise(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.raw_noise)

    def variational_scale(self) -> torch.Tensor:
        raw = self.variational_scale_raw
        return torch.tril(raw, -1) + torch.diag_embed(torch.exp(torch.diagonal(raw)))

    def _base(self, x1, x2, diag=False):
        return self.kernel.base_covariance(x1, x2, diag)

    def _inducing_factor(self) -> torch.Tensor:
        z = self.inducing_points
        kzz = self._base(z, z) + self.jitter * torch.eye(z.shape[0], device=z.device, dtype=z.dtype)
        return torch.linalg.cholesky(kzz)

    def _draw(self, x: torch.Tensor):
        """One draw of transformed copies of ``x`` and their weights: (Tensor[S, n, d], Tensor[S])."""
        points, weights = self.kernel.unit_points(x)
        alpha = self.kernel.ranges.to(x.dtype) * (2 * points - 1)
        return self.kernel.orbit(x, alpha), weights

    def _whitened_cross(self, orbit, weights, factor) -> torch.Tensor:
        """``b = L_zz⁻¹ c(x, Z)ᵀ``: Tensor[m, n], ``c = Σ_s w_s k(t(x; α_s), Z)``."""
        copies, n, d = orbit.shape
        cross = self._base(orbit.reshape(-1, d), self.inducing_points).reshape(copies, n, -1)
        cross = torch.einsum("snm,s->nm", cross, weights)
        return torch.linalg.solve_triangular(factor, cross.T, upper=False)

    def elbo(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """Unbiased estimate of the total ELBO (``num_data / batch`` scales a minibatch ``x: Tensor[B, d]``,
        ``y: Tensor[B]``) for Gaussian regression; a lower bound on ``log p(y)`` in expectation."""
        if y.shape != x.shape[:1]:
            raise ValueError(f"y must be Tensor[{x.shape[0]}] to match x, got {tuple(y.shape)}")
        num_data = x.shape[0] if num_data is None else int(num_data)
        factor = self._inducing_factor()
        (orbit1, w1), (orbit2, w2) = self._draw(x), self._draw(x)
        b1, b2 = self._whitened_cross(orbit1, w1, factor), self._whitened_cross(orbit2, w2, factor)
        mean, scale = self.variational_mean, self.variational_scale()
        middle = torch.outer(mean, mean) + scale @ scale.T - torch.eye(mean.shape[0], device=x.device, dtype=x.dtype)
        quadratic = (b1 * (middle @ b2)).sum(0)  # b¹ᵀ M b² per point
        linear = 0.5 * (b1 + b2).T @ mean
        pairs = self._base(orbit1.transpose(0, 1), orbit2.transpose(0, 1))  # [n, S, S], independent α, β
        prior_variance = torch.einsum("nab,a,b->n", pairs, w1, w2)
        squared_error = y**2 - 2 * y * linear + quadratic + prior_variance
        noise = self.noise
        expected = -0.5 * math.log(2 * math.pi) - 0.5 * torch.log(noise) - 0.5 * squared_error / noise
        kl = 0.5 * ((scale**2).sum() + (mean**2).sum() - mean.shape[0]) - torch.log(torch.diagonal(scale)).sum()
        return expected.sum() * (num_data / x.shape[0]) - kl

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean and variance of ``f`` at ``x: Tensor[n, d]`` (one kernel draw; use the
        quadrature estimator or many samples for a smooth prediction)."""
        factor = self._inducing_factor()
        (orbit1, w1), (orbit2, w2) = self._draw(x), self._draw(x)
        b = self._whitened_cross(orbit1, w1, factor)
        scale = self.variational_scale()
        pairs = self._base(orbit1.transpose(0, 1), orbit2.transpose(0, 1))
        prior_variance = torch.einsum("nab,a,b->n", pairs, w1, w2)
        variance = prior_variance + ((scale.T @ b) ** 2).sum(0) - (b**2).sum(0)
        return b.T @ self.variational_mean, variance
