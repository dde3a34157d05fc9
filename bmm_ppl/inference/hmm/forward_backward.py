"""Discrete-state hidden Markov models: exact evidence (forward), posterior marginals (forward-backward)
and the most probable path (Viterbi), all in log space.

The discrete counterpart of the Kalman filter: ``z_0 ~ Categorical(initial)``,
``z_{t+1} | z_t ~ Categorical(transition[z_t])``, and the emission model enters only through
``log_emission[..., t, k] = log p(y_t | z_t = k)`` (so any emission distribution works; a missing
observation is a row of zeros).
"""

from __future__ import annotations

import torch


def _check(log_initial, log_transition, log_emission):
    k = log_initial.shape[-1]
    if log_transition.shape[-2:] != (k, k):
        raise ValueError(f"log_transition must be Tensor[{k}, {k}], got {tuple(log_transition.shape)}")
    if log_emission.dim() < 2 or log_emission.shape[-1] != k:
        raise ValueError(f"log_emission must be Tensor[..., T, {k}], got {tuple(log_emission.shape)}")


def hmm_forward(log_initial: torch.Tensor, log_transition: torch.Tensor, log_emission: torch.Tensor):
    """Forward pass: ``(log_evidence: Tensor[*batch], log_alpha: Tensor[*batch, T, K])`` with
    ``log_alpha[t, k] = log p(y_{0:t}, z_t = k)``.

    Examples:
        >>> lp = torch.full((2,), 0.5).log(); lt = torch.full((2, 2), 0.5).log()
        >>> hmm_forward(lp, lt, torch.zeros(3, 2))[0]
        tensor(0.)
    """
    _check(log_initial, log_transition, log_emission)
    alpha = log_initial + log_emission[..., 0, :]
    alphas = [alpha]
    for t in range(1, log_emission.shape[-2]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_transition, dim=-2) + log_emission[..., t, :]
        alphas.append(alpha)
    return torch.logsumexp(alpha, dim=-1), torch.stack(alphas, dim=-2)


def hmm_posterior_marginals(log_initial: torch.Tensor, log_transition: torch.Tensor, log_emission: torch.Tensor):
    """Forward-backward: ``(log_evidence, marginals: Tensor[*batch, T, K])``, ``marginals[t, k] = p(z_t = k | y)``."""
    log_evidence, log_alpha = hmm_forward(log_initial, log_transition, log_emission)
    beta = torch.zeros_like(log_alpha[..., -1, :])
    betas = [beta]
    for t in range(log_emission.shape[-2] - 1, 0, -1):
        beta = torch.logsumexp(log_transition + (log_emission[..., t, :] + beta).unsqueeze(-2), dim=-1)
        betas.append(beta)
    log_beta = torch.stack(betas[::-1], dim=-2)
    return log_evidence, (log_alpha + log_beta - log_evidence.unsqueeze(-1).unsqueeze(-1)).exp()


def viterbi(log_initial: torch.Tensor, log_transition: torch.Tensor, log_emission: torch.Tensor):
    """The most probable state path: ``(path: LongTensor[*batch, T], log_joint: Tensor[*batch])`` where
    ``log_joint = log p(y, path)``.

    Examples:
        >>> lp = torch.tensor([0.9, 0.1]).log(); lt = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()
        >>> viterbi(lp, lt, torch.zeros(3, 2))[0]
        tensor([0, 0, 0])
    """
    _check(log_initial, log_transition, log_emission)
    score = log_initial + log_emission[..., 0, :]
    pointers = []
    for t in range(1, log_emission.shape[-2]):
        candidates = score.unsqueeze(-1) + log_transition  # [..., from, to]
        score, best = candidates.max(dim=-2)
        score = score + log_emission[..., t, :]
        pointers.append(best)
    log_joint, state = score.max(dim=-1)
    path = [state]
    for best in reversed(pointers):
        state = best.gather(-1, state.unsqueeze(-1)).squeeze(-1)
        path.append(state)
    return torch.stack(path[::-1], dim=-1), log_joint
