"""The idiom runner's verdicts on engines whose behaviour is known: exact draws match, a shifted or too
wide posterior fails with its numbers, a refusal counts only when it names a site before any work, and a
crash after fitting is a failure."""

import pyro
import pytest
import torch

from bmm_ppl.inference import Posterior, UnsupportedModelError
from bmm_ppl.testing.idioms import PYRO_IDIOMS
from bmm_ppl.testing.idioms.runner import Outcome, check_idiom, check_pyro_idioms


class _ExactDraws:
    """Draws each latent reference site as independent normals with the exact moments, in 4 chains
    (stored draws, so the runner takes ArviZ's ESS); ``shift``/``widen`` move them by that many sds."""

    def __init__(self, shift=0.0, widen=1.0, skip=()):
        self.shift, self.widen, self.skip = shift, widen, set(skip)

    def fit(self, model, *args, **kwargs):
        program = _program_of(args)
        generator = torch.Generator().manual_seed(1)
        draws = {}
        for site, m in program.reference.items():
            if site in self.skip:
                continue
            noise = torch.randn((4, 1000) + m.mean.shape, generator=generator, dtype=torch.float64)
            draws[site] = m.mean + m.sd * (self.shift + self.widen * noise)
        return Posterior(model, args, kwargs, draws=draws, engine="exact draws")


_BUILT = {}


def _program(name):
    if name not in _BUILT:
        _BUILT[name] = PYRO_IDIOMS[name]()
    return _BUILT[name]


def _program_of(args):
    return next(p for p in _BUILT.values() if p.args is args or all(a is b for a, b in zip(p.args, args)))


class _Refuser:
    def __init__(self, message, runs=0):
        self.message, self.runs = message, runs

    def fit(self, model, *args, **kwargs):
        for _ in range(self.runs):
            with pyro.get_param_store().scope():
                pyro.poutine.trace(model).get_trace(*args, **kwargs)
        raise UnsupportedModelError(self.message)


class _BrokenSamples(_ExactDraws):
    def fit(self, model, *args, **kwargs):
        posterior = super().fit(model, *args, **kwargs)

        def fail(num_samples=None):
            raise RuntimeError("plate '_bmm_guide_draws' collides")

        posterior.samples = fail
        return posterior


def test_exact_draws_match_and_a_shift_of_half_an_sd_fails():
    program = _program("normal_normal")
    assert check_idiom(_ExactDraws(), program).outcome is Outcome.MATCH
    shifted = check_idiom(_ExactDraws(shift=0.5), program)
    assert shifted.outcome is Outcome.FAIL and "mean of 'mu' off by" in shifted.detail
    assert 0.45 < shifted.site_errors["mu"]["mean_error_in_sd"] < 0.55


def test_a_posterior_20_percent_too_wide_fails_on_the_sd():
    result = check_idiom(_ExactDraws(widen=1.2), _program("nested_plates"))
    assert result.outcome is Outcome.FAIL and "sd of 'mu'" in result.detail
    assert 0.15 < result.site_errors["mu"]["sd_relative_error"] < 0.25


def test_constants_and_unchecked_entries():
    # lkj_cholesky has constant entries (sd 0), obs_mask NaN entries: exact draws match both.
    assert check_idiom(_ExactDraws(), _program("lkj_cholesky")).outcome is Outcome.MATCH
    assert check_idiom(_ExactDraws(), _program("obs_mask")).outcome is Outcome.MATCH


def test_a_deterministic_site_is_read_from_the_predictive_when_not_among_the_samples():
    program = _program("deterministic")
    assert check_idiom(_ExactDraws(skip={"shifted"}), program).outcome is Outcome.MATCH


def test_a_missing_site_fails():
    result = check_idiom(_ExactDraws(skip={"tau"}), _program("normal_gamma"))
    assert result.outcome is Outcome.FAIL and "'tau' is missing from post.samples()" in result.detail


def test_a_refusal_must_name_a_site_and_come_before_any_work():
    program = _program("param_site")
    named = check_idiom(_Refuser("the model has pyro.param sites ['prior_loc']"), program)
    assert named.outcome is Outcome.REFUSED
    anonymous = check_idiom(_Refuser("this model is not supported"), program)
    assert anonymous.outcome is Outcome.FAIL and "names no site" in anonymous.detail
    late = check_idiom(_Refuser("site 'prior_loc' is a pyro.param", runs=50), program)
    assert late.outcome is Outcome.FAIL and "refused after work (50 model runs" in late.detail


def test_a_crash_after_fitting_is_a_failure_not_a_refusal():
    result = check_idiom(_BrokenSamples(), _program("normal_normal"))
    assert result.outcome is Outcome.FAIL and result.detail.startswith("post.samples() raised RuntimeError")


def test_the_matrix_table_lists_programs_by_engine():
    for name in ("normal_normal", "beta_binomial"):
        _program(name)
    matrix = check_pyro_idioms({"exact": _ExactDraws(), "shifted": _ExactDraws(shift=1.0)},
                               programs=[_BUILT["normal_normal"], _BUILT["beta_binomial"]])
    table = matrix.table()
    assert table.splitlines()[0].split() == ["program", "|", "exact", "|", "shifted"]
    assert matrix["beta_binomial", "exact"].cell == "match"
    assert matrix["beta_binomial", "shifted"].cell.startswith("FAIL: mean of 'p' off by")
    assert len(table.splitlines()) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_programs_move_to_a_dtype(dtype):
    program = _program("to_event").to(dtype)
    assert program.args[0].dtype == dtype and program.reference["mu"].mean.dtype == dtype
