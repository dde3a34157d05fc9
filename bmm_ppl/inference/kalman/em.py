"""Expectation--maximisation for the learned matrices of a linear-Gaussian state-space model.

The E-step is the RTS smoother; the M-step sets each learned matrix to the closed-form maximiser of the
expected complete-data log-likelihood (Shumway & Stoffer, 1982), pooled over a batch of series. Each EM
iteration never lowers the exact log-likelihood, which the tests check.

Supported: learned ``transition_matrix``, ``observation_matrix``, ``transition_cov``, ``observation_cov``
(full or diagonal), ``initial_mean`` and ``initial_cov``, with time-invariant matrices, complete data, and a
noise loading with orthonormal columns (a selection, as the structural builders use). Other cases
(missing entries, learned control matrices, ...) are left to gradient ascent on the exact evidence.
"""

from __future__ import annotations

import torch

from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.kalman.filtering import FilterResult, SmootherResult
from bmm_ppl.contracts.state_space import LearnedMatrix, StateSpaceForm
from bmm_ppl.contracts.state_space import symmetrise

EM_SUPPORTED = ("transition_matrix", "observation_matrix", "transition_cov", "observation_cov", "initial_mean", "initial_cov")


def check_em_supported(form: StateSpaceForm, learned: list[str]) -> None:
    """Raises :class:`UnsupportedModelError` when EM's closed-form M-step does not apply to this model."""
    unsupported = [name for name in learned if name not in EM_SUPPORTED]
    if unsupported:
        raise UnsupportedModelError(f"EM has no closed-form update for {unsupported}; use learning='lbfgs'")
    p = form.params
    if any(m.dim() == 3 for m in (p.transition_matrix, p.observation_matrix, p.transition_cov, p.observation_cov)):
        raise UnsupportedModelError("EM here handles time-invariant matrices only; use learning='lbfgs'")
    y = form.observations
    if y.device.type != "meta" and bool(torch.isnan(y).any()):
        raise UnsupportedModelError("EM here needs complete data (y has missing entries); use learning='lbfgs'")
    loading = form.transition_noise_loading
    eye = torch.eye(loading.shape[1], dtype=loading.dtype, device=loading.device)
    if not torch.allclose(loading.mT @ loading, eye):
        raise UnsupportedModelError("EM needs a transition_noise_loading with orthonormal columns; use learning='lbfgs'")


def em_update(form: StateSpaceForm, filtered: FilterResult, smoothed: SmootherResult, learned: list[str]) -> dict[str, torch.Tensor]:
    """One M-step: ``{argument: new constrained value}`` for each learned argument (diagonal covariances as
    vectors of variances, as their ``pyro.param`` holds them)."""
    p = form.params
    y = form.observations.reshape((-1,) + form.observations.shape[-2:])  # [B, T, p]
    batch = y.shape[0]
    steps = y.shape[1]
    n = p.state_dim
    means = smoothed.smoothed_means.expand((batch, steps, n)) if smoothed.smoothed_means.dim() == 2 else smoothed.smoothed_means.reshape(batch, steps, n)
    covs = smoothed.smoothed_covs.reshape(-1, steps, n, n).expand(batch, steps, n, n)
    gains = smoothed.gains.reshape(-1, steps - 1, n, n).expand(batch, steps - 1, n, n) if steps > 1 else None
    second = covs + means.unsqueeze(-1) * means.unsqueeze(-2)  # E[x_t x_t^T]
    new = {}
    f, q = p.transition_matrix, p.transition_cov
    if steps > 1 and ("transition_matrix" in learned or "transition_cov" in learned):
        # E[x_{t+1} x_t^T] = P_{t+1|T} G_t^T + m_{t+1} m_t^T
        cross = (covs[:, 1:] @ gains.mT + means[:, 1:].unsqueeze(-1) * means[:, :-1].unsqueeze(-2)).sum((0, 1))
        before = second[:, :-1].sum((0, 1))
        after = second[:, 1:].sum((0, 1))
        if "transition_matrix" in learned:
            f = torch.linalg.solve(before, cross.mT).mT
            new["transition_matrix"] = f
        if "transition_cov" in learned:
            full = symmetrise(after - f @ cross.mT - cross @ f.mT + f @ before @ f.mT) / (batch * (steps - 1))
            loading = form.transition_noise_loading
            q_small = symmetrise(loading.mT @ full @ loading)
            new["transition_cov"] = _shaped(form, "transition_cov", q_small)
    h = p.observation_matrix
    if "observation_matrix" in learned or "observation_cov" in learned:
        targets = y
        if p.observation_offset is not None:
            targets = targets - p.observation_offset.reshape(-1, steps, targets.shape[-1])
        y_x = (targets.unsqueeze(-1) * means.unsqueeze(-2)).sum((0, 1))  # sum y_t E[x_t]^T
        xx = second.sum((0, 1))
        if "observation_matrix" in learned:
            h = torch.linalg.solve(xx, y_x.mT).mT
            new["observation_matrix"] = h
        if "observation_cov" in learned:
            yy = (targets.unsqueeze(-1) * targets.unsqueeze(-2)).sum((0, 1))
            r = symmetrise(yy - h @ y_x.mT - y_x @ h.mT + h @ xx @ h.mT) / (batch * steps)
            new["observation_cov"] = _shaped(form, "observation_cov", r)
    if "initial_mean" in learned:
        new["initial_mean"] = means[:, 0].mean(0)
    if "initial_cov" in learned:
        m0 = new.get("initial_mean", p.initial_mean)
        centred = second[:, 0].mean(0) - means[:, 0].mean(0).unsqueeze(-1) * m0.unsqueeze(-2) - m0.unsqueeze(-1) * means[:, 0].mean(0).unsqueeze(-2) + m0.unsqueeze(-1) * m0.unsqueeze(-2)
        new["initial_cov"] = _shaped(form, "initial_cov", symmetrise(centred))
    return new


def _shaped(form: StateSpaceForm, name: str, cov: torch.Tensor) -> torch.Tensor:
    spec = form.specs[name]
    if isinstance(spec, LearnedMatrix) and spec.diagonal:
        return cov.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(cov.dtype).tiny)
    # Keep a learned full covariance strictly positive definite for its Cholesky parameterisation.
    jitter = torch.finfo(cov.dtype).eps * cov.diagonal(dim1=-2, dim2=-1).abs().max().clamp_min(torch.finfo(cov.dtype).tiny)
    return cov + jitter * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
