"""The user-facing Hamiltonian samplers: ``NUTS`` and ``HMC``, over a Pyro model or a raw potential."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pyro
import torch
from tqdm.auto import tqdm

from bmm_ppl.inference.hmc.adaptation import (
    adaptation_windows,
    dual_averaging,
    find_reasonable_step_size,
    shrunk_covariance_estimator,
    welford_variance,
)
from bmm_ppl.inference.chain_diagnostics import chain_diagnostics, check_chains
from bmm_ppl.inference.errors import ChainDiagnosticsWarning
from bmm_ppl.inference.hmc.integrator import PhasePoint
from bmm_ppl.inference.hmc.kernels import hmc_step
from bmm_ppl.inference.hmc.nuts_kernel import NUTSKernel
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.program.potential import (
    ModelPotential,
    check_model,
    constrained_draws,
    captured_potential_graph,
    uniform_init,
)
from bmm_ppl.validation import prepare_data


class DivergentTransitionWarning(UserWarning):
    """Some post-warm-up transitions diverged: the draws may be biased (see ``sample_stats["diverging"]``)."""


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Hamiltonian:
    """The loop, adaptation and bookkeeping shared by NUTS and HMC; subclasses give the transition."""

    engine_name = ""

    def __init__(self, *, num_samples, warmup_steps, num_chains, target_accept_prob, step_size, adapt_step_size,
                 adapt_mass_matrix, jit, init_radius, device, progress, evidence=None, dense_mass=False):
        if evidence not in (None, "bridge"):
            raise ValueError(f"evidence={evidence!r} is not one of None, 'bridge'")
        self.evidence = evidence
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.num_chains = _check_int("num_chains", num_chains, 1)
        if not isinstance(target_accept_prob, (int, float)) or not 0 < target_accept_prob < 1:
            raise ValueError(f"target_accept_prob must be a number in (0, 1), got {target_accept_prob!r}")
        self.target_accept_prob = float(target_accept_prob)
        if step_size is not None and (not isinstance(step_size, (int, float)) or not step_size > 0):
            raise ValueError(f"step_size must be a positive number or None, got {step_size!r}")
        self.step_size = step_size
        self.adapt_step_size = bool(adapt_step_size)
        self.adapt_mass_matrix = bool(adapt_mass_matrix)
        if not isinstance(dense_mass, bool):
            raise ValueError(f"dense_mass must be True or False, got {dense_mass!r}")
        self.dense_mass = dense_mass
        self.jit = bool(jit)
        if not init_radius > 0:
            raise ValueError(f"init_radius must be positive, got {init_radius!r}")
        self.init_radius = float(init_radius)
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    def _kernel(self, potential_and_grad, functional_potential_and_grad):
        """The transition ``(point, step_size, inv_mass) -> (point, info)`` and a ``compile(point,
        step_size, inv_mass) -> bool`` that captures it whole, or ``None`` where it cannot be."""
        raise NotImplementedError

    # ------------------------------------------------------------- entries
    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Samples the posterior of ``model(*args, **kwargs)``'s continuous latent sites.

        Returns:
            a :class:`Posterior` with ``draws = {site: Tensor[num_chains, num_samples, *site_shape]}`` in
            constrained space (``pyro.deterministic`` sites included), ``sample_stats`` shaped
            ``(chain, draw)`` under ArviZ's names (``lp``, ``energy``, ``acceptance_rate``, ``diverging``,
            ``n_steps``, ``step_size``, and ``tree_depth`` for NUTS) and ``diagnostics`` (divergences, step
            sizes, mass matrices, and the chain checks of :func:`~bmm_ppl.inference.chain_diagnostics.chain_diagnostics`:
            ``r_hat``, ``ess_bulk``, ``ess_tail`` per latent site, ``max_r_hat``, ``min_ess_bulk``, ``min_ess_tail``).

        Warns:
            DivergentTransitionWarning: post-warm-up transitions diverged.
            ChainDiagnosticsWarning: split R-hat above 1.01 or bulk / tail ESS below 100 per chain, naming
                the site and the number (or, for HMC, a trajectory far shorter than the posterior's scale).
        """
        check_model(model)
        args, kwargs = prepare_data(args, kwargs, self.device)
        with pyro.get_param_store().scope():
            potential = ModelPotential(model, args, kwargs)
            init = torch.zeros(self.num_chains, potential.dim, dtype=potential.dtype, device=potential.device)
            potential_and_grad, jitted, functional = None, "none", None
            if self.jit:
                captured = captured_potential_graph(potential, init)
                if captured is not None:
                    # The kernel's graphs record the potential's aten graph again, not the Pyro model.
                    (potential_and_grad, functional), jitted = captured, "graph"
            potential_and_grad = potential_and_grad or potential.potential_and_grad
            z, energy, grad = uniform_init(
                potential_and_grad, self.num_chains, potential.dim, potential.dtype, potential.device, self.init_radius
            )
            flat, stats, diagnostics = self._sample(
                potential_and_grad, PhasePoint(z, torch.zeros_like(z), energy, grad), functional,
                graphs_only=jitted == "graph",
            )
            draws = constrained_draws(potential, flat)
        if diagnostics.pop("kernel_compiled", False):
            jitted = "kernel"
        diagnostics.update(jit=jitted, vectorised_over_chains=potential.vectorised)
        diagnostics.update(chain_diagnostics({site.name: draws[site.name] for site in potential.sites}))
        self._report(diagnostics)
        posterior = Posterior(model, args, kwargs, draws=draws, sample_stats=stats, diagnostics=diagnostics, engine=self.engine_name)
        if self.evidence == "bridge":
            from bmm_ppl.inference.bridge import bridge_sampling

            posterior.log_evidence = bridge_sampling(posterior)
        return posterior

    def run_potential(self, potential_fn: Callable[[torch.Tensor], torch.Tensor], init: torch.Tensor) -> Posterior:
        """Samples ``exp(-potential_fn(z))`` over ``z`` in R^D: the raw-potential entry point.

        Args:
            potential_fn: ``z: Tensor[C, D] -> Tensor[C]``, the potential energy of each of ``C`` points
                (it must treat rows independently).
            init: Tensor[num_chains, D] initial points, or Tensor[D] used for every chain.

        Returns:
            a :class:`Posterior` without a model, with ``draws = {"z": Tensor[num_chains, num_samples, D]}``.
        """
        if not callable(potential_fn):
            raise TypeError(f"potential_fn must be callable, got {type(potential_fn).__name__}")
        if not isinstance(init, torch.Tensor) or init.dim() not in (1, 2) or not init.is_floating_point():
            raise ValueError(f"init must be a floating Tensor[D] or Tensor[num_chains, D], got {init!r}")
        if init.dim() == 1:
            init = init.expand(self.num_chains, -1)
        if init.shape[0] != self.num_chains:
            raise ValueError(f"init has {init.shape[0]} rows but num_chains={self.num_chains}")
        init = init.to(self.device) if self.device is not None else init

        def potential_and_grad(z):
            with torch.enable_grad():
                point = z.detach().requires_grad_(True)
                value = potential_fn(point)
                (grad,) = torch.autograd.grad(value.sum(), point)
            return value.detach(), grad

        energy, grad = potential_and_grad(init)
        if energy.shape != init.shape[:1]:
            raise ValueError(f"potential_fn must return Tensor[{init.shape[0]}] (one value per row), got {tuple(energy.shape)}")
        if not bool(torch.isfinite(energy).all()):
            raise ValueError("init has a non-finite potential for some chain")
        flat, stats, diagnostics = self._sample(potential_and_grad, PhasePoint(init, torch.zeros_like(init), energy, grad))
        diagnostics.update(chain_diagnostics({"z": flat}))
        self._report(diagnostics)
        return Posterior(None, draws={"z": flat}, sample_stats=stats, diagnostics=diagnostics, engine=self.engine_name)

    # ---------------------------------------------------------------- loop
    def _sample(self, potential_and_grad, point: PhasePoint, functional_potential_and_grad=None, graphs_only=False):
        """The warm-up and sampling loop. ``graphs_only``: ``potential_and_grad`` is a captured graph (no
        autograd), so the loop runs under ``torch.inference_mode`` (about 15% less dispatch per operation
        on small tensors); the results are copied out as ordinary tensors."""
        step, inv_mass = self._initial_step(point), self._initial_inv_mass(point)
        if self.step_size is None:
            step = find_reasonable_step_size(point, step, inv_mass, potential_and_grad)
        transition, compile_kernel = self._kernel(potential_and_grad, functional_potential_and_grad)
        kernel_compiled = False
        if functional_potential_and_grad is not None and compile_kernel is not None:
            with pyro.validation_enabled(False):
                try:
                    kernel_compiled = compile_kernel(point, step, inv_mass)
                except Exception:  # noqa: BLE001 - a model that cannot be captured runs the eager kernel
                    kernel_compiled = False
        with torch.inference_mode(graphs_only):
            draws, stats, diagnostics = self._loop(potential_and_grad, point, transition, step, inv_mass)
        if graphs_only:  # inference tensors cannot enter autograd later: hand out ordinary copies
            draws = draws.clone()
            stats = {name: value.clone() for name, value in stats.items()}
            for name in ("inverse_mass_matrix_diagonal", "inverse_mass_matrix", "trajectory_length", "curvature_scale",
                         "posterior_scale_in_metric_units"):
                if name in diagnostics:
                    diagnostics[name] = diagnostics[name].clone()
        diagnostics["kernel_compiled"] = kernel_compiled
        return draws, stats, diagnostics

    def _initial_step(self, point: PhasePoint) -> torch.Tensor:
        return torch.full_like(point.potential, 1.0 if self.step_size is None else float(self.step_size))

    def _initial_inv_mass(self, point: PhasePoint) -> torch.Tensor:
        """The identity metric: ``Tensor[C, D]`` ones (diagonal) or ``Tensor[C, D, D]`` identities (dense)."""
        if not self.dense_mass:
            return torch.ones_like(point.z)
        chains, dim = point.z.shape
        eye = torch.eye(dim, dtype=point.z.dtype, device=point.z.device)
        return eye.expand(chains, dim, dim).clone()

    def _metric_estimator(self):
        """The ``(init, update, final)`` estimator of each window's metric from its draws (``init(z,
        inv_mass)``: the current metric sets the coordinates of the dense estimator's shrinkage)."""
        return shrunk_covariance_estimator() if self.dense_mass else welford_variance()

    def _loop(self, potential_and_grad, point: PhasePoint, transition, step: torch.Tensor, inv_mass: torch.Tensor):
        chains, dim = point.z.shape
        warmup, total = self.warmup_steps, self.warmup_steps + self.num_samples
        step_init, step_update, step_final = dual_averaging(self.target_accept_prob)
        metric_init, metric_update, metric_final = self._metric_estimator()
        averaging = step_init(step)
        windows = adaptation_windows(warmup) if self.adapt_mass_matrix else []
        window_ends = {end for _, end in windows}
        in_window = {i for start, end in windows for i in range(start, end)}
        variance = metric_init(point.z, inv_mass)
        zeros = point.z.new_zeros
        draws = zeros(self.num_samples, chains, dim)
        stats: dict[str, torch.Tensor] = {}
        # Sums of z, g, z^2 and z g over the draws: the regression slope of the gradient on the position,
        # Cov(z, g) / Var(z), is the posterior's curvature where it is near Gaussian, wherever the chain is.
        moments = [zeros(chains, dim) for _ in range(4)]
        warmup_divergences = zeros(chains)
        bar = tqdm(total=total, desc=self.engine_name, disable=not self.progress, leave=False)
        for i in range(total):
            point, info = transition(point, step, inv_mass)
            if i < warmup:
                warmup_divergences = warmup_divergences + info.diverging.to(warmup_divergences.dtype)
                if self.adapt_step_size:
                    averaging = step_update(averaging, info.acceptance_rate)
                    step = torch.exp(averaging.log_step)
                if i in in_window:
                    variance = metric_update(variance, point.z)
                if i + 1 in window_ends:
                    inv_mass = metric_final(variance)
                    variance = metric_init(point.z, inv_mass)
                    if self.adapt_step_size:
                        step = find_reasonable_step_size(point, step, inv_mass, potential_and_grad)
                        averaging = step_init(step)
                if i + 1 == warmup and self.adapt_step_size:
                    step = step_final(averaging)
            else:
                j = i - warmup
                draws[j] = point.z
                for total_, term in zip(moments, (point.z, point.grad, point.z * point.z, point.z * point.grad)):
                    total_.add_(term)
                row = {"lp": -point.potential, "step_size": step, **info._asdict()}
                if not stats:
                    stats = {name: zeros((self.num_samples,) + value.shape, dtype=value.dtype) for name, value in row.items()}
                for name, value in row.items():
                    stats[name][j] = value
            bar.update()
        bar.close()
        stats = {name: value.transpose(0, 1) for name, value in stats.items()}
        per_chain = stats["diverging"].sum(1)
        diagnostics = {
            "num_divergences": int(per_chain.sum()),
            "divergences_per_chain": per_chain.tolist(),
            "warmup_divergences": int(warmup_divergences.sum()),
            "step_size": step.tolist(),
            "inverse_mass_matrix_diagonal": inv_mass.diagonal(dim1=-2, dim2=-1).clone() if self.dense_mass else inv_mass,
            "mean_accept_prob": float(stats["acceptance_rate"].mean()),
            "num_gradient_evaluations": int(stats["n_steps"].sum()),
        }
        if self.dense_mass:
            diagnostics["inverse_mass_matrix"] = inv_mass
        mean_z, mean_g, mean_zz, mean_zg = (m / self.num_samples for m in moments)
        slope = (mean_zg - mean_z * mean_g) / (mean_zz - mean_z * mean_z)
        diagnostics["curvature_scale"] = torch.where(slope > 0, slope.clamp(min=torch.finfo(slope.dtype).tiny).rsqrt(),
                                                     torch.full_like(slope, math.nan))
        return draws.transpose(0, 1).contiguous(), stats, diagnostics

    def _report(self, diagnostics: dict) -> None:
        count = diagnostics["num_divergences"]
        if count:
            total = self.num_samples * self.num_chains
            warnings.warn(
                f"{self.engine_name}: {count} of {total} post-warm-up transitions diverged "
                f"(per chain: {diagnostics['divergences_per_chain']}); the draws may be biased. Raise "
                f"target_accept_prob or reparameterise the model (e.g. non-centred).",
                DivergentTransitionWarning,
                stacklevel=3,
            )
        check_chains(self.engine_name, diagnostics, self.num_chains, stacklevel=4)


class NUTS(_Hamiltonian):
    """The No-U-Turn sampler (multinomial, with Stan's warm-up), batched over chains in plain PyTorch.

    The model becomes a potential over one flat unconstrained vector (constrained sites through
    ``biject_to``); all chains advance together, one batched model run per leapfrog step.

    Args:
        num_samples: draws kept per chain after warm-up.
        warmup_steps: adaptation steps per chain (dual-averaging step size; mass matrix in Stan's
            doubling windows), discarded.
        num_chains: independent chains, started uniformly in ``[-init_radius, init_radius]``
            (unconstrained space).
        target_accept_prob: the mean acceptance the step size is tuned to.
        max_tree_depth: at most ``2**max_tree_depth - 1`` leapfrog steps per draw.
        jit: capture the potential and its gradient as one simplified graph
            (:func:`~bmm_ppl.inference.program.potential.compiled_potential_and_grad`), and each step of the tree
            (a leaf with its leapfrog step, a merge, the opening of a subtree) with it
            (:class:`~bmm_ppl.inference.hmc.nuts_kernel.NUTSKernel`). Recording refuses Python control
            flow on latent values, and every graph must reproduce its eager counterpart on a probe; where
            capture fails the sampler runs eagerly. ``diagnostics["jit"]``: ``"kernel"`` (all captured),
            ``"graph"`` (the potential only) or ``"none"``. About seven times faster on the CPU (logistic
            regression, 31 coefficients: 8.4 s against 60 s eager). The model's Python code
            runs only while recording (side effects happen once); ``False`` runs eagerly.
        step_size: the initial step size (``None``: found heuristically).
        adapt_step_size: switch the dual-averaging step-size adaptation.
        adapt_mass_matrix: switch the mass-matrix adaptation.
        dense_mass: adapt a dense inverse mass matrix (the covariance of each window's warm-up draws,
            its correlations shrunk toward zero by the Schafer-Strimmer intensity so that short windows give
            a nearly diagonal metric, then regularised as Stan does:
            :func:`~bmm_ppl.inference.hmc.adaptation.shrunk_covariance`;
            ``diagnostics["inverse_mass_matrix"]: Tensor[C, D, D]``) instead of a diagonal one: far fewer
            leapfrog steps per draw on strongly correlated posteriors, at O(D^2) per step.
        evidence: ``"bridge"`` to attach a bridge-sampling log evidence
            (:func:`~bmm_ppl.inference.bridge.bridge_sampling`), so that ``compare`` can rank sampled models;
            ``None`` (default) for none.
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm bar.

    Post-warm-up divergences are counted in ``sample_stats["diverging"]`` and ``diagnostics`` and raise
    a :class:`DivergentTransitionWarning`.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 0.5))
        >>> post = NUTS(num_samples=1000, warmup_steps=200, num_chains=2, progress=False).fit(model)
        >>> post.draws()["s"].shape, post.sample_stats["diverging"].shape, post.diagnostics["max_r_hat"] < 1.01
        (torch.Size([2, 1000]), torch.Size([2, 1000]), True)
    """

    engine_name = "NUTS"

    def __init__(self, num_samples: int = 1000, warmup_steps: int = 500, num_chains: int = 1,
                 target_accept_prob: float = 0.8, max_tree_depth: int = 10, jit: bool = True,
                 step_size: float | None = None, adapt_step_size: bool = True, adapt_mass_matrix: bool = True,
                 init_radius: float = 2.0, evidence: str | None = None, dense_mass: bool = False, device=None,
                 progress: bool = True):
        super().__init__(num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                         target_accept_prob=target_accept_prob, step_size=step_size, adapt_step_size=adapt_step_size,
                         adapt_mass_matrix=adapt_mass_matrix, jit=jit, init_radius=init_radius, device=device,
                         progress=progress, evidence=evidence, dense_mass=dense_mass)
        self.max_tree_depth = _check_int("max_tree_depth", max_tree_depth, 1)

    def _kernel(self, potential_and_grad, functional_potential_and_grad):
        kernel = NUTSKernel(potential_and_grad, self.max_tree_depth, functional_potential_and_grad)
        return kernel.step, kernel.compile


class HMC(_Hamiltonian):
    """Hamiltonian Monte Carlo with a jittered trajectory length, batched over chains.

    Each transition integrates for a trajectory of length ``trajectory_length`` (in the units that the
    adapted metric whitens, where the posterior's scale is about 1), jittered per chain and transition by
    a uniform factor in [0.5, 1.5] so that no trajectory stays near a period of the dynamics (a fixed length
    can return a Gaussian coordinate almost to where it started, every time). The number of leapfrog steps
    follows the step size: ``ceil(length / step_size)``, at most ``max_num_steps``. With ``num_steps``
    given, that many steps (jittered by the same factor) are taken instead, whatever the step size.

    After sampling, a trajectory far shorter than the posterior's scale (the mean trajectory under a
    quarter of the largest posterior sd in the metric's units, that sd read off the draws' gradients:
    ``diagnostics["curvature_scale"]``, ``sqrt(Var(z) / Cov(z, dU/dz))`` per chain and coordinate, exact
    for a Gaussian posterior even where the chain has not moved; e.g. a small ``num_steps`` with
    ``adapt_mass_matrix=False`` on a wide posterior) raises a
    :class:`~bmm_ppl.inference.errors.ChainDiagnosticsWarning`, as do failed R-hat / ESS checks.

    The arguments not listed below are as for :class:`NUTS`.

    Args:
        num_steps: a fixed number of leapfrog steps per transition (jittered), or ``None`` (default) to set
            it from ``trajectory_length`` and the adapted step size.
        trajectory_length: the mean integration time in whitened units (default pi / 2: a quarter period
            of a unit Gaussian coordinate, so that successive draws are nearly independent; with the jitter
            the autocorrelation of the draws averages 0 there and that of their squares about 0.2).
        max_num_steps: the cap on leapfrog steps per transition.

    ``diagnostics["trajectory_length"]``: Tensor[C], each chain's mean ``step_size * n_steps`` after warm-up.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("m", dist.Normal(0.0, 1.0))
        >>> post = HMC(num_samples=1000, warmup_steps=200, progress=False).fit(model)
        >>> post.draws()["m"].shape, post.diagnostics["max_r_hat"] < 1.01
        (torch.Size([1, 1000]), True)
    """

    engine_name = "HMC"

    def __init__(self, num_samples: int = 1000, warmup_steps: int = 500, num_chains: int = 1,
                 target_accept_prob: float = 0.8, num_steps: int | None = None,
                 trajectory_length: float = math.pi / 2, max_num_steps: int = 1023, jit: bool = True,
                 step_size: float | None = None, adapt_step_size: bool = True, adapt_mass_matrix: bool = True,
                 init_radius: float = 2.0, evidence: str | None = None, dense_mass: bool = False, device=None,
                 progress: bool = True):
        super().__init__(num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                         target_accept_prob=target_accept_prob, step_size=step_size, adapt_step_size=adapt_step_size,
                         adapt_mass_matrix=adapt_mass_matrix, jit=jit, init_radius=init_radius, device=device,
                         progress=progress, evidence=evidence, dense_mass=dense_mass)
        self.num_steps = None if num_steps is None else _check_int("num_steps", num_steps, 1)
        if isinstance(trajectory_length, bool) or not isinstance(trajectory_length, (int, float)) or not trajectory_length > 0:
            raise ValueError(f"trajectory_length must be a positive number, got {trajectory_length!r}")
        self.trajectory_length = float(trajectory_length)
        self.max_num_steps = _check_int("max_num_steps", max_num_steps, 1)

    def _steps(self, step_size: torch.Tensor) -> torch.Tensor:
        """This transition's leapfrog steps per chain, Tensor[C]: the nominal count (fixed, or the
        trajectory length over the step size) times a uniform jitter in [0.5, 1.5], rounded up."""
        jitter = 0.5 + torch.rand_like(step_size)
        if self.num_steps is None:
            steps = torch.ceil(jitter * self.trajectory_length / step_size)
        else:
            steps = torch.ceil(jitter * self.num_steps)
        return steps.clamp(1, self.max_num_steps)

    def _kernel(self, potential_and_grad, functional_potential_and_grad):
        def transition(point, step_size, inv_mass):
            return hmc_step(point, step_size, inv_mass, potential_and_grad, self._steps(step_size))

        return transition, None

    def _loop(self, potential_and_grad, point, transition, step, inv_mass):
        draws, stats, diagnostics = super()._loop(potential_and_grad, point, transition, step, inv_mass)
        trajectory = (stats["step_size"] * stats["n_steps"]).mean(1)  # (C,) in whitened units
        diagnostics["trajectory_length"] = trajectory
        # The posterior's scale in the metric's units, per chain: the largest over coordinates of the sd
        # that the gradients' curvature implies (not the draws' spread, which a stuck chain keeps small).
        variance = diagnostics["inverse_mass_matrix_diagonal"]  # the adapted metric's diagonal, (C, D)
        scale = torch.nan_to_num(diagnostics["curvature_scale"] / variance.sqrt(), nan=0.0).amax(-1)
        diagnostics["posterior_scale_in_metric_units"] = scale
        short = trajectory < 0.25 * scale
        diagnostics["trajectory_too_short"] = bool(short.any())
        return draws, stats, diagnostics

    def _report(self, diagnostics: dict) -> None:
        if diagnostics["trajectory_too_short"]:
            ratio = diagnostics["trajectory_length"] / diagnostics["posterior_scale_in_metric_units"]
            chain = int(ratio.argmin())
            length, scale = float(diagnostics["trajectory_length"][chain]), float(diagnostics["posterior_scale_in_metric_units"][chain])
            warnings.warn(
                f"HMC: the trajectory (step_size * n_steps = {length:.3g} in the metric's units, chain {chain}) is "
                f"far shorter than the posterior's scale there (sd {scale:.3g}): the chain moves by a random walk. "
                f"Leave num_steps=None (the trajectory then follows trajectory_length), raise num_steps, or adapt "
                f"the mass matrix.",
                ChainDiagnosticsWarning,
                stacklevel=4,
            )
        super()._report(diagnostics)
