"""The Laplace engine: a Gaussian at the mode of the log joint with the curvature's inverse as covariance,
and the Laplace evidence, for Pyro programs with Gaussian priors (Bayesian neural networks, regression).

Type-II hyperparameters (the model's ``pyro.param`` sites: prior scales, observation noise) are set by
maximising the Laplace evidence, alternating with the mode (MacKay's iteration; Immer et al. 2021,
Algorithm 1, run to convergence on full-batch data): at the fixed point the hyperparameters maximise the
evidence with the mode held fixed, which for a model whose log joint is quadratic in the weights is the
exact type-II optimum.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import transform_to
from tqdm.auto import tqdm

from bmm_ppl.inference.errors import ConvergenceWarning, DivergenceError, UnsupportedModelError
from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.laplace import curvature as kernels
from bmm_ppl.inference.laplace import kfac
from bmm_ppl.inference.laplace.precision import (BlockPrecision, DensePrecision, DiagonalPrecision, KroneckerFactors,
                                                 PosteriorPrecision)
from bmm_ppl.inference.laplace.structures import Curvature, HessianStructure, KFACApproximation
from bmm_ppl.inference.latents import split_sites
from bmm_ppl.inference.optimisation import backing_off_closure
from bmm_ppl.inference.posterior import Posterior
from bmm_ppl.inference.program.functional_density import PyroDensity
from bmm_ppl.inference.program.log_density import site_log_prob
from bmm_ppl.inference.program.minibatch import data_plate
from bmm_ppl.inference.program.outputs import choose_output_site
from bmm_ppl.inference.program.sites import is_latent_site, is_module_parameter, prototype_trace, subsampled_plates
from bmm_ppl.validation import prepare_data

_MODE_RESTARTS = 3
_NEWTON_STEPS = 3


# Wrappers that leave the variable itself unchanged (its value is the base distribution's value). A
# TransformedDistribution (LogNormal, a Normal pushed through a bijection) also has a ``base_dist`` but its
# value is a transform of the base draw: not a Gaussian prior, and the Gaussian would sit on the wrong scale.
_VALUE_PRESERVING_WRAPPERS = (torch.distributions.Independent, MaskedDistribution, ExpandedDistribution)


def _unwrapped_prior(fn):
    """The distribution under ``Independent`` / masked / expanded wrappers (a ``Normal`` for a Gaussian prior)."""
    while isinstance(fn, _VALUE_PRESERVING_WRAPPERS):
        fn = fn.base_dist
    return fn


def _check_program(trace) -> None:
    """Refuses, by site, what the Laplace engine cannot do, before any work."""
    plates = subsampled_plates(trace)
    if plates:
        raise UnsupportedModelError(
            f"Laplace needs the curvature of the whole data set, but the plate(s) {plates} subsample it "
            "(subsample_size): remove the subsampling"
        )
    for name, site in trace.nodes.items():
        if site["type"] == "param" and is_module_parameter(name):
            raise UnsupportedModelError(
                f"Laplace approximates the posterior of sample sites, but {name!r} is a parameter of an "
                "nn.Module registered with pyro.module: give the weights priors (BayesianNeuralNetwork does)"
            )
        if not is_latent_site(site):
            continue
        if site["fn"].support.is_discrete:
            raise UnsupportedModelError(f"Laplace needs continuous latents; site {name!r} is discrete ({type(site['fn']).__name__})")
        prior = _unwrapped_prior(site["fn"])
        if not isinstance(prior, dist.Normal):
            raise UnsupportedModelError(
                f"Laplace here needs a Gaussian (Normal) prior on every latent site; site {name!r} has "
                f"{type(prior).__name__}: reparameterise it as a Normal, or use NUTS or SVI"
            )


class Laplace:
    """The Laplace approximation and its evidence for a Pyro program with Gaussian priors.

    The mode ``theta*`` of ``log p(y, theta)`` is found by L-BFGS (to a gradient tolerance, checked);
    the posterior is ``N(theta*, H^-1)`` with ``H`` the curvature of the log-likelihood plus the prior
    precision, and ``log p(y) ~= log p(y, theta*) + P/2 log 2 pi - 1/2 log det H``, an
    ``Evidence(method="laplace")``. With a generalised Gauss-Newton curvature the observations'
    parameters must be recorded as the model's output with ``pyro.deterministic`` (as
    :class:`~bmm_ppl.models.BayesianNeuralNetwork` records ``"logits"``); the likelihood's Hessian in
    that output is taken by automatic differentiation, so any observation distribution works (Normal,
    Bernoulli, Categorical, Poisson, ...). The model's ``pyro.param`` sites are type-II hyperparameters,
    set by maximising the Laplace evidence (see the module docstring).

    **Predictions.** ``Posterior.predict`` runs the network at weights drawn from ``N(theta*, H^-1)`` (the
    "NN sampling" predictive). For a GGN Laplace on a network this underfits badly: draws move along
    directions the data do not constrain, where the network is far from linear (Immer, Korzepa & Bauer
    2021, "Improving predictions of Bayesian neural nets via local linearization"). Use the linearised
    (GLM) predictive they recommend, :func:`~bmm_ppl.inference.laplace.linearised_predictive` (the
    output's mean and covariance at new inputs; :func:`~bmm_ppl.inference.laplace.probit_probabilities`
    for classes).

    **Structures.** ``hessian="full"`` (exact for the curvature), ``"diag"``, or ``"kron"``: KFAC, each
    linear layer's weight (a site passed to ``F.linear``, as ``nn.Linear`` under ``functional_call`` does,
    or ``x @ w``) Kronecker-factored, biases and any other site as exact dense blocks (see
    :mod:`~bmm_ppl.inference.laplace.kfac`; weights shared over a dimension by ``kfac="expand"`` or
    ``"reduce"``). ``subset=[site, ...]`` approximates only those sites (a last-layer or subnetwork
    Laplace); the others stay at the mode and, being point estimates, their prior is left out of the
    evidence (as laplace-torch's subnetwork and last-layer evidence do).

    Args:
        hessian: ``"full"``, ``"diag"`` or ``"kron"`` (:class:`HessianStructure`).
        curvature: ``"ggn"`` or ``"ef"`` (:class:`Curvature`; ``"kron"`` needs ``"ggn"``).
        output: the ``pyro.deterministic`` site for the GGN (default: the only one).
        subset: the latent sites the Gaussian is over (default: all).
        kfac: ``"expand"`` or ``"reduce"`` (:class:`KFACApproximation`), for ``hessian="kron"``.
        max_iter: L-BFGS iterations for the mode (per round).
        max_rounds: alternations of mode and hyperparameters (type-II).
        tolerance: type-II stops when no unconstrained hyperparameter moves by more than this in a round.
        jit: find the mode with the log joint and its gradient captured as one graph (checked against
            the eager program; eager where capture fails).
        device: move the data here (``None``: follow the data).
        progress: a tqdm bar over the type-II rounds.

    Diagnostics: ``converged`` (the mode: its Newton decrement ``1/2 g^T H^-1 g`` at most
    ``max(1e-10 |log p(y, theta*)|, 1e-8)`` in float64; and, with hyperparameters, the rounds),
    ``newton_decrement``, ``newton_steps``, ``map_gradient_max``, ``map_iterations``, ``rounds``, ``hessian``,
    ``curvature``, ``output``, ``num_parameters`` (the Gaussian's: a subset's size), ``subset`` (the
    approximated sites, or ``None`` for all), ``kfac`` (the approximation, for ``"kron"``),
    ``log_det_precision``, ``log_joint_at_mode`` (less the held sites' prior, with a subset).

    Examples:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> def model(x, y):
        ...     w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        ...     mean = pyro.deterministic("mean", x @ w)
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)
        >>> x = torch.randn(20, 2, dtype=torch.float64); y = x @ torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> post = Laplace(progress=False).fit(model, x, y)
        >>> post.log_evidence.method, post.samples(3)["w"].shape
        (<EvidenceMethod.LAPLACE: 'laplace'>, torch.Size([3, 2]))
    """

    def __init__(self, hessian: str | HessianStructure = HessianStructure.FULL, curvature: str | Curvature = Curvature.GGN,
                 output: str | None = None, subset=None, kfac: str | KFACApproximation = KFACApproximation.EXPAND,
                 max_iter: int = 500, max_rounds: int = 200, tolerance: float = 1e-7,
                 jit: bool = True, device=None, progress: bool = True):
        self.hessian = HessianStructure.parse(hessian, "hessian")
        self.curvature = Curvature.parse(curvature, "curvature")
        self.kfac = KFACApproximation.parse(kfac, "kfac")
        if self.hessian is HessianStructure.KRON and self.curvature is not Curvature.GGN:
            raise ValueError("hessian='kron' needs curvature='ggn' (KFAC factors the Gauss-Newton matrix)")
        if subset is not None:
            if isinstance(subset, str) or not all(isinstance(name, str) for name in subset) or not list(subset):
                raise TypeError(f"subset must be a non-empty list of latent site names, got {subset!r}")
            subset = list(subset)
        self.subset = subset
        if output is not None and not isinstance(output, str):
            raise TypeError(f"output must be the name of a pyro.deterministic site, got {output!r}")
        self.output = output
        for name, value in (("max_iter", max_iter), ("max_rounds", max_rounds)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}")
        self.max_iter, self.max_rounds, self.tolerance, self.jit = max_iter, max_rounds, float(tolerance), bool(jit)
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    # ------------------------------------------------------------------ entry
    def fit(self, model: Callable, *args, **kwargs) -> Posterior:
        """Fits ``model(*args, **kwargs)`` and returns a :class:`Posterior` with ``method="laplace"``."""
        return self._fit(model, args, kwargs, init=None)

    def fit_network(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood="gaussian",
                    prior_precision=1.0, noise=1.0) -> Posterior:
        """The second entry, for a plain ``nn.Module`` and a likelihood (laplace-torch's post-hoc use): the
        Laplace approximation at the network's weights, refined to the mode of the regularised loss.

        The network becomes :class:`~bmm_ppl.models.BayesianNeuralNetwork` ``(module, prior_scale=
        prior_precision ** -0.5, likelihood, noise)``, whose sites are ``"net.<parameter>"``; the mode
        search starts at the module's current parameters (a trained network: a few iterations), which
        are never changed. The returned posterior is that model's, so ``predict``, ``compare`` and the
        linearised predictive take it as they take any other.

        Args:
            module: ``module(x) -> Tensor[n, K]`` (or ``Tensor[n]``).
            x: inputs Tensor[n, ...].
            y: targets Tensor[n] / Tensor[n, K] (``"gaussian"``) or integer labels Tensor[n]
                (``"categorical"``).
            likelihood: ``"gaussian"`` (regression) or ``"categorical"`` (classification).
            prior_precision: ``delta`` of the prior ``N(0, 1/delta)`` on every weight, or ``None`` for one
                per layer learned by type-II.
            noise: the Gaussian noise standard deviation, or ``None`` for learned (ignored for categorical).

        Examples:
            >>> net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
            >>> x = torch.linspace(-2, 2, 30, dtype=torch.float64).unsqueeze(-1)
            >>> post = Laplace(hessian="kron", progress=False).fit_network(net, x, torch.sin(x).squeeze(-1), noise=0.1)
            >>> post.diagnostics["hessian"], sorted(post.samples(2))[:2]
            ('kron', ['net.0.bias', 'net.0.weight'])
        """
        from bmm_ppl.models.bnn import BayesianNeuralNetwork

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if prior_precision is not None and not (isinstance(prior_precision, (int, float)) and prior_precision > 0):
            raise ValueError(f"prior_precision must be a positive number or None (learned), got {prior_precision!r}")
        scale = None if prior_precision is None else float(prior_precision) ** -0.5
        model = BayesianNeuralNetwork(module, prior_scale=scale, likelihood=likelihood, noise=noise)
        init = {f"{model.name}.{name}": p.detach() for name, p in module.named_parameters()}
        return self._fit(model, (x, y), {}, init=init)

    def _fit(self, model: Callable, args: tuple, kwargs: dict, init: dict | None) -> Posterior:
        args, kwargs = prepare_data(args, kwargs, self.device, model)
        trace = prototype_trace(model, args, kwargs)
        _check_program(trace)
        output = choose_output_site(trace, self.output) if self.curvature is Curvature.GGN else None
        density = PyroDensity(model, args, kwargs)
        problem = _Problem(density, args, kwargs, output, trace, self.subset, self.hessian, self.kfac)
        hyper = {name: value.clone() for name, value in density.param_values.items()}
        start = {name: value.to(density.initial[name]) for name, value in (init or {}).items()}
        theta = problem.flatten(density.unconstrain(start))
        if output is not None:
            problem.check_output(theta, hyper)  # before any work

        rounds, converged_rounds, map_report = 0, not hyper, {}
        with tqdm(total=self.max_rounds if hyper else 1, disable=not self.progress, desc="Laplace", leave=False) as bar:
            while True:
                theta, map_report = self._mode(problem, theta, hyper, capture=init is None or rounds > 0)
                rounds += 1
                bar.update(1)
                if not hyper or rounds >= self.max_rounds:
                    break
                hyper, moved = self._hyperparameters(problem, theta, hyper)
                bar.set_postfix(moved=f"{moved:.2g}")
                if moved <= self.tolerance:
                    theta, map_report = self._mode(problem, theta, hyper)
                    converged_rounds = True
                    break

        theta, precision, map_report = self._polish(problem, theta, hyper, map_report)
        with torch.no_grad():
            log_joint = problem.evidence_log_joint(theta, hyper)
            try:
                log_det = precision.log_det()
                latents = precision.latents(theta, problem.site_shapes)
            except torch.linalg.LinAlgError:
                raise DivergenceError(
                    "the Laplace posterior precision is not positive definite at the mode (a prior precision "
                    "running to 0 with a flat likelihood direction): fix or bound the prior scale"
                ) from None
            log_evidence = kernels.laplace_log_evidence(log_joint, log_det, precision.num_parameters)
        if not torch.isfinite(log_evidence):
            raise DivergenceError(f"the Laplace evidence is {float(log_evidence)} at the mode")
        decrement, tolerance = map_report["newton_decrement"], map_report["newton_decrement_tolerance"]
        converged_mode = decrement <= tolerance
        converged = converged_mode and converged_rounds
        diagnostics = {
            **map_report, "converged": converged, "rounds": rounds, "hessian": self.hessian.value,
            "curvature": self.curvature.value, "output": output, "num_parameters": precision.num_parameters,
            "subset": problem.approximated_sites if self.subset is not None else None,
            "kfac": self.kfac.value if self.hessian is HessianStructure.KRON else None,
            "log_det_precision": float(log_det), "log_joint_at_mode": float(log_joint),
        }
        if not converged:
            why = (f"at the mode found, a Newton step would still raise log p(y, theta) by {decrement:.3g} "
                   f"(tolerance {tolerance:.3g}) after {map_report['map_iterations']} L-BFGS iterations" if not converged_mode
                   else f"the hyperparameters still moved after max_rounds={self.max_rounds} rounds")
            warnings.warn(f"Laplace did not converge: {why}; raise max_iter / max_rounds or rescale the data",
                          ConvergenceWarning, stacklevel=2)
        return Posterior(
            model, args, kwargs, latent_distribution=latents,
            log_evidence=Evidence(float(log_evidence), None, "laplace"),
            hyperparameters={n: v.detach() for n, v in hyper.items()}, diagnostics=diagnostics, engine="Laplace",
        )

    # ------------------------------------------------------------------ steps
    def _mode(self, problem: "_Problem", theta: torch.Tensor, hyper: dict, capture: bool = True
              ) -> tuple[torch.Tensor, dict]:
        """L-BFGS on ``-log p(y, theta)`` at fixed hyperparameters (the loss and gradient as one captured
        graph where the program allows and ``capture``, else eager); stops on L-BFGS's own tests,
        restarted while it still makes progress (convergence is judged in :meth:`fit` by the Newton
        decrement). A start at a trained network's weights (``fit_network``) runs eagerly: it stops
        within a few iterations, and capture would cost more than it saves."""
        theta = theta.detach().clone().requires_grad_(True)
        fixed = {n: v.detach() for n, v in hyper.items()}
        names = sorted(fixed)
        captured = problem.captured_loss_and_gradient(theta.detach(), fixed) if self.jit and capture else None
        optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=self.max_iter, history_size=50,
                                      line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                      tolerance_change=torch.finfo(theta.dtype).eps)

        def closure():
            optimiser.zero_grad()
            if captured is not None:
                loss, gradient = captured(theta.detach(), *(fixed[n] for n in names))
                theta.grad = gradient.clone()
                return loss
            loss = -problem.log_joint(theta, fixed)
            loss.backward()
            return loss

        def check():
            loss = -problem.log_joint(theta, fixed)
            (gradient,) = torch.autograd.grad(loss, theta)
            loss = float(loss.detach())
            if not math.isfinite(loss) or not torch.isfinite(gradient).all():
                raise DivergenceError(f"the search for the mode diverged: -log p(y, theta) = {loss}")
            return gradient.detach(), loss

        iterations, previous = 0, math.inf
        for _ in range(1 + (_MODE_RESTARTS if capture else 0)):  # L-BFGS also stops on a loss change below resolution: go again
            optimiser.step(closure)
            iterations = int(optimiser.state[theta].get("n_iter", 0))
            gradient, loss = check()
            if iterations >= self.max_iter or not loss < previous:
                break
            previous = loss
        report = {"map_gradient_max": float(gradient.abs().max()), "map_iterations": iterations,
                  "_gradient": gradient, "_loss": loss}
        return theta.detach(), report

    def _polish(self, problem: "_Problem", theta: torch.Tensor, hyper: dict, report: dict):
        """Judges the mode by what is left to gain, the Newton decrement ``1/2 g^T H^-1 g`` (the rise in
        ``log p(y, theta)``, and so the evidence's error, that one more Newton step would bring), and
        takes up to three Newton steps with the curvature where L-BFGS stopped short of the tolerance
        ``max(1e-10 |U|, 1e-8)`` (float64; ``100 eps |U|`` in lower precision).

        Returns:
            ``(theta, precision at theta, report)``.
        """
        gradient, loss = report.pop("_gradient"), report.pop("_loss")
        tolerance = max(max(1e-10, 100 * torch.finfo(theta.dtype).eps) * max(1.0, abs(loss)), 1e-8)
        steps, newton = 0, self.hessian is HessianStructure.FULL and self.subset is None
        while True:
            with torch.no_grad():
                precision = problem.precision(theta, hyper, self.curvature)
                try:
                    step = precision.solve(gradient)
                except torch.linalg.LinAlgError:
                    break
            decrement = 0.5 * float(gradient @ step)
            if decrement <= tolerance or steps == _NEWTON_STEPS or not newton:
                break
            candidate = theta - step
            with torch.enable_grad():
                flat = candidate.clone().requires_grad_(True)
                value = -problem.log_joint(flat, hyper)
                (new_gradient,) = torch.autograd.grad(value, flat)
            if not float(value.detach()) <= loss:  # the Gauss-Newton step does not help here: keep the L-BFGS mode
                break
            theta, gradient, loss, steps = candidate.detach(), new_gradient.detach(), float(value.detach()), steps + 1
        report.update(newton_decrement=decrement, newton_decrement_tolerance=tolerance, newton_steps=steps,
                      map_gradient_max=float(gradient.abs().max()))
        return theta, precision, report

    def _hyperparameters(self, problem: "_Problem", theta: torch.Tensor, hyper: dict) -> tuple[dict, float]:
        """L-BFGS on the Laplace evidence over the unconstrained hyperparameters at fixed ``theta``;
        returns the new values and the largest move of an unconstrained hyperparameter."""
        transforms = {n: transform_to(problem.density.param_constraints[n]) for n in hyper}
        start = {n: transforms[n].inv(v.detach()) for n, v in hyper.items()}
        free = {n: u.clone().requires_grad_(True) for n, u in start.items()}
        cache = problem.curvature_cache(theta, self.curvature, hyper)
        size = problem.num_approximated
        optimiser = torch.optim.LBFGS(list(free.values()), lr=1.0, max_iter=100, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_change=0.0,
                                      tolerance_grad=1e-9)

        def negative_evidence():
            values = {n: transforms[n](u) for n, u in free.items()}
            precision = problem.precision(theta, values, self.curvature, cache)
            return -kernels.laplace_log_evidence(problem.evidence_log_joint(theta, values), precision.log_det(), size)

        optimiser.step(backing_off_closure(optimiser, negative_evidence))
        moved = max((float((free[n].detach() - start[n]).abs().max()) for n in free), default=0.0)
        return {n: transforms[n](u).detach() for n, u in free.items()}, moved


class _Problem:
    """The program seen as functions of one flat parameter vector (every latent site has real support)."""

    def __init__(self, density: PyroDensity, args: tuple, kwargs: dict, output: str | None, trace,
                 subset: list[str] | None, structure: HessianStructure, approximation: KFACApproximation):
        self.density, self.args, self.kwargs, self.output = density, args, kwargs, output
        self.structure, self.approximation = structure, approximation
        self.site_shapes = {n: tuple(density.initial[n].shape) for n in density.latent_sites}
        self.observed = [n for n in density.observed_sites if not trace.nodes[n]["infer"].get("_deterministic", False)]
        self.num_data = self._data_size(trace)
        self.site_index, start = {}, 0
        device = next(iter(density.initial.values())).device
        for name, shape in self.site_shapes.items():
            size = math.prod(shape)
            self.site_index[name] = torch.arange(start, start + size, device=device)
            start += size
        if subset is not None:
            unknown = [name for name in subset if name not in self.site_shapes]
            if unknown:
                raise ValueError(f"subset names {unknown}, which are not latent sites of the model; "
                                 f"its latent sites are {list(self.site_shapes)}")
        self.approximated_sites = [n for n in self.site_shapes if subset is None or n in subset]
        self.index = torch.cat([self.site_index[n] for n in self.approximated_sites])
        self.whole = subset is None
        self.num_approximated = int(self.index.numel())

    def _data_size(self, trace) -> int | None:
        sizes = {frame.size for n in self.observed for frame in trace.nodes[n]["cond_indep_stack"] if frame.vectorized}
        return max(sizes) if sizes else None

    def flatten(self, values: dict) -> torch.Tensor:
        return torch.cat([values[n].reshape(-1) for n in self.site_shapes])

    def split(self, theta: torch.Tensor) -> dict:
        return split_sites(theta, self.site_shapes)

    def log_joint(self, theta: torch.Tensor, hyper: dict) -> torch.Tensor:
        return self.density.log_joint(self.split(theta), hyper, self.args, self.kwargs)

    def evidence_log_joint(self, theta: torch.Tensor, hyper: dict) -> torch.Tensor:
        """``log p(y, theta)`` less the prior of the sites held at the mode (a subnetwork's point estimates)."""
        value = self.log_joint(theta, hyper)
        held = [n for n in self.site_shapes if n not in self.approximated_sites]
        if held:
            trace = self.density.trace(self.split(theta), hyper, self.args, self.kwargs, observations=False)
            value = value - sum(site_log_prob(trace.nodes[n], trace).sum() for n in held)
        return value

    def captured_loss_and_gradient(self, theta: torch.Tensor, hyper: dict):
        """``f(theta, *hyper values by name) -> (-log p(y, theta), its gradient in theta)`` as one checked
        graph (:func:`~bmm_ppl.inference.program.graph_capture.capture_checked`), or ``None``."""
        from bmm_ppl.inference.program.graph_capture import capture_checked

        names = sorted(hyper)

        def negative_log_joint(flat, *values):
            return -self.log_joint(flat, dict(zip(names, values)))

        value_and_grad = torch.func.grad_and_value(negative_log_joint)

        def loss_and_gradient(flat, *values):
            gradient, loss = value_and_grad(flat, *values)
            return loss, gradient

        def eager(flat, *values):
            flat = flat.detach().requires_grad_(True)
            loss = negative_log_joint(flat, *values)
            return loss, torch.autograd.grad(loss, flat)[0]

        example = [theta] + [hyper[n] for n in names]
        probe = [theta + 0.01 * torch.randn_like(theta)] + example[1:]
        return capture_checked(loss_and_gradient, example, probe, eager, rtol=1e-6)

    def prior_precision(self, hyper: dict) -> torch.Tensor:
        """Tensor[P]: ``1 / scale^2`` of every latent element's Normal prior at ``hyper``."""
        trace = self.density.trace(self.density.unconstrain({}), hyper, self.args, self.kwargs, observations=False)
        parts = []
        for name, shape in self.site_shapes.items():
            normal = _unwrapped_prior(trace.nodes[name]["fn"])  # a Normal: checked up front
            parts.append(normal.scale.expand(shape).reshape(-1).pow(-2))
        return torch.cat(parts)

    def _output_function(self, hyper: dict):
        fixed = {n: v.detach() for n, v in hyper.items()}

        def output_of(flat):
            return self.density.trace(self.split(flat), fixed, self.args, self.kwargs).nodes[self.output]["value"]

        return output_of

    def _output_jacobian(self, output_of, theta: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        """Tensor[n, K, m]: the output's Jacobian in the elements ``index`` (the others held at ``theta``)."""
        base = theta.detach()
        if index.numel() == base.numel():
            return torch.func.jacrev(lambda flat: output_of(flat).reshape(n, -1))(base)
        return torch.func.jacrev(lambda part: output_of(base.index_copy(0, index, part)).reshape(n, -1))(base[index])

    def curvature_cache(self, theta: torch.Tensor, curvature: Curvature, hyper: dict) -> dict:
        """What the hyperparameter search holds fixed at ``theta`` (GGN): the output, and its per-point
        Jacobian in the approximated elements (full, diag) or the KFAC layer factors and the other sites'
        Jacobians (kron). Linear layers' Jacobians come from their recorded inputs and output gradients
        (``K`` backward passes, checked against forward-mode derivatives); other sites by ``jacrev``."""
        if curvature is not Curvature.GGN:
            return {}
        output_of = self._output_function(hyper)
        value = output_of(theta.detach()).detach()
        n = value.shape[0] if value.dim() else 1
        num_outputs = value.numel() // n if value.dim() else 1
        records, mismatched = self._layer_records(output_of, theta, hyper, n, num_outputs)
        if self.structure is HessianStructure.KRON:
            kfac.refuse_mismatches(mismatched)
        records = {r.site: r for r in records if r.site not in mismatched}
        rest = [name for name in self.approximated_sites if name not in records]
        if self.structure is HessianStructure.KRON:
            for name in rest:
                if self.site_index[name].numel() > kfac.MAX_DENSE_SITE:
                    raise UnsupportedModelError(
                        f"hessian='kron' found site {name!r} ({self.site_index[name].numel()} elements) outside any "
                        f"linear layer, and its dense block would exceed {kfac.MAX_DENSE_SITE} elements: pass it to "
                        "F.linear / nn.Linear (or x @ w) once, leave it out with subset=, or use hessian='diag'"
                    )
        rest_index = torch.cat([self.site_index[name] for name in rest]) if rest else None
        rest_jacobian = None if rest_index is None else self._output_jacobian(output_of, theta, rest_index, n).detach()
        if self.structure is HessianStructure.KRON:
            self._check_one_prior_precision_per_weight([r.site for r in records.values() if not r.is_bias], hyper)
            return {"output": value, "rest_index": rest_index, "rest_jacobian": rest_jacobian,
                    "weights": [kfac.kronecker_factors(r, self.approximation) for r in records.values() if not r.is_bias],
                    "biases": [(r.site, kfac.bias_gradients(r)) for r in records.values() if r.is_bias]}
        parts, rest_columns = [], iter(() if rest_jacobian is None else rest_jacobian.split(
            [self.site_index[name].numel() for name in rest], dim=-1))
        for name in self.approximated_sites:
            parts.append(records[name].per_point_jacobian() if name in records else next(rest_columns))
        return {"output": value, "jacobian": torch.cat(parts, dim=-1)}

    def _check_one_prior_precision_per_weight(self, sites: list[str], hyper: dict) -> None:
        """Refuses, by name, a KFAC weight whose prior scale varies within it (its block's ``delta I``)."""
        with torch.no_grad():
            prior = self.prior_precision(hyper)
        for site in sites:
            delta = prior[self.site_index[site]]
            if float(delta.max() - delta.min()) > 1e-10 * float(delta.max()):
                raise UnsupportedModelError(
                    f"hessian='kron' needs one prior precision per weight matrix, but site {site!r} has a "
                    "prior scale that varies within it: give it one scale, or use hessian='full' or 'diag'"
                )

    def _layer_records(self, output_of, theta: torch.Tensor, hyper: dict, n: int, num_outputs: int):
        fixed = {name: v.detach() for name, v in hyper.items()}

        def run():
            leaf = theta.detach().clone().requires_grad_(True)
            trace = self.density.trace(self.split(leaf), fixed, self.args, self.kwargs)
            return {name: trace.nodes[name]["value"] for name in self.site_shapes}, trace.nodes[self.output]["value"]

        def directional(site, direction):
            tangent = torch.zeros_like(theta).index_copy(0, self.site_index[site], direction.reshape(-1))
            _, derivative = torch.func.jvp(output_of, (theta.detach(),), (tangent,))
            return derivative.reshape(n, num_outputs)

        with torch.enable_grad():
            return kfac.record_layers(run, self.approximated_sites, num_outputs, directional)

    def check_output(self, theta: torch.Tensor, hyper: dict) -> None:
        """Refuses a program whose observations depend on the latents other than through the output
        (the Gauss-Newton split would drop that part of the curvature): with the output held at its
        value, the log-likelihood's gradient in the latents must vanish.

        Raises:
            UnsupportedModelError: naming the output site.
        """
        fixed = {n: v.detach() for n, v in hyper.items()}
        trace = self.density.trace(self.split(theta.detach()), fixed, self.args, self.kwargs)
        value = trace.nodes[self.output]["value"].detach()
        with torch.enable_grad():
            around = theta.detach().clone().requires_grad_(True)
            bypass = self.density.log_likelihood(self.split(around), fixed, self.args, self.kwargs,
                                                 deterministic={self.output: value})
            (leak,) = torch.autograd.grad(bypass, around, allow_unused=True) if bypass.requires_grad else (None,)
        if leak is not None and float(leak.abs().max()) > 1e-8 * max(1.0, abs(float(bypass.detach()))):
            raise UnsupportedModelError(
                f"the observations depend on the latents other than through the output {self.output!r} "
                "(e.g. a latent noise scale, a second network head, or the distribution built from the "
                "value before pyro.deterministic rather than from what it returns): record every parameter "
                "of the observations' distribution in that one pyro.deterministic site and use its return "
                "value, or use curvature='ef'"
            )

    def precision(self, theta: torch.Tensor, hyper: dict, curvature: Curvature, cache: dict | None = None
                  ) -> PosteriorPrecision:
        """The posterior precision at ``theta`` in the engine's structure, differentiable in ``hyper``."""
        cache = self.curvature_cache(theta, curvature, hyper) if cache is None else cache
        prior = self.prior_precision(hyper)
        if curvature is Curvature.EF:
            gradients = self.pointwise_gradients(theta, hyper)[:, self.index]
            return self._assemble(kernels.empirical_fisher(gradients, self._flat_structure), prior)
        blocks = self._likelihood_blocks(theta, hyper, cache["output"])
        if self.structure is not HessianStructure.KRON:
            return self._assemble(kernels.gauss_newton(cache["jacobian"], blocks, self._flat_structure), prior)
        kronecker = []
        for factors in cache["weights"]:
            index = self.site_index[factors.site]
            layer = kfac.gauss_newton_factor(factors.output_gradients, factors.point, blocks)
            left, right = (factors.activations, layer) if factors.transposed else (layer, factors.activations)
            kronecker.append(KroneckerFactors.of(index, left, right, prior[index[0]]))  # one per site: checked in the cache
        dense = []
        for site, gradients in cache["biases"]:
            index = self.site_index[site]
            matrix = kfac.gauss_newton_factor(gradients, None, blocks)
            dense.append((index, matrix + torch.diag_embed(prior[index])))
        if cache["rest_index"] is not None:
            index = cache["rest_index"]
            matrix = kernels.gauss_newton(cache["rest_jacobian"], blocks, HessianStructure.FULL)
            dense.append((index, matrix + torch.diag_embed(prior[index])))
        return BlockPrecision(kronecker, dense)

    @property
    def _flat_structure(self) -> HessianStructure:
        return HessianStructure.DIAG if self.structure is HessianStructure.DIAG else HessianStructure.FULL

    def _assemble(self, curvature: torch.Tensor, prior: torch.Tensor) -> PosteriorPrecision:
        """A full or diagonal curvature over the approximated elements, plus their prior precision."""
        matrix = kernels.posterior_precision(curvature, prior[self.index], self._flat_structure)
        if self.whole:
            return DensePrecision(matrix) if matrix.dim() == 2 else DiagonalPrecision(matrix)
        return BlockPrecision([], [(self.index, matrix if matrix.dim() == 2 else torch.diag_embed(matrix))])

    def _likelihood_blocks(self, theta: torch.Tensor, hyper: dict, output: torch.Tensor) -> torch.Tensor:
        """Tensor[n, K, K]: the negative Hessian of each point's log-likelihood in its output."""
        theta_values = self.split(theta.detach())
        shaped = output if output.dim() else output.reshape(1)

        def likelihood_of_output(f):
            return self.density.log_likelihood(theta_values, hyper, self.args, self.kwargs,
                                               deterministic={self.output: f.reshape(output.shape)})

        return kernels.output_hessian_blocks(likelihood_of_output, shaped)

    def pointwise_gradients(self, theta: torch.Tensor, hyper: dict) -> torch.Tensor:
        """Tensor[n, P]: the gradient of each data point's log-likelihood."""
        if self.num_data is None:
            raise UnsupportedModelError("curvature='ef' needs the observations in a plate over the data points")

        def pointwise(flat):
            trace = self.density.trace(self.split(flat), hyper, self.args, self.kwargs)
            plate = data_plate(trace, self.num_data)
            total = 0.0
            for name in self.observed:
                site = trace.nodes[name]
                log_prob = site_log_prob(site, trace)
                dim = next(f.dim for f in site["cond_indep_stack"] if f.name == plate)
                if log_prob.dim() < -dim:
                    log_prob = log_prob.reshape((1,) * (-dim - log_prob.dim()) + tuple(log_prob.shape))
                moved = log_prob.movedim(dim, 0)
                total = total + moved.expand((self.num_data,) + tuple(moved.shape[1:])).reshape(self.num_data, -1).sum(-1)
            return total

        return torch.func.jacrev(pointwise)(theta.detach())


__all__ = ["Laplace"]
