"""Runs engines on the Pyro-idiom programs and tells, for each pair, whether the engine matches the
exact posterior, refuses the program by name before doing work, or fails (and by how much).

Match (issue 14's criterion): for every checked entry of every reference site, the posterior mean within
4 Monte-Carlo standard errors (``MCSE = sd / sqrt(ESS)``; ESS from ArviZ over stored chains, the number
of draws for an engine that draws independently from a distribution) or within 0.1 posterior sd of the
exact one, and the sd within ``sd_tolerance`` (relative; default 10%, 15% for a variational or other
distribution-backed posterior); constants (reference sd 0) to ``1e-6``; and the log evidence, where the
program has one and the engine reports one, as its method promises
(:func:`~bmm_ppl.testing.conformance.log_evidence_error`).

Refused: ``engine.fit`` raised :class:`~bmm_ppl.inference.errors.UnsupportedModelError` whose message
names a site (or plate) of the program, after at most ``_REFUSAL_MODEL_RUNS`` runs of the model and no
optimiser step: a refusal before any work. Anything else is a failure: another exception, a refusal
after work or naming nothing, a crash after training (in ``post.samples()``, ``post.predict()`` or the
evidence), non-finite draws, a missing site, or a discrepancy. A site is read from ``post.samples()``;
a ``pyro.deterministic`` site that is not there, from ``post.predict()``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import warnings
from typing import Callable

import pyro
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.testing.conformance import effective_sample_sizes, log_evidence_error
from bmm_ppl.testing.idioms.references import IdiomProgram, SiteMoments, trace_program

_REFUSAL_MODEL_RUNS = 10  # tracing and shape checks; a fit that trains or samples runs the model far more often
_CONSTANT_TOLERANCE = 1e-6


class Outcome(StrEnum):
    """What an engine did with a program."""

    MATCH = "match"
    """The posterior matches the exact reference within the Monte-Carlo tolerances."""
    REFUSED = "refused"
    """``UnsupportedModelError`` naming a site of the program, before any work."""
    FAIL = "fail"
    """Anything else; :attr:`IdiomResult.detail` says what and by how much."""


@dataclasses.dataclass
class IdiomResult:
    """One (program, engine) entry of the matrix.

    Attributes:
        outcome: the :class:`Outcome`.
        detail: for a failure the error or the discrepancy; for a refusal the message; for a match the
            largest errors.
        site_errors: ``{site: {"mean_error_in_mcse", "mean_error_in_sd", "sd_relative_error", "min_ess"}}``
            (maxima over the checked entries).
        log_evidence_error: the engine's log evidence minus the exact one (``None`` where either is absent).
        warnings: ``"Category: message"`` of the warnings the fit and the checks raised.
        seconds: wall time of the fit and the checks.
    """

    program: str
    engine: str
    outcome: Outcome
    detail: str = ""
    site_errors: dict = dataclasses.field(default_factory=dict)
    log_evidence_error: float | None = None
    warnings: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def cell(self) -> str:
        """The table cell: ``match``, ``refused`` or ``FAIL: <detail>``."""
        return self.outcome.value if self.outcome is not Outcome.FAIL else f"FAIL: {self.detail}"


@dataclasses.dataclass
class IdiomMatrix:
    """Results by ``(program, engine)``, printable as a table."""

    results: dict[tuple[str, str], IdiomResult]

    def __getitem__(self, key: tuple[str, str]) -> IdiomResult:
        return self.results[key]

    @property
    def programs(self) -> list[str]:
        return list(dict.fromkeys(p for p, _ in self.results))

    @property
    def engines(self) -> list[str]:
        return list(dict.fromkeys(e for _, e in self.results))

    def table(self, width: int = 38) -> str:
        """A plain-text table, program by engine; failure cells cut to ``width`` characters."""
        engines = self.engines
        rows = [["program"] + engines]
        for program in self.programs:
            cells = []
            for engine in engines:
                result = self.results.get((program, engine))
                text = "" if result is None else result.cell
                cells.append(text if len(text) <= width else text[: width - 1] + "…")
            rows.append([program] + cells)
        widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def _named_entries(engines) -> dict[str, object]:
    if isinstance(engines, dict):
        return dict(engines)
    name = type(engines).__name__ if hasattr(engines, "fit") else getattr(engines, "__name__", "engine")
    return {name: engines}


def check_pyro_idioms(engines, programs=None, num_samples: int = 10000, sd_tolerance: float | None = None,
                      evidence_tolerance: float = 0.5, dtype=torch.float64, seed: int = 0) -> IdiomMatrix:
    """Fits every program with every engine and compares the posteriors with the exact references.

    Args:
        engines: an engine (an object with ``fit(model, *args, **kwargs) -> Posterior``), a factory
            ``program -> engine`` (to size an engine's settings to a program, e.g. SGLD's ``lr`` from
            ``program.step_scale``), or ``{name: engine or factory}`` for several columns.
        programs: names from :data:`~bmm_ppl.testing.idioms.PYRO_IDIOMS`, :class:`IdiomProgram` objects,
            or ``None`` for all of them.
        num_samples: draws taken from a distribution-backed posterior (stored draws are used whole).
        sd_tolerance: relative sd tolerance; ``None``: 0.10 for stored draws, 0.15 otherwise (SVI).
        evidence_tolerance: nats allowed to an evidence estimate or below a bound (beyond 3 stderrs).
        dtype: the programs' floating dtype.
        seed: the Pyro seed set before each fit.

    Returns:
        an :class:`IdiomMatrix`; ``matrix.table()`` prints it.

    Examples:
        >>> from bmm_ppl.inference import SVI
        >>> matrix = check_pyro_idioms({"SVI": SVI(num_steps=300, evidence_particles=200, progress=False)},
        ...                            programs=["normal_normal"])
        >>> matrix["normal_normal", "SVI"].outcome
        <Outcome.MATCH: 'match'>
    """
    from bmm_ppl.testing.idioms import PYRO_IDIOMS

    chosen = list(PYRO_IDIOMS) if programs is None else list(programs)
    built = [p if isinstance(p, IdiomProgram) else PYRO_IDIOMS[p]() for p in chosen]
    results = {}
    for program in built:
        program = program.to(dtype)
        for name, engine in _named_entries(engines).items():
            results[program.name, name] = check_idiom(engine, program, name, num_samples, sd_tolerance,
                                                      evidence_tolerance, seed)
    return IdiomMatrix(results)


class _WorkCounter:
    """Counts runs of the model and optimiser steps (of any ``torch.optim`` optimiser) while active."""

    def __init__(self):
        self.model_runs = 0
        self.optimizer_steps = 0
        self._handle = None

    def wrap(self, model: Callable) -> Callable:
        @functools.wraps(model)
        def counted(*args, **kwargs):
            self.model_runs += 1
            return model(*args, **kwargs)

        return counted

    def __enter__(self):
        def count(optimizer, args, kwargs):
            self.optimizer_steps += 1

        self._handle = register_optimizer_step_pre_hook(count)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def check_idiom(engine, program: IdiomProgram, engine_name: str = "engine", num_samples: int = 10000,
                sd_tolerance: float | None = None, evidence_tolerance: float = 0.5, seed: int = 0) -> IdiomResult:
    """One entry of :func:`check_pyro_idioms`: fits ``program`` with ``engine`` (or ``engine(program)``
    for a factory) and returns the :class:`IdiomResult`; never raises for what the engine does."""
    start = time.perf_counter()
    result = IdiomResult(program.name, engine_name, Outcome.FAIL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _run(engine, program, result, num_samples, sd_tolerance, evidence_tolerance, seed)
        except Exception as error:  # noqa: BLE001 - the matrix records what any engine raises
            result.outcome, result.detail = Outcome.FAIL, _describe(error)
    result.warnings = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    result.seconds = time.perf_counter() - start
    return result


def _describe(error: BaseException, where: str = "") -> str:
    lines = str(error).strip().splitlines()
    return f"{where}{type(error).__name__}: {lines[0] if lines else ''}"


def _run(engine, program, result, num_samples, sd_tolerance, evidence_tolerance, seed):
    if not hasattr(engine, "fit"):
        engine = engine(program)
    pyro.set_rng_seed(seed)
    with _WorkCounter() as counter:
        try:
            posterior = engine.fit(counter.wrap(program.model), *program.args, **program.kwargs)
        except UnsupportedModelError as error:
            _judge_refusal(error, program, counter, result)
            return
        except Exception as error:  # noqa: BLE001
            result.detail = _describe(error, "fit raised ")
            return
    # Only a pyro.deterministic site may come from the predictive: it would redraw a missing latent site
    # from its prior.
    deterministic = {n for n, site in trace_program(program).nodes.items() if site.get("infer", {}).get("_deterministic")}
    stage = "post.samples()"
    try:
        stored = posterior.has_stored_draws
        samples = posterior.samples(None if stored else num_samples)
        chains = posterior.num_chains if stored else 1
        predicted = None
        problems = []
        for site, moments in program.reference.items():
            draws = samples.get(site)
            if draws is None and site in deterministic:
                stage = "post.predict()"
                if predicted is None:
                    drawn = next(iter(samples.values())).shape[0] if samples else num_samples
                    predicted = posterior.predict(num_samples=drawn)
                draws = predicted.get(site)
            if draws is None:
                where = "post.samples() nor post.predict()" if site in deterministic else "post.samples()"
                problems.append(f"{site!r} is missing from {where}")
                continue
            tolerance = sd_tolerance if sd_tolerance is not None else (0.10 if stored else 0.15)
            errors, problem = _compare_site(site, draws, chains, stored, moments, tolerance)
            result.site_errors[site] = errors
            if problem:
                problems.append(problem)
        stage = "the evidence check"
        if program.log_evidence is not None and posterior.log_evidence is not None:
            try:
                result.log_evidence_error = log_evidence_error(posterior.log_evidence, program.log_evidence,
                                                               evidence_tolerance, "log evidence")
            except AssertionError as mismatch:
                problems.append(str(mismatch))
    except Exception as error:  # noqa: BLE001
        result.detail = _describe(error, f"{stage} raised ")
        return
    if problems:
        result.detail = "; ".join(problems)
        return
    result.outcome = Outcome.MATCH
    worst_mcse = max((e["mean_error_in_mcse"] for e in result.site_errors.values()), default=0.0)
    worst_sd = max((e["sd_relative_error"] for e in result.site_errors.values()), default=0.0)
    result.detail = f"mean within {worst_mcse:.1f} MCSE, sd within {100 * worst_sd:.0f}%"


def _judge_refusal(error, program, counter, result):
    message = str(error)
    names = [n for n in trace_program(program).nodes if n not in ("_INPUT", "_RETURN")]
    named = [n for n in names if re.search(rf"(?<![\w$]){re.escape(n)}(?![\w$])", message)]
    if counter.model_runs > _REFUSAL_MODEL_RUNS or counter.optimizer_steps:
        result.detail = (f"refused after work ({counter.model_runs} model runs, {counter.optimizer_steps} optimiser "
                         f"steps): {_describe(error)}")
    elif not named:
        result.detail = f"the refusal names no site of the program: {_describe(error)}"
    else:
        result.outcome, result.detail = Outcome.REFUSED, message.strip().splitlines()[0]


def _compare_site(site: str, draws: torch.Tensor, chains: int, stored: bool, moments: SiteMoments, tolerance: float):
    """Errors of one site's draws ``Tensor[n, *shape]`` against its moments, and a problem text or ``None``."""
    draws = draws.detach().to("cpu", torch.float64)
    mean_ref = moments.mean.detach().to("cpu", torch.float64).reshape(-1)
    sd_ref = moments.sd.detach().to("cpu", torch.float64).reshape(-1)
    if draws.shape[1:] != moments.mean.shape:
        return {}, f"{site!r} has shape {tuple(draws.shape[1:])}, the reference {tuple(moments.mean.shape)}"
    flat = draws.reshape(draws.shape[0], -1)
    checked = ~mean_ref.isnan()
    if not torch.isfinite(flat[:, checked]).all():
        return {}, f"{site!r} has non-finite draws"
    n = flat.shape[0]
    ess = effective_sample_sizes(flat.reshape(chains, n // chains, -1)) if stored and chains * (n // chains) == n \
        else torch.full((flat.shape[1],), float(n), dtype=torch.float64)
    ess = torch.where(torch.isfinite(ess) & (ess > 0), ess, torch.full_like(ess, float(n)))  # constant chains
    mean, sd = flat.mean(0), flat.std(0)
    constant = checked & (sd_ref == 0)
    varying = checked & (sd_ref > 0)
    scale = _CONSTANT_TOLERANCE * (1 + mean_ref.abs())
    bad_constant = constant & (((mean - mean_ref).abs() > scale) | (sd > scale))
    gap = (mean - mean_ref).abs()
    in_mcse = gap / (sd_ref / ess.sqrt())
    in_sd = gap / sd_ref
    sd_error = (sd / sd_ref - 1).abs()
    bad_mean = varying & (in_mcse > 4) & (in_sd > 0.1)
    bad_sd = varying & (sd_error > tolerance) if not moments.discrete else torch.zeros_like(varying)
    pick = lambda values, mask: float(values[mask].max()) if mask.any() else 0.0  # noqa: E731
    errors = {"mean_error_in_mcse": pick(in_mcse, varying), "mean_error_in_sd": pick(in_sd, varying),
              "sd_relative_error": 0.0 if moments.discrete else pick(sd_error, varying),
              "min_ess": pick(-ess, checked) * -1 if checked.any() else math.nan}
    problems = []
    if bad_constant.any():
        problems.append(f"constant entries of {site!r} vary or are off")
    if bad_mean.any():
        j = int(torch.where(bad_mean, in_sd, torch.zeros_like(in_sd)).argmax())
        problems.append(f"mean of {site!r}{_entry(j, moments)} off by {float(in_mcse[j]):.1f} MCSE "
                        f"({float(in_sd[j]):.2f} sd: {float(mean[j]):.4g} vs {float(mean_ref[j]):.4g})")
    if bad_sd.any():
        j = int(torch.where(bad_sd, sd_error, torch.zeros_like(sd_error)).argmax())
        problems.append(f"sd of {site!r}{_entry(j, moments)} off by {100 * float(sd_error[j]):.0f}% "
                        f"({float(sd[j]):.4g} vs {float(sd_ref[j]):.4g})")
    return errors, "; ".join(problems) or None


def _entry(flat_index: int, moments: SiteMoments) -> str:
    if moments.mean.dim() == 0:
        return ""
    index = torch.unravel_index(torch.tensor(flat_index), moments.mean.shape)
    return "[" + ", ".join(str(int(i)) for i in index) + "]"
