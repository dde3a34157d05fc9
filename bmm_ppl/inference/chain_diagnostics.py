"""End-of-run checks of a sampler's chains: rank-normalised split R-hat and bulk / tail effective sample
sizes (Vehtari, Gelman, Simpson, Carpenter & Burkner 2021), as ArviZ computes them, and the
:class:`~bmm_ppl.inference.errors.ChainDiagnosticsWarning` that the samplers raise on them.

Written here in NumPy (vectorised over every scalar of a site) rather than called from ArviZ, so that
the numbers are the same under ArviZ 0.2x and 1.x and so that one chain is checked too: its two halves
are compared by split R-hat (ArviZ 0.2x returns NaN for a single chain). The formulas follow ArviZ
0.2x's ``_rhat_rank``, ``_ess_bulk`` and ``_ess_tail`` exactly (the tests compare them).

Thresholds are Stan's and NumPyro's summary's: split R-hat above 1.01, or bulk or tail ESS below 100
per chain, with one refinement for R-hat. Stationary, well-mixed chains with a modest ESS exceed 1.01 by
chance: R-hat - 1 shrinks like 1 / ESS, and measured on AR(1) chains (``tests/inference/
test_chain_diagnostics.py``) four chains of 500 draws with bulk ESS ~230 cross 1.01 in every run, and one
chain of 1000 draws (ESS ~340) does so in 70% of runs with 20 parameters. So an R-hat above 1.01 is
reported only where it is also above that noise: ``(R-hat - 1) * ESS_bulk > 16 + num_chains`` at the same
element, above the 99th percentile of the largest such value over 1000 parameters of stationary chains
(13-14 for 1-4 chains), or where that element's bulk ESS fails its own check too (chains stuck apart have
a large R-hat and a tiny ESS, and both are reported).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import special

from bmm_ppl.inference.errors import ChainDiagnosticsWarning

MAX_R_HAT = 1.01
MIN_ESS_PER_CHAIN = 100.0
R_HAT_NOISE_ALLOWANCE = 16.0  # plus num_chains: the bound on (R-hat - 1) * ESS_bulk that chance explains


def r_hat_noise_bound(num_chains: int) -> float:
    """The largest ``(R-hat - 1) * ESS_bulk`` that stationary chains produce by chance (see the module
    docstring): ``16 + num_chains``."""
    return R_HAT_NOISE_ALLOWANCE + num_chains


def _split_chains(x: np.ndarray) -> np.ndarray:
    """``(C, N, P) -> (2C, N // 2, P)``: each chain's first and last halves (the middle draw of an odd
    ``N`` is dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def _average_ranks(flat: np.ndarray) -> np.ndarray:
    """Ranks 1..S along axis 0 of ``(S, P)``, tied values sharing the mean of their ranks (as
    ``scipy.stats.rankdata(method="average")``, vectorised over columns)."""
    size = flat.shape[0]
    order = np.argsort(flat, axis=0, kind="stable")
    ordered = np.take_along_axis(flat, order, axis=0)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:-1] = starts[1:]
    position = np.arange(size)[:, None]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, position, size - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(ordered.shape, dtype=float)
    np.put_along_axis(ranks, order, 0.5 * (first + last) + 1.0, axis=0)
    return ranks


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Rank normalisation over all chains and draws, per scalar: ``Phi^-1((rank - 3/8) / (S + 1/4))``
    with average ranks for ties (a rejected proposal repeats its value)."""
    chains, draws, width = x.shape
    ranks = _average_ranks(x.reshape(chains * draws, width))
    return special.ndtri((ranks - 0.375) / (chains * draws + 0.25)).reshape(x.shape)


def _rhat(x: np.ndarray) -> np.ndarray:
    """The classic potential scale reduction of ``(C, N, P)`` chains: ``Tensor[P]``."""
    draws = x.shape[1]
    within = x.var(axis=1, ddof=1).mean(0)
    between = draws * x.mean(1).var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt((between / within + draws - 1) / draws)


def rank_rhat(x: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat of ``x: (C, N, P)``: the larger of the bulk (rank-normalised) and tail
    (rank-normalised folded draws) split R-hats, ``(P,)``. Works for ``C = 1`` (two halves)."""
    split = _split_chains(x)
    bulk = _rhat(_z_scale(split))
    folded = np.abs(split - np.median(split.reshape(-1, split.shape[-1]), axis=0))
    tail = _rhat(_z_scale(folded))
    return np.maximum(bulk, tail)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Biased (divided by ``N``) autocovariance over axis 1 of ``(C, N, P)``, by FFT."""
    draws = x.shape[1]
    centred = np.ascontiguousarray((x - x.mean(1, keepdims=True)).transpose(0, 2, 1))  # time axis last
    size = 1 << (2 * draws - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=size, axis=-1)
    power = spectrum.real**2 + spectrum.imag**2
    return np.fft.irfft(power, n=size, axis=-1)[..., :draws].transpose(0, 2, 1) / draws


def _ess(x: np.ndarray) -> np.ndarray:
    """Effective sample size of ``(C, N, P)`` chains by Geyer's initial monotone sequence, ``(P,)``.

    Autocorrelations ``rho_t = 1 - (W - mean_c acov_t) / var_plus`` are summed in pairs
    ``P_k = rho_2k + rho_2k+1`` up to the first pair that is not positive (or the end), made monotone by a
    running minimum, with the even term after the last pair added once: ``tau = -1 + 2 sum P_k +
    rho_2K``, floored at ``1 / log10(C N)``.
    """
    chains, draws, width = x.shape
    total = chains * draws
    acov = _autocovariance(x)
    mean_var = acov[:, 0].mean(0) * draws / (draws - 1.0)
    var_plus = mean_var * (draws - 1.0) / draws
    if chains > 1:
        var_plus = var_plus + x.mean(1).var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (mean_var - acov.mean(0)) / var_plus  # (N, P)
    rho[0] = 1.0
    num_pairs = draws // 2
    pairs = rho[0: 2 * num_pairs: 2] + rho[1: 2 * num_pairs: 2]  # (num_pairs, P): P_0 .. P_{num_pairs-1}
    # The loop over pairs k = 1, 2, ... runs while 2k - 1 < N - 3 and the previous pair is positive; K is
    # the number of pairs it accepted beyond P_0.
    k = np.arange(1, num_pairs + 1)[:, None]
    stops = (2 * k - 1 >= draws - 3) | ~(pairs[k[:, 0] - 1] > 0)
    last = np.argmax(stops, axis=0)  # K, per scalar
    kept = np.arange(num_pairs)[:, None] < last[None, :]  # pairs 0 .. K-1
    monotone = np.minimum.accumulate(np.where(kept, pairs, np.inf), axis=0)
    pair_sum = np.where(kept, monotone, 0.0).sum(0)
    even_index = 2 * last
    even = rho[even_index, np.arange(width)]
    after_pair = pairs[np.minimum(last, num_pairs - 1), np.arange(width)]
    # The even autocorrelation after the accepted pairs is counted once if positive, or if its pair
    # (P_K) was non-negative; a first pair P_0 alone counts rho_0 = 1.
    tail_term = np.where((last == 0) | (even > 0) | (after_pair >= 0), even, 0.0)
    tau = -1.0 + 2.0 * pair_sum + tail_term
    tau = np.maximum(tau, 1.0 / math.log10(total))
    ess = total / tau
    ess = np.where(np.isnan(rho).any(0), np.nan, ess)
    constant = (x.max((0, 1)) - x.min((0, 1))) < np.finfo(float).resolution
    return np.where(constant, float(total), ess)


def ess_bulk(x: np.ndarray) -> np.ndarray:
    """Bulk ESS: the ESS of the rank-normalised split chains of ``x: (C, N, P)``, ``(P,)``."""
    return _ess(_z_scale(_split_chains(x)))


def ess_tail(x: np.ndarray) -> np.ndarray:
    """Tail ESS: the smaller ESS of the indicators ``x <= q_0.05`` and ``x <= q_0.95`` over split
    chains (quantiles of all draws, type 7), ``(P,)``."""
    flat = x.reshape(-1, x.shape[-1])
    results = []
    for prob in (0.05, 0.95):
        quantile = np.quantile(flat, prob, axis=0)
        results.append(_ess(_split_chains((x <= quantile).astype(float))))
    return np.minimum(*results)


def chain_diagnostics(draws: dict[str, torch.Tensor]) -> dict:
    """Split R-hat and bulk / tail ESS of every scalar of every site.

    Args:
        draws: ``{site: Tensor[C, N, *site_shape]}`` (moved to the host once, as float64).

    Returns:
        ``{"r_hat": {site: Tensor[*site_shape]}, "ess_bulk": {...}, "ess_tail": {...}, "max_r_hat": float,
        "min_ess_bulk": float, "min_ess_tail": float}`` (float64 tensors on the CPU; worst values over
        all sites, NaN counted as worst). Sites with fewer than 4 draws per chain get NaN.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> result = chain_diagnostics({"m": torch.randn(2, 500, 3)})
        >>> result["r_hat"]["m"].shape, result["max_r_hat"] < 1.01, result["min_ess_bulk"] > 700
        (torch.Size([3]), True, True)
    """
    per_site: dict[str, dict[str, torch.Tensor]] = {"r_hat": {}, "ess_bulk": {}, "ess_tail": {}}
    for name, value in draws.items():
        chains, num = value.shape[:2]
        site_shape = value.shape[2:]
        if num < 4:
            nan = torch.full(site_shape, math.nan, dtype=torch.float64)
            for key in per_site:
                per_site[key][name] = nan.clone()
            continue
        x = value.detach().to("cpu", torch.float64).reshape(chains, num, -1).numpy()
        for key, fn in (("r_hat", rank_rhat), ("ess_bulk", ess_bulk), ("ess_tail", ess_tail)):
            per_site[key][name] = torch.from_numpy(np.ascontiguousarray(fn(x))).reshape(site_shape)
    result: dict = dict(per_site)

    def worst(key, pick):
        values = [v.reshape(-1) for v in per_site[key].values()]
        if not values:
            return math.nan
        joined = torch.cat(values)
        if bool(torch.isnan(joined).any()):
            return math.nan
        return float(pick(joined))

    result["max_r_hat"] = worst("r_hat", torch.max)
    result["min_ess_bulk"] = worst("ess_bulk", torch.min)
    result["min_ess_tail"] = worst("ess_tail", torch.min)
    return result


def _worst_scalar(values: dict[str, torch.Tensor], largest: bool) -> tuple[str, float]:
    """The site element (``"w[2]"``) with the largest (or smallest) value, NaN first, and that value."""
    best_name, best_value = "", None
    for name, tensor in values.items():
        flat = tensor.reshape(-1)
        if flat.numel() == 0:
            continue
        nan = torch.isnan(flat)
        if bool(nan.any()):
            index = int(nan.nonzero()[0])
            value = math.nan
        else:
            index = int(flat.argmax() if largest else flat.argmin())
            value = float(flat[index])
        if best_value is None or math.isnan(value) or (
            not math.isnan(best_value) and (value > best_value if largest else value < best_value)
        ):
            element = "" if tensor.dim() == 0 else "[" + ", ".join(str(int(i)) for i in np.unravel_index(index, tuple(tensor.shape))) + "]"
            best_name, best_value = name + element, value
        if best_value is not None and math.isnan(best_value):
            break
    return best_name, math.nan if best_value is None else best_value


def check_chains(engine: str, diagnostics: dict, num_chains: int, stacklevel: int = 3) -> list[str]:
    """Warns (:class:`ChainDiagnosticsWarning`) when a chain check fails, naming the worst site element
    and its number; returns the failure messages (empty when the chains pass).

    Args:
        engine: the sampler's name for the message.
        diagnostics: :func:`chain_diagnostics`'s result.
        num_chains: chains in the run (ESS thresholds are per chain; the R-hat noise bound grows with it).
    """
    problems = []
    bound = r_hat_noise_bound(num_chains)
    reported = {}
    for name, r_hat in diagnostics["r_hat"].items():
        ess = diagnostics["ess_bulk"][name]
        beyond_chance = ((r_hat - 1) * ess > bound) | ~(ess >= MIN_ESS_PER_CHAIN * num_chains)
        reported[name] = torch.where(torch.isnan(r_hat) | beyond_chance, r_hat, torch.zeros_like(r_hat))
    site, value = _worst_scalar(reported, largest=True)
    if site and not value <= MAX_R_HAT:
        problems.append(f"split R-hat {value:.3g} at {site} (> {MAX_R_HAT})")
    for key, label in (("ess_bulk", "bulk"), ("ess_tail", "tail")):
        site, value = _worst_scalar(diagnostics[key], largest=False)
        if site and not value / num_chains >= MIN_ESS_PER_CHAIN:
            problems.append(f"{label} ESS {value / num_chains:.3g} per chain at {site} (< {MIN_ESS_PER_CHAIN:.0f})")
    if problems:
        warnings.warn(
            f"{engine}: the chains failed their checks: " + "; ".join(problems) + ". The draws may not "
            "represent the posterior: run longer (num_samples, warmup_steps), add chains, or reparameterise "
            "(see diagnostics['r_hat'], ['ess_bulk'], ['ess_tail']).",
            ChainDiagnosticsWarning,
            stacklevel=stacklevel,
        )
    return problems
