"""Stochastic variational inference with type-II learning of the model's hyperparameters."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
import torch.utils.data
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints
from tqdm.auto import tqdm

from bmm_ppl.inference.svi import core as svi_core
from bmm_ppl.inference.errors import ConvergenceWarning, DivergenceError, UnsupportedModelError
from bmm_ppl.inference.svi.convergence import (MIN_STATIONARITY_WINDOW, DegenerationMonitor, gradient_converged,
                                                loss_stationarity)
from bmm_ppl.inference.svi.guides import GuideLatents, guide_site_names, is_guide_function, is_point_mass, resolve_guide
from bmm_ppl.inference.svi.iwae import elbo_from_weights, log_importance_weights, streamed_log_importance_weights
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.program.enumeration import enumerated_sites, enumerating
from bmm_ppl.inference.program.sites import guess_max_plate_nesting, is_latent_site, prototype_trace, subsampled_plates
from bmm_ppl.inference.svi.core import Schedule
from bmm_ppl.inference.program.minibatch import DataArguments, ScaleInPlate, data_plate
from bmm_ppl.inference.svi.data import LoaderPasses, minibatches
from bmm_ppl.validation import check_tensor, prepare_data

_CHECK_EVERY = 100  # steps between divergence checks (each one synchronises with the device once)
_SUBSAMPLED_EVIDENCE_CHUNK = 20  # particles per subsample when estimating the final ELBO
_ADVICE = "Lower lr, check the data for outliers, or give the hyperparameters better initial values."
_DEFAULT_LR = {"lbfgs": 1.0}  # learning rates when lr=None; every other optimiser: 0.02
_GRADIENT_LR = 0.02
# The sample-average route: L-BFGS on the ELBO estimated with the same draws at every evaluation (common
# random numbers make it a deterministic function of the parameters). Chosen by optimizer="auto" for
# full-batch fits with reparameterised guides and at most this many parameter elements.
_SAMPLE_AVERAGE_MAX_PARAMETERS = 500
_SAMPLE_AVERAGE_PARTICLES = 256  # the draws: the guide's errors shrink as 1 / sqrt, its ELBO deficit as 1 / draws
_SAMPLE_AVERAGE_ROUNDS = 8  # fresh draws, warm-started; the optima are averaged (errors / sqrt(rounds))
_LBFGS_CHUNK = 50  # L-BFGS iterations between progress and degeneration checks
_LBFGS_RESTARTS = 5  # fresh curvature histories tried when the line search stalls short of the tolerance


_FUSED_DEVICES = ("cpu", "cuda")


def _optimizer_factory(optimizer, lr: float) -> Callable:
    if isinstance(optimizer, str):
        by_name = {name.lower(): getattr(torch.optim, name) for name in dir(torch.optim)}
        cls = by_name.get(optimizer.lower())
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or optimizer.lower() == "optimizer":
            raise ValueError(f"optimizer={optimizer!r} is not a torch.optim optimiser (e.g. 'adam', 'adamw', 'sgd')")

        def build(params):
            # Adam by name runs as one fused kernel where torch has one: same update, less per-step overhead.
            fusable = cls in (torch.optim.Adam, torch.optim.AdamW) and all(
                p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params
            )
            return cls(params, lr=lr, fused=True) if fusable else cls(params, lr=lr)

        return build
    if callable(optimizer):
        return lambda params: optimizer(params, lr=lr)
    raise TypeError("optimizer must be a torch.optim class, its name, or a callable (params, lr) -> Optimizer")


def _positive_latent_probe(guide, model_trace, args, kwargs) -> Callable | None:
    """``() -> {site: value}``: one guide draw of the model's latent sites with positive support (what
    :class:`DegenerationMonitor` watches for values running off to 0 or infinity); ``None`` if there are none."""
    positive = []
    for name, site in model_trace.nodes.items():
        if is_latent_site(site):
            support = getattr(site["fn"], "support", None)
            base = getattr(support, "base_constraint", support)
            if isinstance(base, (constraints._GreaterThan, constraints._GreaterThanEq)) and float(base.lower_bound) == 0.0:
                positive.append(name)
    if not positive:
        return None

    def probe() -> dict:
        with torch.no_grad():
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
        return {name: trace.nodes[name]["value"].detach() for name in positive if name in trace.nodes}

    return probe


def _optimizer_route(optimizer) -> str:
    """``"auto"``, ``"lbfgs"`` (the sample-average route) or ``"gradient"`` (a first-order optimiser)."""
    if isinstance(optimizer, str) and optimizer.lower() in ("auto", "lbfgs"):
        return optimizer.lower()
    if optimizer is torch.optim.LBFGS:
        return "lbfgs"
    return "gradient"


class SVI:
    """Stochastic variational inference; the model's ``pyro.param`` sites are learned by type-II (ELBO)
    maximisation together with the guide.

    Two routes maximise the ELBO. **Sample average (L-BFGS)**, the default for small full-batch problems
    (``optimizer="auto"``: at most 500 parameter elements, no ``batch_size``, a reparameterised guide,
    no explicit ``lr``):
    the ELBO is estimated with the same ``max(num_particles, 256)`` draws at every evaluation, which makes it
    a deterministic function of the parameters, and L-BFGS with a strong-Wolfe line search maximises it to
    a gradient tolerance, ``num_steps`` capping its iterations. It reaches the optimum of ill-conditioned
    problems (a cubic regression whose hyperparameters are learned) that Adam approaches only over
    tens of thousands of steps. The fixed draws leave the fitted guide's means off by about
    sd / sqrt(draws) (6% of a posterior sd), its scales by about 1 / sqrt(2 * draws), and cost an ELBO
    deficit of about (guide parameters) / (2 * draws) nats. **Stochastic gradients** (Adam,
    or any ``optimizer``): ``lr`` is kept constant for the first half of the run and decayed (cosine) to
    1% over the second; the iterates of the last ``average_fraction`` of the steps are averaged (Polyak),
    which removes most of the optimiser noise from both the guide and the hyperparameters.

    Every fit checks itself. ``diagnostics["converged"]`` says whether the convergence test passed, with
    the numbers behind it: for L-BFGS the largest gradient element against ``1e-3`` nats per unit of the
    unconstrained parameters (``grad_max``, ``grad_tol``); for stochastic gradients the drop of the
    windowed mean ``-ELBO`` between the last two quarters of the run against two standard errors of the
    ELBO noise plus ``1e-3`` of its size (``loss_change``, ``loss_noise``, ``tolerance``). A fit that fails
    its test issues a :class:`~bmm_ppl.inference.ConvergenceWarning` naming what to change. A fit that
    degenerates (a NaN, a scale parameter moving more than 1e9-fold from its start, ``-ELBO`` rising
    to ten times its best size) raises :class:`~bmm_ppl.inference.DivergenceError`.

    After training, the ELBO is re-estimated with ``evidence_particles`` fresh draws and reported as
    ``post.log_evidence`` (``method="elbo"``, a lower bound, with its Monte-Carlo stderr);
    :func:`~bmm_ppl.inference.iwae_bound` gives the tighter importance-weighted bound.

    Args:
        guide: ``"normal"`` (mean field), ``"mvn"`` (full rank), ``"lowrank"``, ``"delta"`` (MAP: no
            evidence), a Pyro ``AutoGuide`` class or instance, or a guide function.
        num_steps: optimisation steps (L-BFGS: the cap on its iterations; with ``until_converged``, the cap
            on the steps).
        lr: the learning rate before decay; ``None``: 0.02 for first-order optimisers, 1 for L-BFGS (its
            line search scales the step). An explicit ``lr`` with ``optimizer="auto"`` selects Adam.
        optimizer: ``"auto"`` (L-BFGS on the sample-average ELBO for small full-batch problems when ``lr``
            is not given, else Adam), ``"lbfgs"`` (that route, refused where it does not apply), a
            ``torch.optim`` class, its name (``"adam"``), or ``(params, lr) -> Optimizer``.
            ``diagnostics["optimizer"]`` says which ran.
        num_particles: ELBO particles per step (vectorised over an outer plate).
        batch_size: minibatch size: every tensor argument is subsampled along its first dimension (they
            must share it), and the sites in the model's data plate are scaled by ``n / batch_size``.
            ``None``: full batch.
        schedule: ``"cosine"`` (decay over the second half) or ``"constant"``.
        average_fraction: the final fraction of steps whose iterates are averaged (0 turns it off).
        evidence_particles: draws for the final ELBO estimate.
        until_converged: stochastic gradients only: hold ``lr`` until the windowed ELBO test passes (tested
            every ``num_steps // 20`` steps, at least 50), then decay and average over as many steps again;
            ``num_steps`` is the cap. L-BFGS always stops when converged.
        jit: after the first step, capture the ELBO and its gradients as one simplified graph
            (:func:`~bmm_ppl.inference.svi.core.compile_loss_and_gradients`; recording refuses Python
            control flow on traced values, and the graph must reproduce the eager loss and gradients);
            where it cannot (``pyro.module`` parameters, value-dependent control flow, a DataLoader's
            varying batches) the steps run eagerly. ``diagnostics["jit"]`` says which ran (``"graph"`` or
            ``"none"``). About twelve times faster per step on small models (logistic regression: 270 µs
            against 3.4 ms). The model's Python code runs only
            while recording, so side effects (counters, printing) happen once; ``False`` always runs eagerly.
        device: move the data here first (``None``: follow the data).
        progress: show a tqdm progress bar.

    Examples:
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> x = torch.linspace(-1, 1, 20, dtype=torch.float64); y = 2 * x + 0.1 * torch.cos(9 * x)
        >>> post = SVI("mvn", num_steps=100, evidence_particles=500, progress=False).fit(
        ...     BayesianLinearRegression(polynomial_features(1)), x, y)
        >>> post.log_evidence.method, sorted(post.hyperparameters)
        (<EvidenceMethod.ELBO: 'elbo'>, ['alpha', 'beta'])
    """

    def __init__(
        self,
        guide="normal",
        num_steps: int = 3000,
        lr: float | None = None,
        optimizer="auto",
        num_particles: int = 1,
        batch_size: int | None = None,
        schedule: str | Schedule = Schedule.COSINE,
        average_fraction: float = 0.25,
        evidence_particles: int = 4000,
        until_converged: bool = False,
        jit: bool = True,
        device=None,
        progress: bool = True,
    ):
        for name, value in (("num_steps", num_steps), ("num_particles", num_particles), ("evidence_particles", evidence_particles)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be positive or None, got {lr!r}")
        if not 0 <= average_fraction < 1:
            raise ValueError(f"average_fraction must lie in [0, 1), got {average_fraction!r}")
        self.guide = guide
        self.num_steps = int(num_steps)
        self.lr = None if lr is None else float(lr)
        self.optimizer = optimizer
        self._route = _optimizer_route(optimizer)
        gradient_optimizer = "adam" if self._route != "gradient" else optimizer
        self._make_optimizer = _optimizer_factory(gradient_optimizer, _GRADIENT_LR if self.lr is None else self.lr)
        self.until_converged = bool(until_converged)
        self.num_particles = int(num_particles)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.schedule = Schedule.parse(schedule, "schedule")
        self.average_fraction = float(average_fraction)
        self.evidence_particles = int(evidence_particles)
        self.jit = bool(jit)
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    # ----------------------------------------------------------------- checks
    def _checked_data(self, args: tuple, kwargs: dict) -> DataArguments:
        data = DataArguments(*prepare_data(args, kwargs, self.device))
        named = data.named()
        if self.batch_size is not None:
            lengths = {name: (value.shape[0] if value.dim() else None) for name, value in named.items()}
            if not lengths or None in lengths.values() or len(set(lengths.values())) != 1:
                raise ValueError(
                    f"batch_size={self.batch_size} subsamples every tensor argument along its first dimension, "
                    f"so they must all have one and share it; got lengths {lengths}"
                )
            num_data = next(iter(lengths.values()))
            if self.batch_size > num_data:
                raise ValueError(f"batch_size={self.batch_size} is larger than the data ({num_data} rows)")
        return data

    @staticmethod
    def _structure(model, guide, args, kwargs, enumerated=()):
        """Runs guide and model once: plate depth, latent site shapes, model params; checks the guide."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        latent, missing = {}, []
        for name, site in model_trace.nodes.items():
            if not is_latent_site(site) or name in enumerated:
                continue
            latent[name] = tuple(site["value"].shape)
            if name not in guide_trace.nodes:
                missing.append(name)
        if missing:
            raise ValueError(
                f"the guide does not sample the model's latent site(s) {missing}: every latent site needs a "
                f"guide site of the same name (autoguides cover them all)"
            )
        model_params = [n for n, s in model_trace.nodes.items() if s["type"] == "param"]
        return guess_max_plate_nesting(model_trace, guide_trace), latent, model_params, model_trace

    # -------------------------------------------------------------------- fit
    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Fits the guide and the model's ``pyro.param`` hyperparameters to ``model(*args, **kwargs)``.

        ``model(loader)`` with a ``torch.utils.data.DataLoader`` as the only argument streams the data:
        each batch (a tensor or a tuple of tensors) is one call's arguments, the data-plate sites are
        scaled by ``len(loader.dataset) / len(batch)``, and the final ELBO is summed over one pass.
        The guide must then hold global latents only, and the returned posterior keeps no data
        (``predict`` needs explicit arguments).

        Returns:
            a :class:`Posterior` drawing from the fitted guide, with ``log_evidence`` the ELBO
            (``None`` for a point-mass guide), ``hyperparameters`` the model's learned params (constrained
            values), ``loss_trace`` of ``-ELBO`` per step (per objective evaluation for L-BFGS), and
            ``diagnostics`` with ``converged`` and the numbers behind it (see the class docstring).

        Raises:
            DivergenceError: the ELBO became NaN or infinite, fell far below its best value, or a scale
                parameter collapsed or exploded; the message names the step.
            ValueError: bad data, or a guide that misses a latent site.

        Warns:
            ConvergenceWarning: the convergence test failed; the message names what to change.
        """
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.utils.data.DataLoader):
            return self._fit_stream(model, args[0])
        data = self._checked_data(args, kwargs)
        args, kwargs = data.args, data.kwargs
        # Discrete sites of finite support are summed out of the ELBO; the guide covers the rest.
        enumerated = enumerated_sites(model, args, kwargs)
        if enumerated and is_guide_function(self.guide):
            # a guide of the user's that samples a discrete site keeps it (score-function gradients)
            enumerated = tuple(n for n in enumerated if n not in guide_site_names(self.guide, args, kwargs))
        guide = resolve_guide(self.guide, poutine.block(model, hide=list(enumerated)) if enumerated else model)
        device = data.tensors[0].device if data.tensors else self.device
        with pyro.get_param_store().scope() as param_state:
            nesting, latent_shapes, model_params, model_trace = self._structure(model, guide, args, kwargs, enumerated)
            elbo_model = enumerating(model, nesting, extra_dims=1) if enumerated else model
            train_model, batches = elbo_model, None
            if self.batch_size is not None:
                num_data = data.tensors[0].shape[0]
                plate = data_plate(model_trace, num_data)
                train_model = ScaleInPlate(plate, num_data / self.batch_size)(elbo_model)
                batches = minibatches(num_data, self.batch_size, device)

            vectorise = [None]  # decided once the guide's parameters exist (the probe creates none)

            def objective(*tensors, num_particles=self.num_particles):
                a, k = data.rebuild(tensors)
                return svi_core.elbo_loss(train_model, guide, a, k, num_particles, nesting, device, vectorise[0])

            def next_inputs():
                if batches is None:
                    return data.tensors
                index = next(batches)
                return tuple(t.index_select(0, index) for t in data.tensors)

            first = next_inputs()
            state = svi_core.init(svi_core.collect_params(lambda: objective(*first)), self._make_optimizer)
            vectorise[0] = svi_core.vectorises_over_particles(train_model, guide, *data.rebuild(first), nesting, device)
            modules = tuple(m for m in (guide, model) if isinstance(m, torch.nn.Module))
            route = self._choose_route(state, model, guide, args, kwargs, vectorise[0])
            probe = _positive_latent_probe(guide, model_trace, args, kwargs)
            loss_trace, jit_kind, report = self._train(state, objective, next_inputs, first, modules, route=route, probe=probe)
            hyperparameters = {name: pyro.param(name).detach().clone() for name in model_params}
            log_evidence, evidence_diagnostics = self._evidence(elbo_model, guide, args, kwargs, nesting, device, vectorise[0])
        latents = GuideLatents(guide, args, kwargs, param_state, latent_shapes, nesting,
                               discrete=(model, enumerated) if enumerated else None)
        self._warn_unless_converged(report)
        diagnostics = {
            **report,
            "final_loss": float(loss_trace[-min(100, loss_trace.shape[0]) :].mean()),
            "guide": type(guide).__name__ if isinstance(guide, torch.nn.Module) else getattr(guide, "__name__", "guide"),
            "jit": jit_kind,
            "vectorised_particles": vectorise[0],
            **evidence_diagnostics,
        }
        return Posterior(
            model, args, kwargs, latent_distribution=latents, log_evidence=log_evidence,
            hyperparameters=hyperparameters, loss_trace=loss_trace, diagnostics=diagnostics, engine="SVI",
        )

    def _fit_stream(self, model: Callable, loader) -> Posterior:
        if self.batch_size is not None:
            raise ValueError("batch_size subsamples in-memory data; a DataLoader brings its own batches")
        num_data = len(loader.dataset)
        move = (lambda t: t.to(self.device)) if self.device is not None else (lambda t: t)

        def as_args(batch) -> tuple:
            batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            return tuple(move(t) if isinstance(t, torch.Tensor) else t for t in batch)

        def endless():
            while True:
                yield from (as_args(b) for b in loader)

        stream = endless()
        first = next(stream)
        for i, value in enumerate(first):
            if isinstance(value, torch.Tensor):
                check_tensor(f"batch argument {i}", value)
        enumerated = enumerated_sites(model, first, {})
        if enumerated:
            raise UnsupportedModelError(
                f"streaming from a DataLoader does not enumerate discrete sites ({list(enumerated)}); pass the data as tensors"
            )
        guide = resolve_guide(self.guide, model)
        device = next((t.device for t in first if isinstance(t, torch.Tensor)), self.device)
        with pyro.get_param_store().scope() as param_state:
            nesting, latent_shapes, model_params, model_trace = self._structure(model, guide, first, {})
            batch_length = next(t.shape[0] for t in first if isinstance(t, torch.Tensor))
            plate = data_plate(model_trace, batch_length)
            local = [n for n in latent_shapes if any(f.name == plate for f in model_trace.nodes[n]["cond_indep_stack"])]
            if local:
                raise UnsupportedModelError(f"streaming from a DataLoader needs global latents only; {local} are local")

            def objective(*batch):
                length = next(t.shape[0] for t in batch if isinstance(t, torch.Tensor))
                scaled = ScaleInPlate(plate, num_data / length)(model)
                return svi_core.elbo_loss(scaled, guide, batch, {}, self.num_particles, nesting, device)

            state = svi_core.init(svi_core.collect_params(lambda: objective(*first)), self._make_optimizer)
            loss_trace, _, report = self._train(state, objective, lambda: next(stream), first, capture=False)
            hyperparameters = {name: pyro.param(name).detach().clone() for name in model_params}
            if is_point_mass(guide):
                log_evidence, evidence_diagnostics = None, {"evidence": "a point-mass guide (AutoDelta) gives no evidence bound"}
            else:
                passes = LoaderPasses(loader, as_args)
                log_w = streamed_log_importance_weights(model, guide, passes, plate, self.evidence_particles, nesting, device=device)
                log_evidence, evidence_diagnostics = elbo_from_weights(log_w), {"evidence_particles": self.evidence_particles}
        latents = GuideLatents(guide, first, {}, param_state, latent_shapes, nesting)
        self._warn_unless_converged(report)
        diagnostics = {**report, "num_data": num_data, "streamed": True, **evidence_diagnostics}
        return Posterior(
            model, (), {}, latent_distribution=latents, log_evidence=log_evidence, hyperparameters=hyperparameters,
            loss_trace=loss_trace, diagnostics=diagnostics, engine="SVI",
        )

    def _choose_route(self, state, model, guide, args, kwargs, vectorised: bool = True) -> str:
        """``"lbfgs"`` (sample-average L-BFGS) or ``"gradient"`` for an in-memory fit (see the class docstring)."""
        if self._route == "gradient":
            return "gradient"
        reasons = []
        if not vectorised and self._route != "lbfgs":
            # the sample average needs hundreds of particles per evaluation: one run each is too slow
            reasons.append("the program does not broadcast over a particle dimension")
        if self.batch_size is not None:
            reasons.append("batch_size gives a different objective at every step")
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        fixed = [
            name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not getattr(site["fn"], "has_rsample", False)
        ]
        if fixed:
            reasons.append(f"the guide's site(s) {fixed} cannot be reparameterised")
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        subsampled = sorted({
            name for trace in (guide_trace, model_trace) for name, site in trace.nodes.items()
            if site["type"] == "sample" and site_is_subsample(site) and site["value"].numel() < site["fn"].size
        })
        if subsampled:
            reasons.append(f"the plate(s) {subsampled} subsample the data: a different objective at every step")
        if self._route == "lbfgs":
            if reasons:
                raise ValueError(f"optimizer='lbfgs' needs a deterministic sample-average objective, but {'; '.join(reasons)}")
            return "lbfgs"
        size = sum(p.numel() for p in state.params)
        # an explicit lr is a first-order step size: it selects the stochastic-gradient route
        return "gradient" if reasons or self.lr is not None or size > _SAMPLE_AVERAGE_MAX_PARAMETERS else "lbfgs"

    def _train(self, state, objective, next_inputs, first_inputs, modules=(), capture=True, route="gradient", probe=None):
        """Runs the chosen optimiser.

        Returns:
            ``(losses, jit_kind, report)``: ``losses`` Tensor[steps] of ``-ELBO`` (per objective evaluation
            for L-BFGS), ``jit_kind`` ``"graph"`` or ``"none"``, and ``report`` the convergence test's
            verdict and numbers (merged into ``diagnostics``).
        """
        if route == "lbfgs":
            return self._train_sample_average(state, objective, first_inputs, modules, probe)
        if self._route == "lbfgs":
            raise ValueError("optimizer='lbfgs' needs in-memory full-batch data; a DataLoader gives a different objective at every step")
        base_lr = _GRADIENT_LR if self.lr is None else self.lr
        monitor = DegenerationMonitor(state.names, _ADVICE, probe)
        cap = horizon = self.num_steps  # horizon: the schedule's length (until_converged shortens it)
        test_window = max(50, cap // 20)
        stationary = None  # the until_converged test that passed
        run = objective
        jit_kind = "none"
        captured = None  # jit: loss and gradients as one graph, f(*inputs) -> (loss, *grads)
        losses = None
        last_checked = 0
        with tqdm(total=cap, disable=not self.progress, desc="SVI", leave=False) as bar:
            i = 0
            while i < horizon:
                inputs = first_inputs if i == 0 else next_inputs()
                lr = svi_core.learning_rate(i, horizon, base_lr, self.schedule)
                average = i >= horizon - int(round(self.average_fraction * horizon))
                try:
                    if captured is not None:
                        state, info = svi_core.step_with_gradients(state, lambda: captured(*inputs), lr, average)
                    else:
                        state, info = svi_core.step(state, lambda: run(*inputs), lr, average)
                except ValueError as error:
                    # The model ran at step 0; when Pyro's argument validation rejects it later, the
                    # parameters (or their constrained values) have run off to NaN or infinity.
                    if i == 0 or "invalid values" not in str(error):
                        raise
                    raise DivergenceError(
                        f"the ELBO diverged at step {i}: the parameters reached invalid values. {_ADVICE}"
                    ) from error
                if losses is None:
                    losses = info["loss"].new_empty(cap)
                    if self.jit and capture:
                        captured = self._capture(objective, state, inputs, modules)
                        jit_kind = "graph" if captured is not None else "none"
                losses[i] = info["loss"]
                i += 1
                if i % _CHECK_EVERY == 0 or i == horizon:
                    self._check_divergence(monitor, losses, last_checked, i, state)
                    bar.update(i - last_checked)
                    bar.set_postfix(loss=f"{float(losses[i - 1]):.4g}")
                    last_checked = i
                if self.until_converged and stationary is None and i % test_window == 0 and i <= horizon // 2:
                    test = loss_stationarity(losses[:i], test_window)
                    if test["converged"]:
                        stationary, horizon = test, min(cap, 2 * i)
        svi_core.finalize(state)
        monitor.check_scales(horizon)
        losses = losses[:horizon].detach()
        if stationary is not None:
            test = {**stationary, "converged_at": horizon // 2}
        else:
            test = loss_stationarity(losses, horizon // 4)
        report = {"optimizer": self._optimizer_name(), "num_steps": horizon, **test}
        return losses, jit_kind, report

    def _optimizer_name(self) -> str:
        if self._route != "gradient":
            return "adam"
        if isinstance(self.optimizer, str):
            return self.optimizer.lower()
        return getattr(self.optimizer, "__name__", type(self.optimizer).__name__).lower()

    def _train_sample_average(self, state, objective, inputs, modules, probe=None):
        """L-BFGS on the ELBO estimated with one fixed set of draws (the same seed at every evaluation), to
        its gradient tolerance; then again, warm-started, on fresh draws for each further round. The
        parameters are averaged over the rounds' optima, which divides the error due to the fixed draws
        by sqrt(rounds)."""
        particles = max(self.num_particles, _SAMPLE_AVERAGE_PARTICLES)
        fixed_draws = functools.partial(objective, num_particles=particles)
        params = list(state.params)
        device, dtype = params[0].device, params[0].dtype
        monitor = DegenerationMonitor(state.names, _ADVICE + " Or try optimizer='adam'.", probe)
        captured = self._capture(fixed_draws, state, inputs, modules) if self.jit else None
        losses: list[torch.Tensor] = []
        seed = [0]

        def evaluate():
            torch.manual_seed(seed[0])
            try:
                if captured is not None:
                    loss, *gradients = captured(*inputs)
                    for param, gradient in zip(params, gradients):
                        param.grad = gradient
                else:
                    for param in params:
                        param.grad = None
                    loss = fixed_draws(*inputs)
                    loss.backward()
            except ValueError as error:
                if not losses or "invalid values" not in str(error):
                    raise
                raise DivergenceError(
                    f"the ELBO diverged at evaluation {len(losses)}: the parameters reached invalid values. "
                    f"{monitor.advice}"
                ) from error
            losses.append(loss.detach())
            return losses[-1]  # L-BFGS reads the value; the gradients are in .grad

        def lbfgs():
            return torch.optim.LBFGS(
                params, lr=_DEFAULT_LR["lbfgs"] if self.lr is None else self.lr, max_iter=_LBFGS_CHUNK,
                max_eval=25 * _LBFGS_CHUNK,
                tolerance_change=torch.finfo(dtype).eps,  # a step or a change below resolution: stalled
                history_size=20, line_search_fn="strong_wolfe",
            )

        checked = [0]

        optimizer = lbfgs()

        def solve(budget: int, bar) -> tuple[int, str, int]:
            """L-BFGS on the current draws: (iterations, why it stopped, restarts)."""
            nonlocal optimizer
            restarts, iterations = 0, 0
            history = optimizer.state[params[0]]
            if "prev_flat_grad" in history:
                # new draws, warm start: keep the curvature pairs (the Hessian hardly depends on the draws)
                # but not a pair across draws; L-BFGS skips the pair whose gradient change is zero
                history["prev_flat_grad"] = torch.cat([p.grad.reshape(-1) for p in params])
                history["prev_loss"] = float(losses[-1])
            while iterations < budget:
                chunk = min(_LBFGS_CHUNK, budget - iterations)
                optimizer.param_groups[0]["max_iter"] = chunk
                optimizer.param_groups[0]["tolerance_grad"] = gradient_converged([], float(losses[-1]), dtype)["grad_tol"]
                before = optimizer.state[params[0]].get("n_iter", 0)
                optimizer.step(evaluate)
                ran = optimizer.state[params[0]].get("n_iter", 0) - before
                iterations += ran
                window = torch.stack(losses[checked[0]:])
                # trial points of the line search may be infinite; the iterates it accepts are not
                self._check_divergence(monitor, window[torch.isfinite(window)], 0, None, state)
                checked[0] = len(losses)
                bar.update(ran)
                bar.set_postfix(loss=f"{float(losses[-1]):.4g}")
                if ran < chunk:  # stopped by a tolerance: converged, or stalled in the line search
                    evaluate()
                    if gradient_converged([p.grad for p in params], float(losses[-1]))["converged"]:
                        return iterations, "tolerance", restarts
                    if restarts == _LBFGS_RESTARTS:
                        return iterations, "stalled", restarts
                    # a stale curvature history (in low precision, mostly) stalls the line search
                    optimizer, restarts = lbfgs(), restarts + 1
            return iterations, "num_steps", restarts

        rounds, iterations, restarts, stopped, worst = 0, 0, 0, "num_steps", {"grad_max": -1.0}
        average = None
        # the rounds' seeds follow torch.manual_seed; the global generators are restored after the fit
        seeds = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), device="cpu")))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                tqdm(total=self.num_steps, disable=not self.progress, desc="SVI (L-BFGS)", leave=False) as bar:
            while rounds < _SAMPLE_AVERAGE_ROUNDS and iterations < self.num_steps:
                seed[0] = int(torch.randint(0, 2**62, (), device="cpu", generator=seeds))
                first_loss = float(evaluate())
                if not math.isfinite(first_loss):
                    raise DivergenceError(f"the ELBO is {-first_loss} at the {'initial' if not rounds else 'fitted'} parameters. {monitor.advice}")
                ran, stopped, again = solve(self.num_steps - iterations, bar)
                iterations, restarts, rounds = iterations + ran, restarts + again, rounds + 1
                final_loss = float(evaluate())  # the loss and gradient at this round's optimum
                test = gradient_converged([p.grad for p in params], final_loss)
                if not math.isfinite(final_loss):
                    raise DivergenceError(f"the ELBO diverged: it is {-final_loss} at the fitted parameters. {monitor.advice}")
                if test["grad_max"] > worst["grad_max"]:
                    worst = test
                with torch.no_grad():
                    if average is None:
                        average = [p.detach().clone() for p in params]
                    else:
                        torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 / rounds)
                if stopped != "tolerance":
                    break
            with torch.no_grad():
                for param, mean in zip(params, average):
                    param.copy_(mean)
        for param in params:
            param.grad = None
        self._check_divergence(monitor, torch.stack(losses[-1:]), 0, None, state)
        report = {
            "optimizer": "lbfgs", "num_steps": iterations, "evaluations": len(losses), "stopped": stopped,
            "restarts": restarts, "sample_average_particles": particles, "sample_average_rounds": rounds,
            **worst,
        }
        return torch.stack(losses), "graph" if captured is not None else "none", report

    def _capture(self, objective, state, inputs, modules):
        if self.batch_size is None:  # full batch: the data are constants of the graph
            captured = svi_core.compile_loss_and_gradients(lambda: objective(*inputs), state, (), modules)
            return None if captured is None else (lambda *_: captured())
        return svi_core.compile_loss_and_gradients(objective, state, inputs, modules)

    @staticmethod
    def _check_divergence(monitor: DegenerationMonitor, losses: torch.Tensor, start: int, stop: int, state) -> None:
        """Raises :class:`DivergenceError` for a non-finite or degenerated loss in ``losses[start:stop]``, a
        non-finite parameter, or a collapsed or exploded scale (one synchronisation per check)."""
        stop = losses.shape[0] if stop is None else stop
        monitor.check_losses(losses[start:stop], stop - 1)
        if not all(bool(torch.isfinite(p).all()) for p in state.params):
            raise DivergenceError(f"the ELBO diverged: a parameter became NaN or infinite by step {stop - 1}. {monitor.advice}")
        monitor.check_scales(stop - 1)

    def _warn_unless_converged(self, report: dict) -> None:
        """Issues a :class:`ConvergenceWarning` naming what to change when the convergence test failed."""
        if report.get("converged", True):
            return
        if report["optimizer"] == "lbfgs":
            if report["stopped"] == "num_steps":
                advice = f"raise num_steps (now {self.num_steps}, the cap on L-BFGS iterations)"
            else:
                advice = "L-BFGS stalled in its line search: try optimizer='adam' with more num_steps, or rescale the data"
            message = (
                f"SVI did not converge: the largest gradient element is {report['grad_max']:.3g} after "
                f"{report['num_steps']} L-BFGS iterations (tolerance {report['grad_tol']:.3g}); {advice}."
            )
        else:
            change = report["loss_change"]
            lr = _GRADIENT_LR if self.lr is None else self.lr
            detail = (
                f"only {report['num_steps']} steps ran, too few to test (the test compares two windows of at least "
                f"{MIN_STATIONARITY_WINDOW} steps)" if not math.isfinite(change) else
                f"-ELBO still fell by {change:.4g} between the last two windows of {report['window']} steps "
                f"(noise {report['loss_noise']:.3g}, tolerance {report['tolerance']:.3g})"
            )
            message = (
                f"SVI did not converge: {detail}. Raise num_steps (now {self.num_steps}), pass "
                f"until_converged=True, or change lr (now {lr:g}; larger moves faster, smaller is less noisy)"
                + ("; optimizer='auto' fits small full-batch models with L-BFGS" if self._route == "gradient" else "")
                + "."
            )
        warnings.warn(message, ConvergenceWarning, stacklevel=3)

    def _evidence(self, model, guide, args, kwargs, nesting, device, vectorise=None):
        if is_point_mass(guide):
            return None, {"evidence": "a point-mass guide (AutoDelta) gives no evidence bound"}
        subsampled = subsampled_plates(prototype_trace(model, args, kwargs))
        # A subsampled plate draws one subsample per vectorised chunk: many small chunks average the
        # subsampling noise out, and the stderr comes from the chunks' means (their weights are correlated).
        chunk = _SUBSAMPLED_EVIDENCE_CHUNK if subsampled else 1000
        log_w = log_importance_weights(model, guide, args, kwargs, self.evidence_particles, nesting, chunk, device=device,
                                       vectorise=vectorise)
        if not torch.isfinite(log_w).all():
            raise DivergenceError("the fitted guide gives non-finite importance weights: the final ELBO is undefined")
        evidence = elbo_from_weights(log_w)
        if subsampled:
            usable = log_w[: log_w.numel() // chunk * chunk].reshape(-1, chunk).mean(1)
            stderr = float(usable.std() / usable.numel() ** 0.5) if usable.numel() > 1 else None
            evidence = Evidence(evidence.value, stderr, evidence.method)
        return evidence, {"evidence_particles": self.evidence_particles, "subsampled_plates": subsampled}

    def __repr__(self) -> str:
        return (
            f"SVI(guide={self.guide!r}, num_steps={self.num_steps}, lr={self.lr}, optimizer={self.optimizer!r}, "
            f"num_particles={self.num_particles}, batch_size={self.batch_size})"
        )
