"""The user-facing stochastic-gradient samplers (SGLD, pSGLD, SGHMC) over any Pyro model."""

from __future__ import annotations

from typing import Callable

import pyro
import torch
from tqdm.auto import tqdm

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import DivergenceError
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.potential import ModelPotential, check_model, constrained_draws, uniform_init
from bmm_ppl.validation import prepare_data
from bmm_ppl.inference.sgmcmc.kernels import psgld_update, sghmc_update, sgld_update


class SGMCMCMethod(StrEnum):
    SGLD = "sgld"
    PSGLD = "psgld"
    SGHMC = "sghmc"


_UPDATES = {SGMCMCMethod.SGLD: sgld_update, SGMCMCMethod.PSGLD: psgld_update, SGMCMCMethod.SGHMC: sghmc_update}


def polynomial_decay(lr: float, gamma: float = 0.55, t0: float = 100.0) -> Callable[[int], float]:
    """The step-size schedule ``lr * (1 + t / t0) ** -gamma`` (Welling & Teh's decay), for ``SGLD(lr=...)``.

    Example:
        >>> schedule = polynomial_decay(1e-2, gamma=1.0, t0=10.0)
        >>> schedule(0), schedule(10)
        (0.01, 0.005)
    """
    return lambda t: lr * (1.0 + t / t0) ** (-gamma)


def _minibatch(args: tuple, kwargs: dict, size: int, index: torch.Tensor):
    """Slices every tensor argument whose first dimension is the data size."""

    def cut(value):
        return value[index] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size else value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


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
        device: move the data here first; progress: tqdm bar.

    A non-finite potential or position raises :class:`~bmm_ppl.inference.errors.DivergenceError` naming the
    step (lower ``lr``).

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
                 device=None, progress: bool = True):
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
            potential = ModelPotential(model, args, kwargs)
            data_size = self._data_size(args, kwargs)
            z, _, _ = uniform_init(potential.potential_and_grad, self.num_chains, potential.dim, potential.dtype,
                                   potential.device)
            flat, stats = self._run(potential, z, args, kwargs, data_size)
            draws = constrained_draws(potential, flat)
        diagnostics = {"method": self.method.value, "batch_size": self.batch_size, "data_size": data_size,
                       "vectorised_over_chains": potential.vectorised}
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

    def _run(self, potential, z, args, kwargs, data_size):
        update = _UPDATES[self.method]
        total = self.warmup_steps + self.num_samples * self.thin
        draws = z.new_zeros(self.num_samples, z.shape[0], z.shape[1])
        energies = z.new_zeros(self.num_samples, z.shape[0])
        step_sizes = z.new_zeros(self.num_samples)
        finite = torch.ones((), dtype=torch.bool, device=z.device)
        first_bad = None
        state: dict = {}
        order, cursor = None, 0
        for t in tqdm(range(total), desc=f"SGLD({self.method.value})", disable=not self.progress, leave=False):
            data, scale = None, 1.0
            if data_size is not None:
                if order is None or cursor + self.batch_size > data_size:
                    order, cursor = torch.randperm(data_size, device=z.device), 0
                index = order[cursor: cursor + self.batch_size]
                cursor += self.batch_size
                data, scale = _minibatch(args, kwargs, data_size, index), data_size / self.batch_size
            energy, grad = potential.potential_and_grad(z, data, scale)
            eps = self._step_size(t)
            z, state = update(z, grad, state, eps, self.temperature, **self.options)
            finite = finite & torch.isfinite(energy).all() & torch.isfinite(z).all()
            if t % 100 == 99 or t == total - 1:  # one host check per 100 steps
                if not bool(finite):
                    first_bad = t
                    break
            kept = t - self.warmup_steps
            if kept >= 0 and kept % self.thin == 0:
                j = kept // self.thin
                draws[j], energies[j], step_sizes[j] = z, energy, eps
        if first_bad is not None:
            raise DivergenceError(
                f"SGLD({self.method.value}) diverged: non-finite potential or position by step {first_bad + 1} "
                f"(lr at that step {self._step_size(first_bad):.3g}); lower lr"
            )
        stats = {"potential_energy": energies.transpose(0, 1),
                 "step_size": step_sizes.unsqueeze(0).expand(z.shape[0], -1).contiguous()}
        return draws.transpose(0, 1).contiguous(), stats
