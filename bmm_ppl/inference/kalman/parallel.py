"""Parallel-in-time Kalman filtering and smoothing by associative scans (Särkkä & García-Fernández, 2021).

Each time step becomes an element of an associative operation whose prefix "sums" are the filtered
(or, run backwards, the smoothed) moments; a scan takes O(log T) sequential levels of batched small
matrix products, so long series run fast on a GPU and, because the work is batched, on a CPU too.
Results equal :func:`~bmm_ppl.inference.kalman.filtering.kalman_filter` and ``rts_smoother`` up to
round-off.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bmm_ppl.inference.kalman.filtering import FilterResult, SmootherResult, smoother_gains
from bmm_ppl.contracts.state_space import LinearGaussianParams, masked_observation, symmetrise


def associative_scan(combine: Callable, elements: tuple, reverse: bool = False) -> tuple:
    """Inclusive prefix scan of ``elements`` (tensors with time as dimension 0) under ``combine(earlier, later)``.

    The odd/even recursion of Blelloch's scan: combine neighbours, scan the half-length sequence, then fill
    in the even positions. ``reverse=True`` gives suffix "sums" (element t combines t..T); ``combine`` is
    always called as ``combine(earlier, later)`` in time order.

    Examples:
        >>> associative_scan(lambda a, b: (a[0] + b[0],), (torch.arange(5.0),))[0]
        tensor([ 0.,  1.,  3.,  6., 10.])
    """
    if reverse:
        flipped = associative_scan(lambda a, b: combine(b, a), tuple(e.flip(0) for e in elements))
        return tuple(e.flip(0) for e in flipped)
    length = elements[0].shape[0]
    if length < 2:
        return elements
    paired = combine(tuple(e[0:-1:2] for e in elements), tuple(e[1::2] for e in elements))
    odd = associative_scan(combine, paired)
    if length % 2 == 0:
        even = combine(tuple(e[:-1] for e in odd), tuple(e[2::2] for e in elements))
    else:
        even = combine(odd, tuple(e[2::2] for e in elements))
    even = tuple(torch.cat([e[:1], r], dim=0) for e, r in zip(elements, even))
    out = []
    for e, o in zip(even, odd):
        merged = e.new_empty((length,) + e.shape[1:])
        merged[0::2] = e
        merged[1::2] = o
        out.append(merged)
    return tuple(out)


def _mv(matrix, vector):
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _filter_combine(first, second):
    a1, b1, c1, eta1, j1 = first
    a2, b2, c2, eta2, j2 = second
    eye = torch.eye(a1.shape[-1], dtype=a1.dtype, device=a1.device)
    # A2 (I + C1 J2)^-1 and A1^T (I + J2 C1)^-1, by solves rather than inverses.
    left = torch.linalg.solve((eye + c1 @ j2).mT, a2.mT).mT
    right = torch.linalg.solve((eye + j2 @ c1).mT, a1).mT
    a = left @ a1
    b = _mv(left, b1 + _mv(c1, eta2)) + b2
    c = symmetrise(left @ c1 @ a2.mT + c2)
    eta = _mv(right, eta2 - _mv(j2, b1)) + eta1
    j = symmetrise(right @ j2 @ a1 + j1)
    return a, b, c, eta, j


def _shifted(first: torch.Tensor, rest: torch.Tensor, steps: int, time_varying_dim: int) -> torch.Tensor:
    """``[first, rest_0, ..., rest_{T-2}]``: the quantity entering step t comes from step t-1."""
    if rest.dim() == time_varying_dim:
        rest = rest[: steps - 1]
    else:
        rest = rest.expand((steps - 1,) + rest.shape)
    return torch.cat([first.unsqueeze(0).expand((1,) + rest.shape[1:]), rest], dim=0)


def parallel_kalman_filter(params: LinearGaussianParams, y: torch.Tensor) -> FilterResult:
    """The Kalman filter of ``y: Tensor[*batch, T, p]`` as an associative scan; same result as
    :func:`~bmm_ppl.inference.kalman.filtering.kalman_filter`.

    Examples:
        >>> p = LinearGaussianParams(torch.eye(1), torch.eye(1), torch.eye(1), torch.eye(1), torch.zeros(1), torch.eye(1))
        >>> parallel_kalman_filter(p, torch.zeros(5, 1)).filtered_means.shape
        torch.Size([5, 1])
    """
    steps, n = y.shape[-2], params.state_dim
    batch = y.shape[:-2]
    nb = len(batch)
    y_t = y.movedim(-2, 0)  # [T, *batch, p]
    obs_offset = None if params.observation_offset is None else params.observation_offset.movedim(-2, 0)
    h_t = params.observation_matrix if params.observation_matrix.dim() == 3 else params.observation_matrix.expand((steps,) + params.observation_matrix.shape)
    r_t = params.observation_cov if params.observation_cov.dim() == 3 else params.observation_cov.expand((steps,) + params.observation_cov.shape)
    # Time-varying matrices broadcast against [T, *batch, ...]: give them singleton batch dimensions.
    pad = lambda m: m.reshape(m.shape[:1] + (1,) * nb + m.shape[1:])  # noqa: E731
    base, h, r, num_observed = masked_observation(y_t, pad(h_t), pad(r_t), obs_offset)

    zero = params.initial_cov.new_zeros(n, n)
    f_in = pad(_shifted(zero, params.transition_matrix, steps, 3))
    prior_cov = pad(_shifted(params.initial_cov, params.transition_cov, steps, 3))
    if params.transition_offset is None:
        prior_mean = pad(_shifted(params.initial_mean, params.initial_mean.new_zeros(n), steps, 2))
    else:
        offsets = params.transition_offset.movedim(-2, 0)  # [T, *batch, n]
        first = params.initial_mean.expand(offsets.shape[1:])
        prior_mean = torch.cat([first.unsqueeze(0), offsets[: steps - 1]], dim=0)

    # Element t conditions the state "prior_mean + F x_{t-1} + noise(prior_cov)" on y_t.
    hp = h @ prior_cov
    s = symmetrise(hp @ h.mT + r)
    chol = torch.linalg.cholesky(s)
    gain = torch.cholesky_solve(hp, chol).mT
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    i_kh = eye - gain @ h
    innovation = base - _mv(h, prior_mean)
    a = i_kh @ f_in
    b = prior_mean + _mv(gain, innovation)
    c = symmetrise(i_kh @ prior_cov @ i_kh.mT + gain @ r @ gain.mT)
    hf = h @ f_in
    s_inv_hf = torch.cholesky_solve(hf, chol)
    eta = _mv(hf.mT, torch.cholesky_solve(innovation.unsqueeze(-1), chol).squeeze(-1))
    j = symmetrise(hf.mT @ s_inv_hf)
    shape = (steps,) + batch
    elements = (
        a.expand(shape + (n, n)),
        b.expand(shape + (n,)),
        c.expand(shape + (n, n)),
        eta.expand(shape + (n,)),
        j.expand(shape + (n, n)),
    )
    _, filtered_means, filtered_covs, _, _ = associative_scan(_filter_combine, elements)

    # One-step predictions from the filtered moments, then the innovation likelihood, all at once.
    f_out = pad(_shifted(zero, params.transition_matrix, steps, 3))
    predicted_means = _mv(f_out, torch.cat([filtered_means[:1], filtered_means[:-1]], 0)) + prior_mean
    predicted_covs = symmetrise(
        f_out @ torch.cat([filtered_covs[:1], filtered_covs[:-1]], 0) @ f_out.mT + prior_cov
    ).expand(shape + (n, n))
    pred_innovation = base - _mv(h, predicted_means)
    pred_chol = torch.linalg.cholesky(symmetrise(h @ predicted_covs @ h.mT + r))
    whitened = torch.linalg.solve_triangular(pred_chol, pred_innovation.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2.0 * torch.diagonal(pred_chol, dim1=-2, dim2=-1).log().sum(-1)
    step_log_likelihood = -0.5 * (num_observed * math.log(2 * math.pi) + log_det + whitened.pow(2).sum(-1))
    log_likelihood = step_log_likelihood.sum(0).expand(batch)
    back = lambda x, k: x.movedim(0, nb)  # noqa: E731
    return FilterResult(
        log_likelihood,
        back(filtered_means, 1),
        back(filtered_covs, 2),
        back(predicted_means.expand(shape + (n,)), 1),
        back(predicted_covs, 2),
    )


def _smoother_combine(earlier, later):
    # Elements map x_{t+1} to x_t: x_t = E_t x_{t+1} + g_t + noise(L_t); the earlier map is applied last.
    e1, g1, l1 = earlier
    e2, g2, l2 = later
    return e1 @ e2, _mv(e1, g2) + g1, symmetrise(e1 @ l2 @ e1.mT + l1)


def parallel_rts_smoother(params: LinearGaussianParams, filtered: FilterResult) -> SmootherResult:
    """RTS smoothing as a reverse associative scan; same result as ``rts_smoother``."""
    gains = smoother_gains(params, filtered)
    nb = filtered.filtered_means.dim() - 2
    front = lambda x, k: x.movedim(nb, 0)  # noqa: E731
    fm, fc = front(filtered.filtered_means, 1), front(filtered.filtered_covs, 2)
    pm, pc = front(filtered.predicted_means, 1), front(filtered.predicted_covs, 2)
    g = front(gains, 2)
    e = torch.cat([g, torch.zeros_like(fc[-1:])], dim=0)
    shift = torch.cat([fm[:-1] - _mv(g, pm[1:]), fm[-1:]], dim=0)
    conditional = torch.cat([symmetrise(fc[:-1] - g @ pc[1:] @ g.mT), fc[-1:]], dim=0)
    _, means, covs = associative_scan(_smoother_combine, (e, shift, conditional), reverse=True)
    return SmootherResult(means.movedim(0, nb), covs.movedim(0, nb), gains)
