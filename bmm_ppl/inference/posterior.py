"""The one result type that every engine returns."""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.latents import LatentDistribution, latent_distribution_from_state_dict
from bmm_ppl.inference.program.sites import is_module_parameter
from bmm_ppl.inference.program.runs import (
    inspect_model,
    observed_values,
    pointwise_log_likelihood,
    predictive_draws,
    with_hyperparameters,
)

_FORMAT = "bmm_ppl.Posterior/1"


class Posterior:
    """A fitted posterior over a Pyro model's latent sites, with its evidence and type-II hyperparameters.

    Engines build it; users read it. Draws are kept shaped ``(chain, draw, *site_shape)``. A posterior
    from an engine with a closed-form or variational distribution (``Exact``, ``SVI``) keeps that
    distribution and draws from it on demand, as one chain.

    Args:
        model: the Pyro program that was fitted, called as ``model(*args, **kwargs)``.
        args: the positional arguments (the data) it was fitted to.
        kwargs: the keyword arguments (the data) it was fitted to.
        draws: ``{site: Tensor[chain, draw, *site_shape]}`` stored draws (sampling engines).
        latent_distribution: a :class:`LatentDistribution` to draw from (exact and variational engines).
        log_evidence: an :class:`Evidence`, or ``None`` where the engine gives none.
        hyperparameters: ``{name: Tensor}`` type-II values of the model's ``pyro.param`` sites.
        sample_stats: ``{stat: Tensor[chain, draw]}`` (divergences, acceptance, step size).
        loss_trace: Tensor[num_steps] of the objective the engine minimised.
        diagnostics: anything else the engine wants to report (convergence, boundaries), as plain data.
        engine: the engine's name.

    Examples:
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> from bmm_ppl.inference import Exact
        >>> x = torch.linspace(0, 1, 10, dtype=torch.float64); y = torch.sin(6 * x)
        >>> post = Exact().fit(BayesianLinearRegression(polynomial_features(3), alpha=1e-2, beta=10.0), x, y)
        >>> post.samples(100)["w"].shape
        torch.Size([100, 4])
        >>> post.predict(x, num_samples=50)["obs"].shape
        torch.Size([50, 10])
    """

    def __init__(
        self,
        model: Callable | None,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        draws: dict[str, torch.Tensor] | None = None,
        latent_distribution: LatentDistribution | None = None,
        log_evidence: Evidence | None = None,
        hyperparameters: dict[str, torch.Tensor] | None = None,
        sample_stats: dict[str, torch.Tensor] | None = None,
        loss_trace: torch.Tensor | None = None,
        diagnostics: dict | None = None,
        engine: str = "",
    ):
        if draws is None and latent_distribution is None:
            raise ValueError("a Posterior needs stored draws or a latent_distribution to draw from")
        if draws is not None:
            for name, value in draws.items():
                if value.dim() < 2:
                    raise ValueError(f"draws[{name!r}] must be shaped (chain, draw, *site_shape), got {tuple(value.shape)}")
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self._draws = dict(draws) if draws is not None else None
        self.latent_distribution = latent_distribution
        self.log_evidence = log_evidence
        self.hyperparameters = dict(hyperparameters or {})
        self.sample_stats = dict(sample_stats or {})
        self.loss_trace = loss_trace
        self.diagnostics = dict(diagnostics or {})
        self.engine = engine
        self._loaded_sites: dict | None = None  # the "sites" record of the save this was loaded from

    # ------------------------------------------------------------------ draws
    @property
    def has_stored_draws(self) -> bool:
        return self._draws is not None

    @property
    def num_chains(self) -> int:
        return next(iter(self._draws.values())).shape[0] if self._draws else 1

    def draws(self, num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """Draws shaped ``{site: Tensor[chain, draw, *site_shape]}``.

        Stored draws are returned whole (``num_samples`` is ignored); a distribution gives one chain of
        ``num_samples`` fresh draws.
        """
        if self._draws is not None:
            return dict(self._draws)
        return {n: v.unsqueeze(0) for n, v in self.latent_distribution.sample(num_samples).items()}

    def samples(self, num_samples: int | None = None) -> dict[str, torch.Tensor]:
        """Posterior draws of the latent sites with chains flattened: ``{site: Tensor[num_samples, *shape]}``.

        From stored draws, ``num_samples`` evenly thinned draws (all of them when ``None``); from a
        distribution, ``num_samples`` fresh draws (1000 when ``None``).
        """
        if self._draws is None:
            return self.latent_distribution.sample(1000 if num_samples is None else int(num_samples))
        flat = {n: v.reshape((-1,) + v.shape[2:]) for n, v in self._draws.items()}
        total = next(iter(flat.values())).shape[0]
        if num_samples is None or num_samples == total:
            return flat
        if num_samples > total:
            raise ValueError(f"num_samples={num_samples} exceeds the {total} stored draws")
        index = torch.linspace(0, total - 1, num_samples, device=next(iter(flat.values())).device).round().long()
        return {n: v[index] for n, v in flat.items()}

    # ------------------------------------------------------------ predictions
    def model_or_raise(self) -> Callable:
        """The model this posterior was fitted to (a loaded posterior has one only when given ``model=``)."""
        if self.model is None:
            raise RuntimeError("this Posterior was loaded without its model; pass model= to Posterior.load")
        return self.model

    def predict(self, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior predictive draws: the model run at ``args`` under ``num_samples`` posterior draws.

        With no ``args`` or ``kwargs`` given, the fitted arguments are used with observations redrawn
        only where the model leaves them ``None``.

        Args:
            *args: the model's positional arguments (e.g. new inputs ``x_new``; leave the observations out
                to draw them).
            num_samples: the number of posterior draws.
            **kwargs: the model's keyword arguments (likewise).

        Returns:
            ``{site: Tensor[num_samples, *site_shape]}`` for every sample site the posterior does not fix
            (the observations) and every ``pyro.deterministic`` site.
        """
        model = self.model_or_raise()
        if not args and not kwargs:
            args, kwargs = self.args, self.kwargs
        return predictive_draws(model, args, kwargs, self.samples(num_samples), self.hyperparameters)

    def log_likelihood(self, draws: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Pointwise ``log p(y_i | draw)`` of the fitted data: ``{obs_site: Tensor[chain, draw, n_obs]}``."""
        draws = self.draws() if draws is None else draws
        chains, per_chain = next(iter(draws.values())).shape[:2]
        flat = {n: v.reshape((-1,) + v.shape[2:]) for n, v in draws.items()}
        loglik = pointwise_log_likelihood(self.model_or_raise(), self.args, self.kwargs, flat, self.hyperparameters)
        return {n: v.reshape(chains, per_chain, -1) for n, v in loglik.items()}

    def observed_data(self) -> dict[str, torch.Tensor]:
        """``{obs_site: value}`` of the fitted data."""
        return observed_values(self.model_or_raise(), self.args, self.kwargs, self.hyperparameters)

    def to_arviz(self, num_samples: int = 1000, posterior_predictive: bool = True, **kwargs):
        """ArviZ data (0.2x ``InferenceData`` or 1.x ``DataTree``) with posterior, observed data, pointwise
        log-likelihood, posterior predictive, sample stats, prior and prior predictive, dims named after the
        model's plates; ``kwargs``: ``num_prior_samples``, ``dims``, ``coords``. See
        :func:`bmm_ppl.analysis.to_arviz`."""
        from bmm_ppl.analysis.arviz_convert import to_arviz

        return to_arviz(self, num_samples=num_samples, posterior_predictive=posterior_predictive, **kwargs)

    # ------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return self._some_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._some_tensor().dtype

    def _some_tensor(self) -> torch.Tensor:
        if self._draws:
            return next(iter(self._draws.values()))
        # One draw tells the device and dtype, whatever the distribution keeps inside.
        return next(iter(self.latent_distribution.sample(1).values()))

    # ---------------------------------------------------------- persistence
    def site_shapes(self) -> dict[str, tuple]:
        """``{site: shape}`` of the latent sites this posterior holds (one draw's shape)."""
        if self._draws is not None:
            return {name: tuple(value.shape[2:]) for name, value in self._draws.items()}
        return {name: tuple(shape) for name, shape in getattr(self.latent_distribution, "site_shapes", {}).items()}

    def _site_records(self) -> dict:
        """``{site: {"shape": [...], "support": str | None}}``: what a loader checks a model against.

        Shapes come from the stored content; supports from one run of the model (with the RNG and the
        parameter store left as they were), or from the save this posterior was loaded from.
        """
        supports = {}
        if self.model is not None:
            supports = _latent_supports(self.model, self.args, self.kwargs, self.hyperparameters)
        elif self._loaded_sites:
            supports = {name: record.get("support") for name, record in self._loaded_sites.items()}
        return {
            name: {"shape": list(shape), "support": supports.get(name)} for name, shape in self.site_shapes().items()
        }

    def state_dict(self) -> dict:
        """Tensors, numbers and strings only: ``torch.save`` it and read it back with ``weights_only=True``.

        ``"sites"`` records each latent site's shape and support, so that a loader can check the draws and
        the model it is given against them."""
        return {
            "format": _FORMAT,
            "engine": self.engine,
            "sites": self._site_records(),
            "draws": self._draws,
            "latent_distribution": None if self.latent_distribution is None else self.latent_distribution.state_dict(),
            "log_evidence": None if self.log_evidence is None else self.log_evidence.to_dict(),
            "hyperparameters": self.hyperparameters,
            "sample_stats": self.sample_stats,
            "loss_trace": self.loss_trace,
            "diagnostics": self.diagnostics,
        }

    def load_state_dict(self, state: dict) -> "Posterior":
        """Replaces this posterior's fitted content with a saved one; the model and data stay.

        The saved content is checked for consistency first (every stored draw shaped ``(chain, draw,
        *site_shape)`` with the recorded site shape), and, where this posterior has a model, the model
        against the saved sites (see :meth:`check_model`); a mismatch raises ``ValueError`` naming the site.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a saved Posterior (format {found!r}, expected {_FORMAT!r})")
        sites = state.get("sites")
        draws = state["draws"]
        if draws is not None:
            _check_saved_draws(draws, sites)
        latent = state["latent_distribution"]
        latent = None if latent is None else latent_distribution_from_state_dict(latent)
        if latent is not None and sites is not None:
            _check_saved_shapes("the latent distribution", getattr(latent, "site_shapes", {}), sites)
        if draws is None and latent is None:
            raise ValueError("the saved Posterior holds neither draws nor a latent distribution")
        if draws is not None:
            leading = tuple(next(iter(draws.values())).shape[:2]) if draws else None
            for stat, value in (state["sample_stats"] or {}).items():
                if leading is not None and tuple(value.shape[:2]) != leading:
                    raise ValueError(
                        f"saved sample_stats[{stat!r}] is shaped {tuple(value.shape)}, but the draws have "
                        f"(chain, draw) = {leading}: the save was altered or is corrupt"
                    )
        self.engine = state["engine"]
        self._draws = draws
        self.latent_distribution = latent
        self.log_evidence = None if state["log_evidence"] is None else Evidence.from_dict(state["log_evidence"])
        self.hyperparameters = dict(state["hyperparameters"])
        self.sample_stats = dict(state["sample_stats"])
        self.loss_trace = state["loss_trace"]
        self.diagnostics = dict(state["diagnostics"])
        self._loaded_sites = None if sites is None else dict(sites)
        if self.model is not None:
            self.check_model()
        return self

    def check_model(self) -> None:
        """Checks that this posterior's model, run on its arguments, has exactly the latent sites held
        here, with the same shapes and (where recorded) the same supports, that the stored draws lie in
        the model's supports, and that every type-II hyperparameter is a ``pyro.param`` site of the model.

        Raises:
            ValueError: naming the first site that does not match.
        """
        model = self.model_or_raise()
        hyperparameters = self.hyperparameters
        model_name = getattr(model, "__name__", type(model).__name__)
        try:
            with _side_effect_free(self.args, self.kwargs):
                # First without the saved hyperparameters: substituting a name the model lacks is the
                # mismatch to report, not a warning from Pyro.
                params = set(inspect_model(model, self.args, self.kwargs).param_sites)
        except TypeError as error:
            if self.args or self.kwargs:
                raise
            raise ValueError(
                f"cannot check the model against the saved sites: calling it without arguments failed ({error}); "
                "pass the data it was fitted to as args= / kwargs="
            ) from error
        for name in hyperparameters:
            if not is_module_parameter(name) and name not in params:
                raise ValueError(
                    f"the saved posterior has hyperparameter {name!r}, which is not a pyro.param site of the given "
                    f"model {model_name} (its param sites: {sorted(params)})"
                )
        with _side_effect_free(self.args, self.kwargs):
            structure = inspect_model(model, self.args, self.kwargs, hyperparameters)
            trace = poutine.trace(with_hyperparameters(model, hyperparameters)).get_trace(*self.args, **self.kwargs)
        saved = self.site_shapes()
        fns = {name: trace.nodes[name]["fn"] for name in structure.latent_sites if name in trace.nodes}
        # Discrete latent sites may be summed out by the engine (enumeration): they need no draws.
        needed = [n for n in structure.latent_sites if not getattr(fns.get(n), "support", constraints.real).is_discrete]
        # Sampling engines also store the pyro.deterministic sites' values with the draws.
        model_shapes = {n: tuple(structure.sites[n].value_shape) for n in structure.latent_sites}
        model_shapes.update({n: tuple(shape) for n, shape in structure.deterministic_sites.items()})
        for name in saved:
            if name not in model_shapes:
                raise ValueError(
                    f"the saved posterior has site {name!r}, which is not a latent site of the given model "
                    f"{model_name} (its latent sites: {structure.latent_sites}); is this the model it was fitted to?"
                )
        for name in needed:
            if name not in saved:
                raise ValueError(
                    f"the given model {model_name} has latent site {name!r}, which the saved posterior does not "
                    f"hold (saved sites: {list(saved)}); is this the model it was fitted to?"
                )
        recorded = self._loaded_sites or {}
        for name, shape in saved.items():
            if model_shapes[name] != tuple(shape):
                raise ValueError(
                    f"site {name!r} has shape {model_shapes[name]} in the given model but {tuple(shape)} in the "
                    "saved posterior; is this the model (and the data) it was fitted to?"
                )
            if name not in fns:
                continue  # a deterministic record: no support of its own
            support = fns[name].support
            saved_support = (recorded.get(name) or {}).get("support")
            if saved_support is not None and describe_support(support) != saved_support:
                raise ValueError(
                    f"site {name!r} has support {describe_support(support)} in the given model but "
                    f"{saved_support} in the saved posterior; is this the model it was fitted to?"
                )
            if self._draws is not None:
                value = self._draws[name]
                if value.device.type != "meta" and not bool(_in_support(support, value)):
                    raise ValueError(
                        f"stored draws of site {name!r} lie outside its support {describe_support(support)} in "
                        "the given model: the save was altered, or this is not the model it was fitted to"
                    )

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`state_dict` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Callable | None = None, args: tuple = (), kwargs: dict | None = None,
        map_location=None,
    ) -> "Posterior":
        """Reads a saved posterior without unpickling code (``weights_only=True``).

        Pass the model and the data it was fitted to (``args``, ``kwargs``) to predict with it again: the
        model is then checked against the saved sites (names, shapes, supports; see :meth:`check_model`)
        and a mismatch raises ``ValueError`` naming the site. The saved draws are checked against their
        recorded shapes in any case.
        """
        state = torch.load(path, map_location=map_location, weights_only=True)
        placeholder = cls(model, args, kwargs, draws={"_": torch.zeros(1, 1, device="cpu")})
        return placeholder.load_state_dict(state)

    def __repr__(self) -> str:
        evidence = "none" if self.log_evidence is None else f"{self.log_evidence.value:.4g} ({self.log_evidence.method})"
        sites = list(self._draws) if self._draws else list(getattr(self.latent_distribution, "site_shapes", {}))
        return f"Posterior(engine={self.engine!r}, sites={sites}, log_evidence={evidence})"


def describe_support(support: constraints.Constraint) -> str:
    """A device-free description of a site's support, e.g. ``"Real"``, ``"GreaterThan(0.0)"``,
    ``"Interval(0.0, 1.0)"``: the constraint's kind and its scalar bounds.

    Examples:
        >>> describe_support(constraints.positive), describe_support(constraints.independent(constraints.real, 1))
        ('GreaterThan(0.0)', 'Real')
    """
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    kind = type(support).__name__.lstrip("_")
    bounds = []
    for attribute in ("lower_bound", "upper_bound"):
        bound = getattr(support, attribute, None)
        if isinstance(bound, (int, float)) or (isinstance(bound, torch.Tensor) and bound.numel() == 1):
            bounds.append(repr(float(bound)))
        elif bound is not None:
            bounds.append("tensor")
    return f"{kind}({', '.join(bounds)})" if bounds else kind


def _in_support(support: constraints.Constraint, value: torch.Tensor) -> torch.Tensor:
    # Site values carry their event dims; an independent constraint reduces over them itself.
    return support.check(value).all()


@contextlib.contextmanager
def _side_effect_free(args: tuple, kwargs: dict):
    """Runs inside leave the global RNG (CPU and the data's CUDA devices) and the parameter store as they
    were: saving or checking a posterior must not change what the user's next draw is."""
    tensors = [a for a in tuple(args) + tuple(kwargs.values()) if isinstance(a, torch.Tensor)]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), pyro.get_param_store().scope():
        yield


def _latent_supports(model: Callable, args: tuple, kwargs: dict, hyperparameters: dict) -> dict[str, str]:
    """``{latent site: describe_support(...)}`` from one side-effect-free run of the model."""
    with _side_effect_free(args, kwargs):
        structure = inspect_model(model, args, kwargs, hyperparameters)
        trace = poutine.trace(with_hyperparameters(model, hyperparameters)).get_trace(*args, **kwargs)
    return {n: describe_support(trace.nodes[n]["fn"].support) for n in structure.latent_sites if n in trace.nodes}


def _check_saved_shapes(where: str, shapes: dict, sites: dict) -> None:
    if set(shapes) != set(sites):
        raise ValueError(
            f"{where} holds sites {sorted(shapes)} but the save records {sorted(sites)}: the save was altered or is corrupt"
        )
    for name, shape in shapes.items():
        recorded = tuple(sites[name]["shape"])
        if tuple(shape) != recorded:
            raise ValueError(
                f"{where} gives site {name!r} shape {tuple(shape)}, but the save records {recorded}: the save was "
                "altered or is corrupt"
            )


def _check_saved_draws(draws: dict, sites: dict | None) -> None:
    leading = None
    for name, value in draws.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"saved draws[{name!r}] must be shaped (chain, draw, *site_shape), got {shape}")
        if leading is None:
            leading = tuple(value.shape[:2])
        elif tuple(value.shape[:2]) != leading:
            raise ValueError(
                f"saved draws[{name!r}] have (chain, draw) = {tuple(value.shape[:2])}, other sites {leading}: the "
                "save was altered or is corrupt"
            )
    if sites is not None:
        _check_saved_shapes("the saved draws", {n: tuple(v.shape[2:]) for n, v in draws.items()}, sites)
