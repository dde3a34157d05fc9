"""Gaussian-process models with (invariant) GPyTorch kernels: as Pyro programs and as GPyTorch models.

* :class:`GPRegression` — a Pyro program ``model(x, y=None)`` with a GP prior, ``f ~ N(0, K(x, x))``
  (site ``"f"``) and ``y ~ N(f, σ²)`` (site ``"obs"``, plate ``"data"``). The kernel's GPyTorch parameters
  are ordinary ``pyro.param`` sites named after the module path with GPyTorch's ``raw_`` dropped
  (``"kernel.outputscale"``, ``"kernel.base_kernel.ranges"``), holding constrained values, so every engine — and ``compare`` — applies; :class:`~bmm_ppl.inference.exact.gp_evidence.GPEvidence`
  integrates ``f`` exactly and learns the kernel's parameters (the invariance ranges ``θ`` among them)
  by the exact evidence.
* :class:`InvariantExactGP` — a plain ``gpytorch.models.ExactGP`` for ``ExactMarginalLogLikelihood``.
* :class:`InvariantSVGP` — a ``gpytorch.models.ApproximateGP`` with inducing points, for
  ``VariationalELBO`` on larger data (inducing points in the domain of ``f``; one kernel draw per pass).
  For an *unbiased* Monte-Carlo ELBO with base-domain inducing points see
  :class:`~bmm_ppl.models.invariance.interdomain.InterDomainInvariantSVGP`.
"""

from __future__ import annotations


import pyro
import pyro.distributions as dist
from pyro.distributions import constraints
import torch
from torch.func import functional_call

from bmm_ppl.contracts.hyperparameters import Hyperprior, Learned, as_hyperparameter, hyperparameter_site
from bmm_ppl.contracts.gaussian_process import GaussianProcessForm
from bmm_ppl.models.invariance._gpytorch import gpytorch, linear_operator
from bmm_ppl.validation import check_tensor


def kernel_matrix(kernel, parameters: dict, x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """``K(x1, x2)`` of a GPyTorch ``kernel`` evaluated with ``parameters`` substituted for its own.

    The kernel is evaluated eagerly, in one call, so a Monte-Carlo invariant kernel uses one draw for
    the whole matrix.
    """
    with gpytorch.settings.lazily_evaluate_kernels(False):
        args = (x1,) if x2 is None else (x1, x2)
        return linear_operator.to_dense(functional_call(kernel, parameters, args))


class GPRegression:
    """A Pyro program with a Gaussian-process prior and Gaussian noise: ``model(x, y=None)``.

    Args:
        kernel: a GPyTorch kernel, e.g. ``ScaleKernel(InvariantKernel(RBFKernel(), transform))``. It is a
            template: its current parameter values initialise the ``pyro.param`` sites
            ``"kernel.<path>"`` (see :meth:`kernel_parameters`), which are what the program uses. Its
            buffers (constraint bounds, fixed ranges) are moved to the data's device when they differ.
        noise: observation noise variance ``σ²``: a number (fixed), ``None`` (learned, ``pyro.param``
            ``"noise"``) or a distribution (hyperprior).
        noise_init: initial value when ``noise`` is learned.
        jitter: added to the diagonal of ``K`` for a stable Cholesky.

    Shapes: ``x: Tensor[n, d]``; ``y: Tensor[n]`` or ``Tensor[n, C]`` (C outputs, independent given the
    kernel, e.g. one-hot class targets). Site ``"f"`` is ``Tensor[n]`` or ``Tensor[C, n]``.

    Examples:
        >>> import gpytorch
        >>> model = GPRegression(gpytorch.kernels.RBFKernel(), noise=0.1)
        >>> x = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(-1)
        >>> model(x, torch.sin(x[:, 0])).shape
        torch.Size([5])
    """

    def __init__(self, kernel, noise=None, noise_init: float = 0.1, jitter: float = 1e-6):
        if not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"kernel must be a gpytorch.kernels.Kernel, got {type(kernel).__name__}")
        self.kernel = kernel
        self.noise = as_hyperparameter("noise", Learned(float(noise_init)) if noise is None else noise)
        self.jitter = float(jitter)

    def kernel_parameters(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The kernel's raw GPyTorch parameters ``{module name: value}`` computed from ``pyro.param`` sites.

        A constrained GPyTorch parameter ``a.raw_b`` becomes the site ``"kernel.a.b"`` holding the
        *constrained* value (e.g. ``"kernel.base_kernel.ranges"``, ``"kernel.outputscale"``) with the
        matching Pyro constraint; unconstrained ones keep their name. Values live on ``like``'s device/dtype.
        """
        # GPyTorch keeps constraint bounds and fixed values in buffers: they follow the data's device (as
        # ``model.to(device)`` would); the parameters themselves come from the pyro.param sites.
        buffer = next(self.kernel.buffers(), None)
        if buffer is not None and buffer.device != like.device:
            self.kernel.to(like.device)
        raw = {}
        for name, value, constraint in self.kernel.named_parameters_and_constraints():
            initial = value.detach().to(device=like.device, dtype=like.dtype)
            if constraint is None:
                raw[name] = pyro.param(f"kernel.{name}", lambda v=initial: v.clone())
                continue
            prefix, _, last = name.rpartition(".")
            site = "kernel." + (prefix + "." if prefix else "") + last.removeprefix("raw_")
            lower = constraint.lower_bound.to(device=like.device, dtype=like.dtype)
            upper = constraint.upper_bound.to(device=like.device, dtype=like.dtype)
            if torch.isinf(upper).all():
                support = constraints.greater_than(lower) if bool((lower != 0).any()) else constraints.positive
            else:
                support = constraints.interval(lower, upper)
            constrained = pyro.param(site, lambda v=initial, c=constraint: c.transform(v).detach().clone(), constraint=support)
            raw[name] = constraint.inverse_transform(constrained)
        return raw

    def gp_form(self, x: torch.Tensor, y: torch.Tensor | None = None) -> GaussianProcessForm:
        """The prior covariance, noise and targets at the current ``pyro.param`` values (for exact engines)."""
        check_tensor("x", x)
        if x.dim() != 2:
            raise ValueError(f"x must be Tensor[n, d], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            # GPyTorch kernels fail deep inside on integers (and a fixed noise would take their dtype).
            raise ValueError(f"x must be real-valued inputs in a floating dtype, got {x.dtype}; pass x.to(torch.float64)")
        if y is not None:
            check_tensor("y", y)
            if not y.is_floating_point():
                raise ValueError(f"y must be real-valued targets in a floating dtype, got {y.dtype}; pass y.to(x.dtype)")
            if y.dim() not in (1, 2) or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must be Tensor[{x.shape[0]}] or Tensor[{x.shape[0]}, C] to match x, got {tuple(y.shape)}")
        covariance = kernel_matrix(self.kernel, self.kernel_parameters(x), x)
        covariance = covariance + self.jitter * torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
        noise = hyperparameter_site("noise", self.noise, like=x)
        return GaussianProcessForm(covariance, noise, y)

    def predictive(self, x: torch.Tensor, y: torch.Tensor, x_new: torch.Tensor, hyperparameters: dict):
        """Posterior predictive mean and variance of ``f`` at ``x_new`` given data ``(x, y)`` and learned
        ``hyperparameters`` (e.g. ``Posterior.hyperparameters``); touches no global state.

        The kernel is evaluated once on ``[x; x_new]``, so a Monte-Carlo kernel uses one draw throughout.

        Args:
            x: Tensor[n, d].
            y: Tensor[n] or Tensor[n, C].
            x_new: Tensor[m, d].

        Returns:
            ``(mean, variance)``: Tensor[m] (or Tensor[m, C]) and Tensor[m] (shared by the outputs).
        """
        n = x.shape[0]
        with pyro.get_param_store().scope(), pyro.poutine.substitute(data=hyperparameters):
            both = torch.cat([x, x_new])
            full = kernel_matrix(self.kernel, self.kernel_parameters(x), both)
            noise = hyperparameter_site("noise", self.noise, like=x)
        train = full[:n, :n] + (self.jitter + noise) * torch.eye(n, device=x.device, dtype=x.dtype)
        cross = full[n:, :n]
        factor = torch.linalg.cholesky(train)
        mean = cross @ torch.cholesky_solve(y.reshape(n, -1), factor)
        whitened = torch.linalg.solve_triangular(factor, cross.T, upper=False)
        variance = torch.diagonal(full[n:, n:]) - (whitened**2).sum(0)
        return (mean[:, 0] if y.dim() == 1 else mean), variance

    @property
    def has_hyperprior(self) -> bool:
        return isinstance(self.noise, Hyperprior)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, num_outputs: int | None = None) -> torch.Tensor:
        form = self.gp_form(x, y)
        outputs = num_outputs if y is None else (None if y.dim() == 1 else y.shape[1])
        n = x.shape[0]
        batch = () if outputs is None else (int(outputs),)
        prior = dist.MultivariateNormal(x.new_zeros(batch + (n,)), covariance_matrix=form.covariance)
        f = pyro.sample("f", prior.to_event(len(batch)))
        loc = f if outputs is None else f.transpose(-1, -2)
        scale = form.noise.sqrt()
        with pyro.plate("data", n, dim=-1):
            likelihood = dist.Normal(loc, scale)
            if outputs is not None:
                likelihood = likelihood.to_event(1)
            return pyro.sample("obs", likelihood, obs=y)

    def __repr__(self) -> str:
        return f"GPRegression(kernel={type(self.kernel).__name__}, noise={self.noise})"


class InvariantExactGP(gpytorch.models.ExactGP):
    """A plain GPyTorch exact GP: constant-zero mean and the given (invariant) kernel.

    Args:
        train_x: Tensor[n, d].
        train_y: Tensor[n].
        kernel: a GPyTorch kernel (e.g. ``ScaleKernel(InvariantKernel(...))``).
        likelihood: a ``gpytorch.likelihoods.GaussianLikelihood`` (a fresh one when ``None``).

    Examples:
        >>> x = torch.rand(6, 16, dtype=torch.float64); y = torch.randn(6, dtype=torch.float64)
        >>> from bmm_ppl.models.invariance import InvariantKernel, rot90_group
        >>> gp = InvariantExactGP(x, y, InvariantKernel(gpytorch.kernels.RBFKernel(), rot90_group((4, 4)))).double()
        >>> mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
        >>> mll(gp(x), y).shape
        torch.Size([])
    """

    def __init__(self, train_x, train_y, kernel, likelihood=None):
        likelihood = gpytorch.likelihoods.GaussianLikelihood() if likelihood is None else likelihood
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class InvariantSVGP(gpytorch.models.ApproximateGP):
    """A sparse variational GP (inducing points in input space) with an (invariant) kernel.

    The kernel is evaluated eagerly in one call per forward pass, so a Monte-Carlo invariant kernel uses
    one draw of ``α`` for ``K_uu``, ``K_uf`` and ``K_ff`` together (a positive semi-definite joint
    covariance); train it with ``gpytorch.mlls.VariationalELBO``, whose value times ``num_data`` is the
    total ELBO (see :func:`bmm_ppl.inference.exact.gp_evidence.total_elbo`).

    Args:
        inducing_points: Tensor[m, d] initial inducing inputs (learned).
        kernel: a GPyTorch kernel.

    Examples:
        >>> from bmm_ppl.models.invariance import InvariantKernel, AffineImageTransform
        >>> k = gpytorch.kernels.ScaleKernel(InvariantKernel(gpytorch.kernels.RBFKernel(), AffineImageTransform((4, 4))))
        >>> svgp = InvariantSVGP(torch.rand(5, 16), k)
        >>> svgp(torch.rand(7, 16)).mean.shape
        torch.Size([7])
    """

    def __init__(self, inducing_points: torch.Tensor, kernel):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing_points.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, distribution, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        with gpytorch.settings.lazily_evaluate_kernels(False):
            covariance = self.covar_module(x)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covariance)
