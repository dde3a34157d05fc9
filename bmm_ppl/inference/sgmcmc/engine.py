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
from bmm_ppl.inference.sgmcmc.kernels import psgld_update, sghmc_update, sgld_update


class SGMCMCMethod(StrEnum):
    SGLD = "sgld"
    PSGLD = "psgld"
    SGHMC = "sghmc"


# Steps between host-side finiteness checks: each check synchronises with the device once.
_CHECK_EVERY = 100

_UPDATES = {SGMCMCMethod.SGLD: sgld_update, SGMCMCMethod.PSGLD: psgld_update, SGMCMCMethod.SGHMC: sghmc_update}


def polynomial_decay(lr: float, gamma: float = 0.55, t0: float = 100.0) -> Callable[[int], float]:
    """The step-size schedule ``lr * (1 + t / t0) ** -gamma`` (Welling & Teh's decay), for ``SGLD(lr=...)``.

    Example:
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
        lr: the step size, a number or a schedule ``step -> step size`` (e.g. :func:`polynomial_decay`).
        method: ``"sgld"``, ``"psgld"`` or ``"sghmc"``.
        batch_size: minibatch size (``None``: full data).
        thin: keep every ``thin``-th draw.
        temperature: scales the injected noise (1 samples the posterior; < 1 a cold posterior).
        friction: SGHMC's friction; preconditioner_decay: pSGLD's RMSprop decay.
        jit: capture the minibatch potential and its gradient as one traced graph whose inputs are the
            position and the minibatch (see
            :func:`~bmm_ppl.inference.program.minibatch.compiled_minibatch_potential_and_grad`), checked
            against the model run at a second point and minibatch and falling back to running the model
            each step where capture fails (control flow that reads tensor values, random operations):
            ``diagnostics["jit"]`` is ``"graph"`` or ``"none"``. Several times faster per step. The model's
            Python code runs only while recording (side effects happen once); ``False`` runs eagerly.
        device: move the data here first; progress: tqdm bar.

    Minibatches walk through a fresh permutation of the data each epoch; the last ``n mod batch_size`` rows
    of a permutation are skipped, so every minibatch has the same size (one capture serves all).

    A non-finite potential or position raises :class:`~bmm_ppl.inference.errors.DivergenceError` naming the
    step (lower ``lr``). It is checked on the device and read by the host once per 100 steps, so a
    diverging run stops within 100 steps of the first non-finite value.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("m", dist.Normal(torch.tensor(0.0), 1.0))
        >>> SGLD(num_samples=20, warmup_steps=10, lr=0.1, progress=False).fit(model).draws()["m"].shape
        torch.Size([1, 20])
    """

    def __init__(self, num_samples: int = 1000, warmup_steps: int = 1000, num_chains: int = 1, lr=1e-3,
                 method: str | SGMCMCMethod = "sgld", batch_size: int | None = None, thin: int = 1,
                 temperature: float = 1.0, friction: float = 0.1, preconditioner_decay: float = 0.99,
                 jit: bool = True, device=None, progress: bool = True):
        for name, value, minimum in (("num_samples", num_samples, 1), ("warmup_steps", warmup_steps, 0),
                                     ("num_chains", num_chains, 1), ("thin", thin, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if not callable(lr) and (not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"lr must be a positive number or a schedule step -> step size, got {lr!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a non-negative number, got {temperature!r}")
        if not 0 < friction <= 1:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        if not 0 < preconditioner_decay < 1:
            raise ValueError(f"preconditioner_decay must be in (0, 1), got {preconditioner_decay!r}")
        self.num_samples, self.warmup_steps, self.num_chains, self.thin = num_samples, warmup_steps, num_chains, thin
        self.lr = lr
        self.method = SGMCMCMethod.parse(method, "method")
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
            ``sample_stats`` ``"potential_energy"`` (the minibatch estimate) and ``"step_size"``.
        """
        check_model(model)
        args, kwargs = prepare_data(args, kwargs, self.device)
        with pyro.get_param_store().scope():
            potential = ModelPotential(model, args, kwargs, allow_subsample=self.batch_size is None)
            data_size = self._data_size(args, kwargs)
            z, _, _ = uniform_init(potential.potential_and_grad, self.num_chains, potential.dim, potential.dtype,
                                   potential.device)
            potential_and_grad, batches, jitted = self._minibatch_potential(potential, z, data_size)
            flat, stats = self._run(potential_and_grad, batches, z)
            draws = constrained_draws(potential, flat)
        diagnostics = {"method": self.method.value, "batch_size": self.batch_size, "data_size": data_size,
                       "vectorised_over_chains": potential.vectorised, "jit": jitted}
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
        progress = tqdm(range(total), desc=f"SGLD({self.method.value})", disable=not self.progress, leave=False)
        for t, batch in zip(progress, batches):
            energy, grad = potential_and_grad(z, batch)
            step_size = self._step_size(t)
            z, state = update(z, grad, state, step_size, temperature, **options)
            pending_energies.append(energy)
            if t >= warmup and (t - warmup) % thin == 0:
                kept_draws.append(z)
                kept_energies.append(energy)
                kept_step_sizes.append(step_size)
            if len(pending_energies) == _CHECK_EVERY or t == total - 1:
                energies = torch.stack(pending_energies)
                if not bool(torch.isfinite(energies).all() & torch.isfinite(z).all()):
                    self._diverged(energies, t)
                pending_energies = []
        draws = torch.stack(kept_draws, 1)  # (chain, draw, D)
        stats = {"potential_energy": torch.stack(kept_energies, 1),
                 "step_size": torch.tensor(kept_step_sizes, dtype=z.dtype, device=z.device)
                 .unsqueeze(0).expand(z.shape[0], -1).contiguous()}
        return draws, stats

    def _diverged(self, energies: torch.Tensor, t: int):
        """Raises the divergence error, naming the first step with a non-finite potential in the block
        ``energies: Tensor[k, C]`` that ends at step ``t`` (or ``t`` itself where only the position is)."""
        bad = (~torch.isfinite(energies).all(-1)).nonzero()
        first = t - energies.shape[0] + 1 + int(bad[0]) if len(bad) else t
        raise DivergenceError(
            f"SGLD({self.method.value}) diverged: non-finite potential or position by step {first + 1} "
            f"(lr at that step {self._step_size(first):.3g}); lower lr"
        )
