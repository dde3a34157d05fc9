"""The user-facing stochastic-gradient samplers (SGLD, pSGLD, SGHMC) over any Pyro model."""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import pyro
import torch
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError
from bmm_ppl.inference.program.minibatch import (
    DataArguments,
    compiled_minibatch_potential_and_grad,
    eager_minibatch_potential_and_grad,
)
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.program.potential import ModelPotential, check_model, constrained_draws, uniform_init
from bmm_ppl.validation import prepare_data
from bmm_ppl.inference.chain_diagnostics import chain_diagnostics, check_chains
from bmm_ppl.inference.sgmcmc.adaptation import (
    curvature_final,
    curvature_init,
    curvature_update,
    stein_variance_ratio,
)
from bmm_ppl.inference.sgmcmc.kernels import preconditioned_sgld_update, psgld_update, sghmc_update, sgld_update


class SGMCMCMethod(StrEnum):
    """The update rule of :class:`SGLD` (``method=``; the strings are accepted too).

    Attributes:
        SGLD: stochastic-gradient Langevin dynamics (Welling and Teh 2011).
        PSGLD: preconditioned SGLD with an RMSprop-style diagonal preconditioner (Li et al. 2016).
        SGHMC: stochastic-gradient Hamiltonian Monte Carlo with friction (Chen et al. 2014).
    """

    SGLD = "sgld"
    PSGLD = "psgld"
    SGHMC = "sghmc"


# Steps between host-side finiteness checks: each check synchronises with the device once.
_CHECK_EVERY = 100

_UPDATES = {SGMCMCMethod.SGLD: sgld_update, SGMCMCMethod.PSGLD: psgld_update, SGMCMCMethod.SGHMC: sghmc_update}

# The adaptive SGLD warm-up (``lr=None``): the first window's step in the model's own coordinates; the
# later windows' step in whitened units (small: their preconditioner is still being refined); windows end
# at these fractions of the warm-up, and the rest of it runs with the final preconditioner and step.
_FIRST_WINDOW_LR = 1e-3
_EARLY_WHITENED_STEP = 0.1
_WINDOW_ENDS = (0.05, 0.15, 0.35, 0.75)
_DENSE_UP_TO = 200  # dimensions up to which the adapted preconditioner is dense


def adaptation_windows(warmup_steps: int) -> list[int]:
    """The steps at which the adaptive SGLD warm-up re-estimates its preconditioner.

    Examples:
        >>> adaptation_windows(1000)
        [50, 150, 350, 750]
    """
    return [int(round(f * warmup_steps)) for f in _WINDOW_ENDS]


def polynomial_decay(lr: float, gamma: float = 0.55, t0: float = 100.0) -> Callable[[int], float]:
    """The step-size schedule ``lr * (1 + t / t0) ** -gamma`` (Welling & Teh's decay), for ``SGLD(lr=...)``.

    Examples:
        >>> schedule = polynomial_decay(1e-2, gamma=1.0, t0=10.0)
        >>> schedule(0), schedule(10)
        (0.01, 0.005)
    """
    return lambda t: lr * (1.0 + t / t0) ** (-gamma)


class SGLD:
    """Stochastic-gradient Langevin samplers on any Pyro model: SGLD, RMSprop-preconditioned SGLD, SGHMC.

    The potential comes from the model's trace (constrained sites through ``biject_to``, ``pyro.plate``
    subsample scales honoured); with ``batch_size`` every tensor argument whose first dimension is the
    data size is subsampled each step and the observations' log-likelihood scaled by ``n / batch_size``.
    All chains share each (batched) model run.

    Args:
        num_samples: draws kept per chain (after burn-in and thinning).
        warmup_steps: burn-in steps, discarded.
        num_chains: chains, started uniformly in ``[-2, 2]`` in unconstrained space.
        lr: the step size, a number or a schedule ``step -> step size`` (e.g. :func:`polynomial_decay`),
            or ``None`` (default): for ``"sgld"``, adapt a constant preconditioner and step during warm-up
            (below); for the other methods, ``1e-3``.
        method: ``"sgld"``, ``"psgld"`` or ``"sghmc"``.
        whitened_step_size: with ``lr=None``, the step after warm-up in the units the adapted preconditioner
            whitens. On a Gaussian posterior it inflates the variance by ``1 / (1 - step / 2)`` (0.25: sds
            about 7% too large) and gives an autocorrelation of about ``1 - step`` between draws; smaller
            is more exact and mixes more slowly.
        batch_size: minibatch size (``None``: full data).
        thin: keep every ``thin``-th draw.
        temperature: scales the injected noise (1 samples the posterior; < 1 a cold posterior).
        friction: SGHMC's friction.
        preconditioner_decay: pSGLD's RMSprop decay.
        jit: capture the minibatch potential and its gradient as one traced graph whose inputs are the
            position and the minibatch (see
            :func:`~bmm_ppl.inference.program.minibatch.compiled_minibatch_potential_and_grad`), checked
            against the model run at a second point and minibatch and falling back to running the model
            each step where capture fails (control flow that reads tensor values, random operations):
            ``diagnostics["jit"]`` is ``"graph"`` or ``"none"``. Several times faster per step. The model's
            Python code runs only while recording (side effects happen once); ``False`` runs eagerly.
        device: move the data here first.
        progress: show a tqdm bar.

    With ``lr=None`` and ``method="sgld"`` the warm-up adapts: it starts with a step of 1e-3, and at 5%,
    15%, 35% and 75% of ``warmup_steps`` regresses the window's gradients on its positions, whose slope is
    the posterior's curvature ``H`` where it is near Gaussian (:mod:`~bmm_ppl.inference.sgmcmc.adaptation`),
    and preconditions by ``M = H^-1`` (dense up to 200 dimensions, else diagonal) with a whitened step
    (0.1, then ``whitened_step_size`` for the last quarter and for sampling). ``diagnostics`` then holds
    ``inverse_metric`` and ``whitened_step_size``; ``sample_stats["step_size"]`` is the whitened step.

    Every run reports ``diagnostics["stein_variance_ratio"]``: ``trace(Cov(z, grad U)) / D`` over the
    sampling steps in the unconstrained coordinates (the same in any linear coordinates), which Stein's
    identity makes 1 for exact draws; above 1 it estimates the factor by which the discretisation (and
    minibatch noise) inflates the variances on average, and ``sd_inflation_estimate`` is its square root.
    It is an estimate of the bias from the same draws (with their Monte-Carlo error), exact in expectation
    only for a Gaussian posterior, and it does not see a bias in the means.

    The chains are checked at the end (split R-hat, bulk and tail ESS per latent site in ``diagnostics``,
    a :class:`~bmm_ppl.inference.errors.ChainDiagnosticsWarning` when R-hat > 1.01 or ESS < 100 per chain).

    Minibatches walk through a fresh permutation of the data each epoch; the last ``n mod batch_size`` rows
    of a permutation are skipped, so every minibatch has the same size (one capture serves all).

    A non-finite potential or position raises :class:`~bmm_ppl.inference.errors.DivergenceError` naming the
    step (lower ``lr``). It is checked on the device and read by the host once per 100 steps, so a
    diverging run stops within 100 steps of the first non-finite value.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("m", dist.Normal(torch.tensor(0.0), 1.0))
        >>> post = SGLD(num_samples=2000, warmup_steps=200, progress=False).fit(model)
        >>> post.draws()["m"].shape, round(post.diagnostics["whitened_step_size"], 2)
        (torch.Size([1, 2000]), 0.25)
    """

    def __init__(self, num_samples: int = 1000, warmup_steps: int = 1000, num_chains: int = 1, lr=None,
                 method: str | SGMCMCMethod = "sgld", batch_size: int | None = None, thin: int = 1,
                 temperature: float = 1.0, friction: float = 0.1, preconditioner_decay: float = 0.99,
                 whitened_step_size: float = 0.25, jit: bool = True, device=None, progress: bool = True):
        for name, value, minimum in (("num_samples", num_samples, 1), ("warmup_steps", warmup_steps, 0),
                                     ("num_chains", num_chains, 1), ("thin", thin, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if lr is not None and not callable(lr) and (not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"lr must be a positive number, a schedule step -> step size, or None, got {lr!r}")
        if not isinstance(whitened_step_size, (int, float)) or not 0 < whitened_step_size < 2:
            raise ValueError(f"whitened_step_size must be a number in (0, 2), got {whitened_step_size!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a non-negative number, got {temperature!r}")
        if not 0 < friction <= 1:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        if not 0 < preconditioner_decay < 1:
            raise ValueError(f"preconditioner_decay must be in (0, 1), got {preconditioner_decay!r}")
        self.num_samples, self.warmup_steps, self.num_chains, self.thin = num_samples, warmup_steps, num_chains, thin
        self.method = SGMCMCMethod.parse(method, "method")
        self.adaptive = lr is None and self.method is SGMCMCMethod.SGLD
        if self.adaptive and warmup_steps < 100:
            raise ValueError(f"warmup_steps={warmup_steps} is too short to adapt the step (lr=None needs "
                             f"warmup_steps >= 100); give lr or a longer warm-up")
        self.lr = 1e-3 if lr is None else lr
        self.whitened_step_size = float(whitened_step_size)
        self.batch_size = batch_size
        self.temperature = float(temperature)
        self.options = {SGMCMCMethod.SGHMC: {"friction": float(friction)},
                        SGMCMCMethod.PSGLD: {"decay": float(preconditioner_decay)}}.get(self.method, {})
        self.jit = bool(jit)
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    def _step_size(self, t: int) -> float:
        return float(self.lr(t)) if callable(self.lr) else float(self.lr)

    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Samples ``model(*args, **kwargs)``'s continuous latent sites.

        Returns:
            a :class:`Posterior` with ``draws = {site: Tensor[num_chains, num_samples, *shape]}`` and
            ``sample_stats`` ``"lp"`` (the log density of each draw, a minibatch estimate with
            ``batch_size``) and ``"step_size"``, and ``diagnostics`` with the chain checks.

        Warns:
            ChainDiagnosticsWarning: split R-hat above 1.01 or bulk / tail ESS below 100 per chain.
        """
        check_model(model)
        args, kwargs = prepare_data(args, kwargs, self.device)
        with pyro.get_param_store().scope():
            potential = ModelPotential(model, args, kwargs, allow_subsample=self.batch_size is None)
            data_size = self._data_size(args, kwargs)
            z, _, _ = uniform_init(potential.potential_and_grad, self.num_chains, potential.dim, potential.dtype,
                                   potential.device)
            potential_and_grad, batches, jitted = self._minibatch_potential(potential, z, data_size)
            flat, stats, run_diagnostics = self._run(potential_and_grad, batches, z)
            draws = constrained_draws(potential, flat)
        diagnostics = {"method": self.method.value, "batch_size": self.batch_size, "data_size": data_size,
                       "vectorised_over_chains": potential.vectorised, "jit": jitted, **run_diagnostics}
        diagnostics.update(chain_diagnostics({site.name: draws[site.name] for site in potential.sites}))
        check_chains(f"SGLD({self.method.value})", diagnostics, self.num_chains, stacklevel=3)
        return Posterior(model, args, kwargs, draws=draws, sample_stats=stats, diagnostics=diagnostics,
                         engine=f"SGLD({self.method.value})")

    def _data_size(self, args, kwargs):
        if self.batch_size is None:
            return None
        sizes = [v.shape[0] for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not sizes:
            raise ValueError("batch_size was given but the model has no tensor data to subsample")
        size = max(sizes)
        if self.batch_size > size:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {size} data points")
        return size

    def _minibatch_potential(self, potential: ModelPotential, z: torch.Tensor, data_size: int | None):
        """``(potential_and_grad(z, batch), batches, jit kind)``: the (captured or eager) minibatch potential
        and an endless iterator of minibatches (``()`` for full-data steps)."""
        if data_size is None:
            split, scale, batches = None, 1.0, itertools.repeat(())
            example = probe = ()
        else:
            split, scale = DataArguments(potential.args, potential.kwargs, size=data_size), data_size / self.batch_size
            tensors = split.tensors
            batches = self._shuffled_batches(tensors, data_size, z.device)
            size = self.batch_size
            example = tuple(t[:size] for t in tensors)
            # A second, different minibatch for the capture check (overlapping only when 2 b > n).
            probe = tuple(t[data_size - size:] if 2 * size > data_size else t[size: 2 * size] for t in tensors)
        potential_and_grad, kind = None, "none"
        if self.jit:
            potential_and_grad, kind = compiled_minibatch_potential_and_grad(potential, split, scale, z, example, probe)
        if potential_and_grad is None:
            potential_and_grad = eager_minibatch_potential_and_grad(potential, split, scale)
        return potential_and_grad, batches, kind

    def _shuffled_batches(self, tensors: tuple, data_size: int, device) -> Iterator[tuple]:
        """Minibatches of ``batch_size`` rows: each epoch gathers the data once in a fresh random order, and
        each step takes a contiguous slice of it (a view, no per-step gather)."""
        size = self.batch_size
        while True:
            order = torch.randperm(data_size, device=device)
            shuffled = tuple(t[order] for t in tensors)
            for start in range(0, data_size - size + 1, size):
                yield tuple(t[start: start + size] for t in shuffled)

    def _run(self, potential_and_grad, batches: Iterator[tuple], z: torch.Tensor):
        """The sampling loop. Per step: one potential-and-gradient call, one update and list appends (no host
        synchronisation); the potentials are stacked and checked for finiteness on the device, and the
        result read by the host, every ``_CHECK_EVERY`` steps."""
        update, options, temperature = _UPDATES[self.method], self.options, self.temperature
        warmup, thin = self.warmup_steps, self.thin
        total = warmup + self.num_samples * thin
        kept_draws, kept_energies, kept_step_sizes = [], [], []
        pending_energies = []  # since the last check
        state: dict = {}
        adaptive = self.adaptive
        window_ends = set(adaptation_windows(warmup)) if adaptive else set()
        dense = z.shape[-1] <= _DENSE_UP_TO
        window = curvature_init(z, dense) if adaptive else None
        sampled = curvature_init(z, dense=False)  # Stein's identity over the sampling steps
        inv_metric = factor = None
        step_size = self._step_size(0)
        progress = tqdm(range(total), desc=f"SGLD({self.method.value})", disable=not self.progress, leave=False)
        keep_pending = False  # the last kept draw's own potential is the next step's evaluation
        for t, batch in zip(progress, batches):
            energy, grad = potential_and_grad(z, batch)
            if keep_pending:
                kept_energies.append(energy)
                keep_pending = False
            if inv_metric is None:
                step_size = self._step_size(t)
                z_new, state = update(z, grad, state, step_size, temperature, **options)
            else:
                z_new, state = preconditioned_sgld_update(z, grad, state, step_size, temperature, inv_metric, factor)
            if window is not None:
                window = curvature_update(window, z, grad)
                if t + 1 in window_ends:
                    inv_metric, factor = curvature_final(window)
                    last = t + 1 == max(window_ends)
                    step_size = self.whitened_step_size if last else _EARLY_WHITENED_STEP
                    window = None if last else curvature_init(z, dense)
            if t >= warmup:
                sampled = curvature_update(sampled, z, grad)
            z = z_new
            pending_energies.append(energy)
            if t >= warmup and (t - warmup) % thin == 0:
                kept_draws.append(z)
                kept_step_sizes.append(step_size)
                keep_pending = True
            if len(pending_energies) == _CHECK_EVERY or t == total - 1:
                energies = torch.stack(pending_energies)
                if not bool(torch.isfinite(energies).all() & torch.isfinite(z).all()):
                    self._diverged(energies, t)
                pending_energies = []
        draws = torch.stack(kept_draws, 1)  # (chain, draw, D)
        if keep_pending:
            kept_energies.append(potential_and_grad(z, next(batches))[0])
        stats = {"lp": -torch.stack(kept_energies, 1),
                 "step_size": torch.tensor(kept_step_sizes, dtype=z.dtype, device=z.device)
                 .unsqueeze(0).expand(z.shape[0], -1).contiguous()}
        ratio = float(stein_variance_ratio(sampled).mean())
        diagnostics = {"stein_variance_ratio": ratio, "sd_inflation_estimate": max(ratio, 0.0) ** 0.5}
        if inv_metric is not None:
            diagnostics.update(inverse_metric=inv_metric, whitened_step_size=self.whitened_step_size)
        return draws, stats, diagnostics

    def _diverged(self, energies: torch.Tensor, t: int):
        """Raises the divergence error, naming the first step with a non-finite potential in the block
        ``energies: Tensor[k, C]`` that ends at step ``t`` (or ``t`` itself where only the position is)."""
        bad = (~torch.isfinite(energies).all(-1)).nonzero()
        first = t - energies.shape[0] + 1 + int(bad[0]) if len(bad) else t
        raise DivergenceError(
            f"SGLD({self.method.value}) diverged: non-finite potential or position by step {first + 1} "
            f"(lr at that step {self._step_size(first):.3g}); lower lr"
        )
