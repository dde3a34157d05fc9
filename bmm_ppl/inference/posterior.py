"""The one result type that every engine returns."""

from __future__ import annotations

import os
from typing import Callable

import torch

from bmm_ppl.inference.evidence import Evidence
from bmm_ppl.inference.latents import LatentDistribution, latent_distribution_from_state_dict
from bmm_ppl.inference.program.runs import observed_values, pointwise_log_likelihood, predictive_draws

_FORMAT = "bmm_ppl.Posterior/1"


class Posterior:
    """A fitted posterior over a Pyro model's latent sites, with its evidence and type-II hyperparameters.

    Engines build it; users read it. Draws are kept shaped ``(chain, draw, *site_shape)``. A posterior
    from an engine with a closed-form or variational distribution (``Exact``, ``SVI``) keeps that
    distribution and draws from it on demand, as one chain.

    Args:
        model: the Pyro program that was fitted, called as ``model(*args, **kwargs)``.
        args, kwargs: the data it was fitted to.
        draws: ``{site: Tensor[chain, draw, *site_shape]}`` stored draws (sampling engines).
        latent_distribution: a :class:`LatentDistribution` to draw from (exact and variational engines).
        log_evidence: an :class:`Evidence`, or ``None`` where the engine gives none.
        hyperparameters: ``{name: Tensor}`` type-II values of the model's ``pyro.param`` sites.
        sample_stats: ``{stat: Tensor[chain, draw]}`` (divergences, acceptance, step size).
        loss_trace: Tensor[num_steps] of the objective the engine minimised.
        diagnostics: anything else the engine wants to report (convergence, boundaries), as plain data.
        engine: the engine's name.

    Example:
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
    def _model_or_raise(self) -> Callable:
        if self.model is None:
            raise RuntimeError("this Posterior was loaded without its model; pass model= to Posterior.load")
        return self.model

    def predict(self, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior predictive draws: the model run at ``args`` under ``num_samples`` posterior draws.

        Args:
            *args, **kwargs: the model's arguments (e.g. new inputs ``x_new``; leave the observations out
                to draw them). With none given, the fitted arguments are used with observations redrawn
                only where the model leaves them ``None``.

        Returns:
            ``{site: Tensor[num_samples, *site_shape]}`` for every sample site the posterior does not fix
            (the observations) and every ``pyro.deterministic`` site.
        """
        model = self._model_or_raise()
        if not args and not kwargs:
            args, kwargs = self.args, self.kwargs
        return predictive_draws(model, args, kwargs, self.samples(num_samples), self.hyperparameters)

    def log_likelihood(self, draws: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Pointwise ``log p(y_i | draw)`` of the fitted data: ``{obs_site: Tensor[chain, draw, n_obs]}``."""
        draws = self.draws() if draws is None else draws
        chains, per_chain = next(iter(draws.values())).shape[:2]
        flat = {n: v.reshape((-1,) + v.shape[2:]) for n, v in draws.items()}
        loglik = pointwise_log_likelihood(self._model_or_raise(), self.args, self.kwargs, flat, self.hyperparameters)
        return {n: v.reshape(chains, per_chain, -1) for n, v in loglik.items()}

    def observed_data(self) -> dict[str, torch.Tensor]:
        """``{obs_site: value}`` of the fitted data."""
        return observed_values(self._model_or_raise(), self.args, self.kwargs, self.hyperparameters)

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
    def state_dict(self) -> dict:
        """Tensors, numbers and strings only: ``torch.save`` it and read it back with ``weights_only=True``."""
        return {
            "format": _FORMAT,
            "engine": self.engine,
            "draws": self._draws,
            "latent_distribution": None if self.latent_distribution is None else self.latent_distribution.state_dict(),
            "log_evidence": None if self.log_evidence is None else self.log_evidence.to_dict(),
            "hyperparameters": self.hyperparameters,
            "sample_stats": self.sample_stats,
            "loss_trace": self.loss_trace,
            "diagnostics": self.diagnostics,
        }

    def load_state_dict(self, state: dict) -> "Posterior":
        """Replaces this posterior's fitted content with a saved one; the model and data stay."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"not a saved Posterior (format {state.get('format')!r}, expected {_FORMAT!r})")
        latent = state["latent_distribution"]
        self.engine = state["engine"]
        self._draws = state["draws"]
        self.latent_distribution = None if latent is None else latent_distribution_from_state_dict(latent)
        self.log_evidence = None if state["log_evidence"] is None else Evidence.from_dict(state["log_evidence"])
        self.hyperparameters = dict(state["hyperparameters"])
        self.sample_stats = dict(state["sample_stats"])
        self.loss_trace = state["loss_trace"]
        self.diagnostics = dict(state["diagnostics"])
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`state_dict` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Callable | None = None, args: tuple = (), kwargs: dict | None = None,
        map_location=None,
    ) -> "Posterior":
        """Reads a saved posterior without unpickling code (``weights_only=True``); pass the model and data
        to predict with it again."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        placeholder = cls(model, args, kwargs, draws={"_": torch.zeros(1, 1, device="cpu")})
        return placeholder.load_state_dict(state)

    def __repr__(self) -> str:
        evidence = "none" if self.log_evidence is None else f"{self.log_evidence.value:.4g} ({self.log_evidence.method})"
        sites = list(self._draws) if self._draws else list(getattr(self.latent_distribution, "site_shapes", {}))
        return f"Posterior(engine={self.engine!r}, sites={sites}, log_evidence={evidence})"
