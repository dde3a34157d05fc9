"""Fast exact log-likelihood for time-invariant models on complete data: steady-state gain plus an FFT convolution.

With time-invariant matrices and no missing entries the covariance recursion does not depend on the data
and converges geometrically to its fixed point. We run it (on ``n x n`` matrices only) until a step changes
it by less than machine precision -- the test statsmodels uses to switch to its steady-state filter --
filter those first ``k`` steps exactly, and from then on the predicted means follow the linear recurrence
``m_{t+1} = M m_t + u_t`` with the constant ``M = F (I - K H)``: a convolution of ``u`` with the kernel
``M^i`` (the convolution-kernel view of S4-style layers), done by FFT in O(T log T). The kernel is built by
repeated squaring and cut where ``||M^i||`` falls below machine precision.
"""

from __future__ import annotations

import math

import torch

from bmm_ppl.inference.kalman.filtering import kalman_filter
from bmm_ppl.contracts.state_space import LinearGaussianParams, symmetrise

_CHECK_EVERY = 8


def applies(params: LinearGaussianParams, y: torch.Tensor) -> bool:
    """Whether the steady-state path is exact here: time-invariant matrices and no missing entries."""
    if any(m.dim() == 3 for m in (params.transition_matrix, params.observation_matrix, params.transition_cov, params.observation_cov)):
        return False
    return y.device.type != "meta" and not bool(torch.isnan(y).any())


def _converged_prefix(params: LinearGaussianParams, max_steps: int) -> tuple[int, torch.Tensor]:
    """The number of steps k after which the predicted covariance is at its fixed point, and that point."""
    f, h, q, r = params.transition_matrix, params.observation_matrix, params.transition_cov, params.observation_cov
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
    cov = params.initial_cov
    eps = torch.finfo(f.dtype).eps
    for step in range(1, max_steps + 1):
        s = symmetrise(h @ cov @ h.mT + r)
        gain = torch.linalg.solve(s, h @ cov).mT
        a = eye - gain @ h
        new = symmetrise(f @ (a @ cov @ a.mT + gain @ r @ gain.mT) @ f.mT + q)
        if step % _CHECK_EVERY == 0:
            # One scalar read every few steps: this loop runs on n x n matrices only, a handful of times.
            change = float((new - cov).abs().max().detach())
            if change <= eps * float(new.abs().max().detach()):
                return step, new
        cov = new
    return max_steps, cov


def _kernel(m: torch.Tensor, length: int) -> torch.Tensor:
    """``[I, M, M^2, ...]`` (Tensor[L, n, n], L <= length) cut where the powers fall below machine precision."""
    eps = torch.finfo(m.dtype).eps
    powers = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).unsqueeze(0)
    step = m
    while powers.shape[0] < length:
        powers = torch.cat([powers, step @ powers], dim=0)  # M^L times [I .. M^(L-1)]
        step = step @ step
        if float(step.detach().abs().max()) <= eps * 1e-3:
            break
    return powers[:length]


def steady_state_log_likelihood(params: LinearGaussianParams, y: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(y)`` (Tensor[*batch]) for time-invariant matrices and complete ``y: Tensor[*batch, T, p]``;
    equal to :func:`kalman_filter`'s up to round-off. Differentiable.

    Examples:
        >>> e = torch.eye(1, dtype=torch.float64)
        >>> p = LinearGaussianParams(e, e, e, e, torch.zeros(1, dtype=torch.float64), e)
        >>> y = torch.randn(500, 1, dtype=torch.float64)
        >>> bool(torch.isclose(steady_state_log_likelihood(p, y), kalman_filter(p, y).log_likelihood))
        True
    """
    steps = y.shape[-2]
    head, cov = _converged_prefix(params, steps)
    head = min(head, steps)
    first = kalman_filter(_slice(params, 0, head), y[..., :head, :])
    if head == steps:
        return first.log_likelihood
    f, h, r = params.transition_matrix, params.observation_matrix, params.observation_cov
    s = symmetrise(h @ cov @ h.mT + r)
    chol = torch.linalg.cholesky(s)
    gain = torch.cholesky_solve(h @ cov, chol).mT
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
    m = f @ (eye - gain @ h)
    tail = y[..., head:, :]
    targets = tail if params.observation_offset is None else tail - params.observation_offset[..., head:, :]
    drive = targets @ (f @ gain).mT  # u_t = F K (y_t - d_t) + c_t
    if params.transition_offset is not None:
        drive = drive + params.transition_offset[..., head:, :]
    start = f @ first.filtered_means[..., -1, :].unsqueeze(-1)
    start = start.squeeze(-1)
    if params.transition_offset is not None:
        start = start + params.transition_offset[..., head - 1, :]
    # w_0 = m_head, w_j = u_{head + j - 1}; predicted means m_{head + j} = sum_i M^i w_{j - i}.
    length = tail.shape[-2]
    w = torch.cat([start.unsqueeze(-2), drive[..., :-1, :]], dim=-2)
    kernel = _kernel(m, length)
    size = 1 << (length + kernel.shape[0] - 1).bit_length()  # a power of two: fast FFTs, no wrap-around
    # Time last (contiguous) for the FFTs; a broadcast multiply-sum beats batched complex matmuls of tiny matrices.
    w_f = torch.fft.rfft(w.mT, n=size, dim=-1)  # [*batch, n, F]
    k_f = torch.fft.rfft(kernel.permute(1, 2, 0), n=size, dim=-1)  # [n, n, F]
    means = torch.fft.irfft((k_f * w_f.unsqueeze(-3)).sum(-2), n=size, dim=-1)[..., :length].mT
    innovation = targets - means @ h.mT
    whitening = torch.linalg.solve_triangular(chol, torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device), upper=False)
    whitened = innovation @ whitening.mT  # one constant matrix: a plain matmul over all steps
    log_det = 2.0 * torch.diagonal(chol).log().sum()
    p = y.shape[-1]
    tail_log_likelihood = -0.5 * (length * (p * math.log(2 * math.pi) + log_det) + whitened.pow(2).sum((-1, -2)))
    return first.log_likelihood + tail_log_likelihood


def _slice(params: LinearGaussianParams, start: int, stop: int) -> LinearGaussianParams:
    cut = lambda o: None if o is None else o[..., start:stop, :]  # noqa: E731
    return LinearGaussianParams(
        params.transition_matrix, params.observation_matrix, params.transition_cov, params.observation_cov,
        params.initial_mean, params.initial_cov, cut(params.transition_offset), cut(params.observation_offset),
    )
