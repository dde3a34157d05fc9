"""Invariant kernels: a base kernel averaged over transformations of its inputs.

``k_inv(x, x') = E_{α, α' ~ p(α|θ)} [ k(t(x; α), t(x'; α')) ]`` (van der Wilk et al., 2018). A GP with
this kernel is the GP ``f(x) = E_α g(t(x; α))`` for a base GP ``g ~ GP(0, k)``: its functions are
(approximately) invariant to the transformations, and the range ``θ`` of ``p(α|θ)`` is a kernel
hyperparameter that the marginal likelihood can learn.

How the expectation is computed (``estimator``)
------------------------------------------------
``p(α|θ)`` is uniform on the box ``[-θ, θ]`` and reparameterised, ``α = θ ⊙ (2u - 1)`` with ``u`` on the
unit cube, so ``θ`` gets pathwise gradients.

* ``"quadrature"`` — ``u`` on a midpoint grid (``num_samples`` points per parameter, tensor product).
  Deterministic, so the marginal likelihood is a deterministic, differentiable function of ``θ`` (use
  L-BFGS); the matrix is positive semi-definite; error ``O(S^-2)`` for smooth integrands. Best for one
  or two parameters (the grid has ``S^p`` points).
* ``"shared"`` — Monte-Carlo: one Latin-hypercube sample ``α_1..α_S`` per kernel call, used for *both*
  arguments: ``K̂ = S^-2 Σ_{s,s'} k(t(x;α_s), t(x';α_s'))``. ``K̂`` is the exact kernel of the GP
  ``S^-1 Σ_s g(t(x; α_s))``, so it is symmetric positive semi-definite and a Cholesky of it is safe —
  which the exact marginal likelihood and the variational strategy's ``K_uu`` need. It is *biased*: the
  ``s = s'`` terms apply the same ``α`` to both arguments (on the diagonal, ``k(t(x;α_s), t(x;α_s))``,
  the largest value ``k`` takes), so ``E[K̂] = k_inv + O(1/S)``, over-estimating the diagonal.
* ``"independent"`` — two independent samples, ``α`` for ``x1`` and ``β`` for ``x2``:
  ``K̂ = S^-2 Σ_{s,s'} k(t(x;α_s), t(x';β_s'))``. Every entry, the diagonal included, is unbiased,
  ``E[K̂] = k_inv``. The matrix is not symmetric, so it cannot go into a Cholesky: use it where a
  quantity is *linear* in the kernel and must be unbiased (estimating ``k_inv`` values, the diagonal
  of a variance, checking the other estimators).

Which objective uses which, and why:

* The exact marginal likelihood (``GPEvidence``, ``ExactMarginalLogLikelihood``) and GPyTorch's
  ``VariationalStrategy`` (``InvariantSVGP``) need a positive semi-definite matrix, so they use
  ``"quadrature"`` or ``"shared"``. No estimator makes ``log p(y | θ)`` unbiased anyway (it is nonlinear in
  ``K``): with ``"shared"`` the objective is the evidence of a randomly augmented GP, a stochastic
  objective whose optimum approaches the invariant model's as S grows. Reported evidences should come
  from the deterministic ``"quadrature"`` rule or a ``FiniteGroup``.
* Where the objective *can* be unbiased — the Gaussian-likelihood ELBO with inducing points in the base
  domain, linear in ``k_inv(x, x)`` and quadratic in ``E_α k(t(x;α), z)`` —
  :class:`~bmm_ppl.models.invariance.interdomain.InterDomainInvariantSVGP` uses independent draws for
  each factor of every product (and for the two sides of the diagonal), which makes its ELBO estimate
  unbiased (tested against a 1024-point reference; the same-draw version is off by ~15 standard errors).

Strict invariance: with a ``FiniteGroup`` the kernel is ``|G|^-2 Σ_{g,g'} k(g x, g' x')``, exactly
invariant to the group (the sum is only permuted), with no sampling.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from bmm_ppl.models.invariance._gpytorch import gpytorch, linear_operator

from bmm_ppl._enums import StrEnum
from bmm_ppl.models.invariance.transforms import FiniteGroup, Transform


class Estimator(StrEnum):
    """How :class:`InvariantKernel` computes the expectation over ``α`` (see the module docstring)."""

    QUADRATURE = "quadrature"
    SHARED = "shared"
    INDEPENDENT = "independent"


def _check_ranges(name: str, values: torch.Tensor, upper: torch.Tensor) -> None:
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"{name} must be non-negative half-widths of the uniform range, got {values.tolist()}")
    if (values > upper).any():
        raise ValueError(f"{name} must not exceed the transform's max_ranges {upper.tolist()}, got {values.tolist()}")


class InvariantKernel(gpytorch.kernels.Kernel):
    """A GPyTorch kernel averaging ``base_kernel`` over transformations of both inputs.

    Args:
        base_kernel: any GPyTorch kernel on the (transformed) inputs.
        transform: ``None`` (identity: this kernel *is* the base kernel), a
            :class:`~bmm_ppl.models.invariance.transforms.Transform` (weak invariance, averaged over
            ``α ~ Uniform[-θ, θ]``), or a :class:`~bmm_ppl.models.invariance.transforms.FiniteGroup`
            (strict invariance: a sum over the whole group).
        ranges: initial half-widths ``θ`` (one per transformation parameter, or one number for all).
            Default: a tenth of the transform's ``max_ranges`` (1.0 where unbounded).
        learn_ranges: ``True``: ``θ`` is a parameter constrained to ``(0, max_ranges)``; ``False``: a
            fixed buffer (``0`` allowed: no invariance; ``max_ranges``: full invariance).
        num_samples: points per parameter (``"quadrature"``) or samples (Monte-Carlo estimators).
        estimator: ``"quadrature"`` (default for one parameter), ``"shared"`` (default otherwise) or
            ``"independent"``; see the module docstring for what each is and when it is unbiased.

    Shapes: ``x1: Tensor[n, d]``, ``x2: Tensor[m, d]`` give ``Tensor[n, m]`` (``Tensor[n]`` with
    ``diag=True``). The cost is ``S^2`` base-kernel evaluations per entry (``|G|^2`` for a group).

    Examples:
        >>> from bmm_ppl.models.invariance import AffineImageTransform
        >>> kernel = InvariantKernel(gpytorch.kernels.RBFKernel(), AffineImageTransform((8, 8)), ranges=0.5)
        >>> x = torch.rand(4, 64)
        >>> kernel(x).to_dense().shape
        torch.Size([4, 4])
        >>> kernel.ranges
        tensor([0.5000], grad_fn=<...>)
    """

    has_lengthscale = False

    def __init__(
        self,
        base_kernel: gpytorch.kernels.Kernel,
        transform: Transform | FiniteGroup | None = None,
        *,
        ranges: float | Sequence[float] | torch.Tensor | None = None,
        learn_ranges: bool = True,
        num_samples: int = 16,
        estimator: str | Estimator | None = None,
    ):
        super().__init__()
        if not isinstance(base_kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"base_kernel must be a gpytorch.kernels.Kernel, got {type(base_kernel).__name__}")
        if transform is not None and not isinstance(transform, (Transform, FiniteGroup)):
            raise TypeError(
                f"transform must be None, a Transform or a FiniteGroup, got {type(transform).__name__} "
                f"(wrap a function as FunctionTransform(fn, parameter_names))"
            )
        self.base_kernel = base_kernel
        self.transform = transform
        self.num_samples = int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        self._fixed_unit = None
        if not isinstance(transform, Transform):
            if ranges is not None:
                raise ValueError("ranges apply to a continuous Transform; this kernel has none to set")
            self.estimator = None
            self.learn_ranges = False
            return
        p = transform.num_parameters
        default = Estimator.QUADRATURE if p == 1 else Estimator.SHARED
        self.estimator = default if estimator is None else Estimator.parse(estimator, "estimator")
        upper = torch.tensor(transform.max_ranges, dtype=torch.get_default_dtype(), device="cpu")
        if ranges is None:
            init = torch.where(torch.isfinite(upper), upper / 10, torch.ones_like(upper))
        else:
            init = torch.as_tensor(ranges, dtype=upper.dtype, device="cpu").reshape(-1)
            init = init.expand(p).clone() if init.numel() == 1 else init
        if init.shape != (p,):
            raise ValueError(f"ranges must hold {p} numbers ({transform.parameter_names}), got {tuple(init.shape)}")
        _check_ranges("ranges", init, upper)
        self.learn_ranges = bool(learn_ranges)
        if self.learn_ranges:
            if (init <= 0).any() or (init >= upper).any():
                raise ValueError(
                    f"learned ranges must start strictly inside (0, max_ranges={upper.tolist()}), got {init.tolist()}; "
                    f"fix them with learn_ranges=False to use the end points"
                )
            finite_upper = torch.where(torch.isfinite(upper), upper, torch.full_like(upper, 1e6))
            self.register_parameter("raw_ranges", torch.nn.Parameter(torch.zeros(p, dtype=upper.dtype, device="cpu")))
            self.register_constraint("raw_ranges", gpytorch.constraints.Interval(torch.zeros_like(upper), finite_upper))
            self.initialize(raw_ranges=self.raw_ranges_constraint.inverse_transform(init))
        else:
            self.register_buffer("fixed_ranges", init)

    # ------------------------------------------------------------------ ranges
    @property
    def ranges(self) -> torch.Tensor:
        """``θ``: Tensor[p] half-widths of the uniform distribution over the transformation parameters."""
        if not isinstance(self.transform, Transform):
            raise AttributeError("this kernel has no continuous transform, so no ranges")
        if self.learn_ranges:
            return self.raw_ranges_constraint.transform(self.raw_ranges)
        return self.fixed_ranges

    @ranges.setter
    def ranges(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.ranges.dtype, device=self.ranges.device).reshape(-1).expand_as(self.ranges)
        upper = torch.tensor(self.transform.max_ranges, dtype=value.dtype, device=value.device)
        _check_ranges("ranges", value, upper)
        if self.learn_ranges:
            self.initialize(raw_ranges=self.raw_ranges_constraint.inverse_transform(value))
        else:
            self.fixed_ranges = value.clone()

    # ------------------------------------------------------------- sampling
    def unit_points(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points ``u`` in ``[0, 1]^p`` (Tensor[S, p]) and their weights (Tensor[S]), on ``like``'s device."""
        p, size = self.transform.num_parameters, self.num_samples
        if self.estimator is Estimator.QUADRATURE:
            grid = (torch.arange(size, device=like.device, dtype=like.dtype) + 0.5) / size
            points = torch.cartesian_prod(*([grid] * p)).reshape(-1, p)
            return points, like.new_full((points.shape[0],), 1.0 / points.shape[0])
        # Latin hypercube: each parameter's S values fall one per stratum, in random order.
        strata = torch.rand(p, size, device=like.device, dtype=like.dtype).argsort(-1).to(like.dtype)
        points = ((strata + torch.rand(p, size, device=like.device, dtype=like.dtype)) / size).T
        return points, like.new_full((size,), 1.0 / size)

    @contextlib.contextmanager
    def fixed_samples(self, like: torch.Tensor):
        """Within this block every Monte-Carlo kernel call uses one draw of ``u`` (for both arguments and
        every block GPyTorch evaluates separately), so that e.g. train and test covariances agree.

        Examples:
            >>> from bmm_ppl.models.invariance import AffineImageTransform
            >>> k = InvariantKernel(gpytorch.kernels.RBFKernel(), AffineImageTransform((4, 4)), estimator="shared")
            >>> x = torch.rand(3, 16)
            >>> with k.fixed_samples(x):
            ...     bool(torch.equal(k(x).to_dense(), k(x).to_dense()))
            True
        """
        if not isinstance(self.transform, Transform) or self.estimator is Estimator.QUADRATURE:
            yield
            return
        previous = self._fixed_unit
        self._fixed_unit = (self.unit_points(like), self.unit_points(like))
        try:
            yield
        finally:
            self._fixed_unit = previous

    def _alphas(self, like: torch.Tensor):
        """Transformation parameters and weights for the first and second argument."""
        if self._fixed_unit is not None:
            first, second = self._fixed_unit
        else:
            first = self.unit_points(like)
            second = self.unit_points(like) if self.estimator is Estimator.INDEPENDENT else first
        if self.estimator is not Estimator.INDEPENDENT:
            second = first
        ranges = self.ranges.to(like.dtype)
        return (ranges * (2 * first[0] - 1), first[1]), (ranges * (2 * second[0] - 1), second[1])

    def orbit(self, x: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
        """The transformed copies of ``x: Tensor[n, d]``: ``Tensor[S, n, d]`` (the whole finite orbit when
        ``alpha`` is ``None``, else one copy per row of ``alpha: Tensor[S, p]``)."""
        moved = self.transform.orbit(x) if alpha is None else self.transform(x, alpha)
        copies = self.transform.order if alpha is None else alpha.shape[0]
        if tuple(moved.shape) != (copies,) + tuple(x.shape):
            raise ValueError(
                f"transform {type(self.transform).__name__} must map Tensor{list(x.shape)} to "
                f"Tensor{[copies] + list(x.shape)} (same input shape per copy), got Tensor{list(moved.shape)}"
            )
        return moved

    # -------------------------------------------------------------- kernel
    def base_covariance(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool, **params) -> torch.Tensor:
        """The base kernel's ``k(x1, x2)`` (its diagonal with ``diag``), on its active dimensions."""
        # The base kernel's own __call__ would select its active_dims; forward() skips that, so do it here.
        dims = self.base_kernel.active_dims
        if dims is not None:
            x1, x2 = x1.index_select(-1, dims.to(x1.device)), x2.index_select(-1, dims.to(x2.device))
        return linear_operator.to_dense(self.base_kernel.forward(x1, x2, diag=diag, **params))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError("InvariantKernel does not support last_dim_is_batch")
        if self.transform is None:
            return self.base_covariance(x1, x2, diag, **params)
        if x1.dim() != 2 or x2.dim() != 2:
            raise ValueError(
                f"InvariantKernel with a transform takes inputs Tensor[n, d], got {tuple(x1.shape)} and {tuple(x2.shape)}"
            )
        if isinstance(self.transform, FiniteGroup):
            orbit1, orbit2 = self.orbit(x1, None), self.orbit(x2, None)
            weight1 = x1.new_full((orbit1.shape[0],), 1.0 / orbit1.shape[0])
            weight2 = weight1
        else:
            (alpha1, weight1), (alpha2, weight2) = self._alphas(x1)
            orbit1, orbit2 = self.orbit(x1, alpha1), self.orbit(x2, alpha2)
        if diag:
            if x1.shape[0] != x2.shape[0]:
                raise ValueError("diag=True needs x1 and x2 of the same length")
            pairs = self.base_covariance(orbit1.transpose(0, 1), orbit2.transpose(0, 1), False, **params)  # [n, S1, S2]
            return torch.einsum("nab,a,b->n", pairs, weight1, weight2)
        copies1, n, d = orbit1.shape
        copies2, m, _ = orbit2.shape
        full = self.base_covariance(orbit1.reshape(-1, d), orbit2.reshape(-1, d), False, **params).reshape(copies1, n, copies2, m)
        return torch.einsum("anbm,a,b->nm", full, weight1, weight2)


def uniform_log_density(kernel: InvariantKernel, alpha: torch.Tensor) -> torch.Tensor:
    """``log p(α | θ)`` of the kernel's uniform distribution at ``alpha: Tensor[..., p]`` (``-inf`` outside).

    Examples:
        >>> from bmm_ppl.models.invariance import AffineImageTransform
        >>> k = InvariantKernel(gpytorch.kernels.RBFKernel(), AffineImageTransform((4, 4)), ranges=0.5)
        >>> round(float(uniform_log_density(k, torch.tensor([0.2])).exp().detach()), 4)
        1.0
    """
    ranges = kernel.ranges.to(alpha.dtype)
    inside = (alpha.abs() <= ranges).all(-1)
    log_volume = torch.log(2 * ranges).sum()
    return torch.where(inside, -log_volume, torch.full_like(log_volume, -math.inf).expand(inside.shape))
