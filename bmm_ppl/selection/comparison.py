"""Rank models by their log evidence, and average their predictions (Bayesian model averaging)."""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from bmm_ppl.inference.evidence import Evidence, EvidenceMethod, NonFiniteEvidenceError
from bmm_ppl.inference.posterior import Posterior


class IncompatibleEvidenceError(ValueError):
    """The evidences to rank are of kinds that cannot be compared (e.g. an exact value and a bound)."""


class Comparison:
    """Models ranked by log evidence, with posterior model probabilities and a BMA predictive.

    Attributes:
        posteriors: ``{name: Posterior}`` in the order given.
        prior: ``{name: prior model probability}``.

    Examples:
        >>> from bmm_ppl.models import BayesianLinearRegression, polynomial_features
        >>> from bmm_ppl.inference import Exact
        >>> x = torch.linspace(0, 1, 20, dtype=torch.float64); y = 1 + 2 * x + 0.1 * torch.sin(40 * x)
        >>> models = {f"degree {d}": BayesianLinearRegression(polynomial_features(d), 1.0, 100.0) for d in (0, 1, 5)}
        >>> cmp = compare(models, Exact(), x, y)
        >>> cmp.best
        'degree 1'
    """

    def __init__(self, posteriors: Mapping[str, Posterior], prior: Mapping[str, float] | None = None):
        if not posteriors:
            raise ValueError("posteriors is empty: compare needs at least one model")
        missing = [name for name, post in posteriors.items() if post.log_evidence is None]
        if missing:
            raise ValueError(f"no log evidence for {missing}: fit them with an engine that reports one")
        self.posteriors = dict(posteriors)
        if prior is None:
            prior = {name: 1.0 / len(posteriors) for name in posteriors}
        if set(prior) != set(posteriors):
            raise ValueError(f"prior must name exactly the models {sorted(posteriors)}, got {sorted(prior)}")
        if any(p < 0 for p in prior.values()) or not math.isclose(sum(prior.values()), 1.0, rel_tol=1e-6):
            raise ValueError(f"prior must be non-negative model probabilities summing to 1, got {dict(prior)}")
        self.prior = dict(prior)
        for name, post in self.posteriors.items():
            value = post.log_evidence.value
            if not math.isfinite(value):
                raise NonFiniteEvidenceError(
                    f"the log evidence of model {name!r} ({post.log_evidence.method.value}) is {value!r}: it "
                    "overflowed or diverged, and cannot be ranked",
                    method=post.log_evidence.method.value,
                    model=name,
                )
        _check_compatible({n: p.log_evidence for n, p in self.posteriors.items()})

    @property
    def evidences(self) -> dict[str, Evidence]:
        return {name: post.log_evidence for name, post in self.posteriors.items()}

    @property
    def probabilities(self) -> dict[str, float]:
        """Posterior model probabilities ``p(model | data)`` from the log evidences and the model prior."""
        # Log-sum-exp: relative to the best evidence first, so that evidences of any finite magnitude
        # (-1e6 nats, say, where exp underflows to 0/0) give exact ratios.
        best = max(e.value for n, e in self.evidences.items() if self.prior[n] > 0)
        logits = {
            n: (e.value - best) + math.log(self.prior[n]) if self.prior[n] > 0 else -math.inf
            for n, e in self.evidences.items()
        }
        top = max(logits.values())
        weights = {n: math.exp(v - top) for n, v in logits.items()}
        total = sum(weights.values())
        return {n: w / total for n, w in weights.items()}

    @property
    def ranking(self) -> list[str]:
        """Model names from highest to lowest log evidence."""
        return sorted(self.posteriors, key=lambda n: -self.evidences[n].value)

    @property
    def best(self) -> str:
        return self.ranking[0]

    @property
    def table(self):
        """A ``pandas.DataFrame`` ranked by log evidence: log evidence, stderr, method, prior, probability."""
        import pandas as pd

        probs = self.probabilities
        rows = [
            {
                "model": name,
                "log_evidence": self.evidences[name].value,
                "stderr": self.evidences[name].stderr,
                "method": self.evidences[name].method.value,
                "prior": self.prior[name],
                "probability": probs[name],
            }
            for name in self.ranking
        ]
        return pd.DataFrame(rows).set_index("model")

    def predict(self, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        """Bayesian-model-averaged predictive draws: each draw comes from model ``k`` with probability
        ``p(model k | data)``. Returns ``{site: Tensor[num_samples, *shape]}`` for the sites all models share.

        The mixture is drawn by allocating ``num_samples`` to the models by their probabilities
        (multinomial), so the result follows ``sum_k p(k | data) p(y | data, k)`` exactly in distribution.
        """
        names = list(self.posteriors)
        probs = self.probabilities
        # How many draws each model contributes is host-side bookkeeping: on the CPU on purpose.
        weights = torch.tensor([probs[n] for n in names], dtype=torch.float64, device="cpu")
        counts = torch.distributions.Multinomial(num_samples, probs=weights).sample().long().tolist()
        pieces: dict[str, list[torch.Tensor]] = {}
        shared = None
        for name, count in zip(names, counts):
            if count == 0:
                continue
            draws = self.posteriors[name].predict(*args, num_samples=count, **kwargs)
            shared = set(draws) if shared is None else shared & set(draws)
            for site, value in draws.items():
                pieces.setdefault(site, []).append(value)
        out = {site: torch.cat(pieces[site]) for site in sorted(shared or ())}
        if out:
            first = next(iter(out.values()))
            order = torch.randperm(num_samples, device=first.device)
            out = {site: value[order] for site, value in out.items()}
        return out

    def plot(self, ax=None):
        """Bar chart of log evidence (left axis) and posterior probability (right axis) per model."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(self.posteriors) + 2), 3.5))
        names = list(self.posteriors)
        values = [self.evidences[n].value for n in names]
        errors = [self.evidences[n].stderr or 0.0 for n in names]
        ax.bar(range(len(names)), values, yerr=errors, color="tab:blue", alpha=0.8, label="log evidence")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        method = self.evidences[names[0]].method.value
        ax.set_ylabel(f"log evidence ({method})")
        twin = ax.twinx()
        probs = self.probabilities
        twin.plot(range(len(names)), [probs[n] for n in names], "o-", color="tab:red", label="p(model | data)")
        twin.set_ylabel("posterior model probability", color="tab:red")
        twin.set_ylim(0, 1.05)
        ax.figure.tight_layout()
        return ax

    def __repr__(self) -> str:
        return f"Comparison(best={self.best!r}, models={len(self.posteriors)})"


def _check_compatible(evidences: Mapping[str, Evidence]) -> None:
    kinds = {}
    for name, evidence in evidences.items():
        kinds.setdefault(evidence.method.kind, []).append(f"{name} ({evidence.method.value})")
    if len(kinds) > 1:
        described = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items())
        raise IncompatibleEvidenceError(
            "cannot rank evidences of different kinds (a bound or a heuristic is not comparable with an "
            f"estimate of the evidence itself): {described}. Fit all models with engines of one kind."
        )


def compare(
    models: Mapping[str, Callable],
    engine,
    *args,
    prior: Mapping[str, float] | None = None,
    executor=None,
    **kwargs,
) -> Comparison:
    """Fits every model with ``engine`` on the same data and ranks them by log evidence.

    Args:
        models: ``{name: Pyro model}``.
        engine: any engine with ``.fit(model, *args, **kwargs) -> Posterior``.
        *args: the data's positional arguments, passed to every model.
        **kwargs: the data's keyword arguments, passed to every model.
        prior: prior model probabilities (uniform when ``None``).
        executor: anything with ``.map(fn, iterable)`` (e.g. a ``concurrent.futures`` executor or a Ray
            pool) to fit models in parallel; in-process by default.

    Returns:
        a :class:`Comparison`.

    Raises:
        NonFiniteEvidenceError: a model's evidence overflowed to -inf (or is NaN); the message and the
            error's ``model`` attribute name that model. Any other error of a fit keeps its type and
            carries a note naming the model.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict {name: model}")
    names = list(models)

    def fit(name):
        try:
            return engine.fit(models[name], *args, **kwargs)
        except NonFiniteEvidenceError as error:
            raise NonFiniteEvidenceError(
                f"the evidence of model {name!r} is not finite: {error}", method=error.method, model=name
            ) from error
        except Exception as error:
            # Which of the models failed is the first thing a user needs; the error keeps its type.
            error.add_note(f"(raised while compare fitted model {name!r})")
            raise

    mapper = map if executor is None else executor.map
    posteriors = dict(zip(names, mapper(fit, names)))
    return Comparison(posteriors, prior)
