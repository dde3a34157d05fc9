"""Stochastic-gradient MCMC updates over a batch of chains: SGLD, preconditioned SGLD and SGHMC.

Each update is a pure function of ``(z: Tensor[C, D], grad: Tensor[C, D], state, step_size, temperature)``
returning ``(z, state)``, where ``grad`` is a (minibatch) estimate of ``dU/dz`` for the potential
``U = -log p(data, z)`` and ``temperature`` scales the injected noise (1: the posterior). The returned
``z`` is always a new tensor (the engine keeps references to earlier ones as draws); the arithmetic is
written with few, fused operations because it runs once per step.

Example:
    >>> z, grad = torch.zeros(2, 3), torch.ones(2, 3)
    >>> z, state = sgld_update(z, grad, {}, step_size=0.1, temperature=0.0)
    >>> z[0]
    tensor([-0.1000, -0.1000, -0.1000])
"""

from __future__ import annotations

import math

import torch


def sgld_update(z, grad, state, step_size: float, temperature: float = 1.0):
    """Welling & Teh (2011): ``z - eps grad + sqrt(2 eps T) xi`` with ``xi ~ N(0, I)``."""
    moved = torch.add(z, grad, alpha=-step_size)
    if temperature == 0:
        return moved, state
    return moved.add_(torch.randn_like(z), alpha=math.sqrt(2.0 * step_size * temperature)), state


def psgld_update(z, grad, state, step_size: float, temperature: float = 1.0, decay: float = 0.99, eps: float = 1e-5):
    """Li et al. (2016): RMSprop-preconditioned SGLD,
    ``z - eps G grad + N(0, 2 eps T G)`` with ``G = diag(1 / (eps + sqrt(V)))`` and
    ``V <- decay V + (1 - decay) grad^2`` (``V`` starts at the first ``grad^2``).

    Approximation: the drift term ``eps Gamma(z)``, ``Gamma_i = sum_j dG_ij / dz_j``, that makes a
    position-dependent preconditioner leave the posterior invariant is omitted, as in Li et al.'s
    Algorithm 1. Without it the chain samples the posterior only approximately: the bias is small when
    ``V`` changes slowly (``decay`` near 1, a stationary chain), but it is not controlled by the step size
    alone. Computing ``Gamma`` needs derivatives of the squared-gradient average, one extra backward
    pass per step; use SGLD or SGHMC where exactness at small steps matters.
    """
    square = state.get("square_avg")
    square = grad * grad if square is None else square.mul(decay).addcmul_(grad, grad, value=1 - decay)
    precondition = square.sqrt().add_(eps).reciprocal_()
    moved = torch.addcmul(z, precondition, grad, value=-step_size)
    if temperature != 0:
        spread = precondition.mul(2.0 * step_size * temperature).sqrt_()
        moved.addcmul_(torch.randn_like(z), spread)
    return moved, {"square_avg": square}


def sghmc_update(z, grad, state, step_size: float, temperature: float = 1.0, friction: float = 0.1):
    """Chen et al. (2014) in the ``v <- (1 - friction) v - eps grad + N(0, 2 friction eps T)``, ``z <- z + v``
    parameterisation (``friction`` is ``alpha = eps C`` of the paper with unit mass, ``eps`` the squared
    step). The gradient-noise estimate ``beta_hat`` is taken as 0: the minibatch gradient adds variance
    ``eps^2 Var(grad)`` per step to the injected ``2 friction eps T``, so the chain is hotter than ``T``
    unless ``eps Var(grad) << 2 friction T`` (a small step or a large ``friction``)."""
    velocity = state.get("velocity")
    velocity = -step_size * grad if velocity is None else velocity.mul(1 - friction).sub_(grad, alpha=step_size)
    if temperature != 0:
        velocity.add_(torch.randn_like(z), alpha=math.sqrt(2.0 * friction * step_size * temperature))
    return z + velocity, {"velocity": velocity}


def preconditioned_sgld_update(z, grad, state, step_size: float, temperature: float = 1.0, inv_metric=None,
                               factor=None):
    """SGLD with a constant preconditioner ``M`` (no position dependence, so no correction drift is
    needed): ``z - eps grad M + sqrt(2 eps T) xi L^T`` with ``M = L L^T``; ``inv_metric`` is ``M``, dense
    ``Tensor[D, D]`` (with its Cholesky factor ``factor``) or diagonal ``Tensor[D]`` (``factor`` its square
    root). On a Gaussian target with ``M`` the posterior covariance, the stationary variance in whitened
    coordinates is ``1 / (1 - eps / 2)`` of the exact one.

    Examples:
        >>> z, state = preconditioned_sgld_update(torch.zeros(1, 2), torch.ones(1, 2), {}, 0.5, 0.0,
        ...                                       torch.tensor([1.0, 4.0]), torch.tensor([1.0, 2.0]))
        >>> z
        tensor([[-0.5000, -2.0000]])
    """
    if inv_metric.dim() == 2:
        moved = z - step_size * (grad @ inv_metric)
        if temperature != 0:
            moved = moved + math.sqrt(2.0 * step_size * temperature) * (torch.randn_like(z) @ factor.T)
        return moved, state
    moved = torch.addcmul(z, inv_metric, grad, value=-step_size)
    if temperature != 0:
        moved.addcmul_(torch.randn_like(z), factor, value=math.sqrt(2.0 * step_size * temperature))
    return moved, state
