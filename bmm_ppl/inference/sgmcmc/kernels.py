"""Stochastic-gradient MCMC updates over a batch of chains: SGLD, preconditioned SGLD and SGHMC.

Each update is a pure function of ``(z: Tensor[C, D], grad: Tensor[C, D], state, step_size, temperature)``
returning ``(z, state)``, where ``grad`` is a (minibatch) estimate of ``dU/dz`` for the potential
``U = -log p(data, z)`` and ``temperature`` scales the injected noise (1: the posterior).
"""

from __future__ import annotations

import math

import torch


def sgld_update(z, grad, state, step_size: float, temperature: float = 1.0):
    """Welling & Teh (2011): ``z - eps grad + sqrt(2 eps T) xi``."""
    noise = torch.randn_like(z) * math.sqrt(2.0 * step_size * temperature)
    return z - step_size * grad + noise, state


def psgld_update(z, grad, state, step_size: float, temperature: float = 1.0, decay: float = 0.99, eps: float = 1e-5):
    """Li et al. (2016): RMSprop-preconditioned SGLD, ``G = 1 / (eps + sqrt(V))`` with
    ``V <- decay V + (1 - decay) grad^2`` (the small ``Gamma`` correction term is dropped, as usual)."""
    square = state.get("square_avg")
    square = grad * grad if square is None else decay * square + (1 - decay) * grad * grad
    precondition = 1.0 / (eps + square.sqrt())
    noise = torch.randn_like(z) * (2.0 * step_size * temperature * precondition).sqrt()
    return z - step_size * precondition * grad + noise, {"square_avg": square}


def sghmc_update(z, grad, state, step_size: float, temperature: float = 1.0, friction: float = 0.1):
    """Chen et al. (2014) in the ``v <- (1 - friction) v - eps grad + N(0, 2 friction eps T)``, ``z <- z + v``
    parameterisation (the gradient-noise estimate ``beta_hat`` taken as 0)."""
    velocity = state.get("velocity")
    velocity = torch.zeros_like(z) if velocity is None else velocity
    noise = torch.randn_like(z) * math.sqrt(2.0 * friction * step_size * temperature)
    velocity = (1 - friction) * velocity - step_size * grad + noise
    return z + velocity, {"velocity": velocity}
