"""Every engine of the package on every Pyro-idiom program (bmm_ppl.testing.idioms, issue 14): each
(program, engine) must match the exact posterior (means within 4 MCSE or 0.1 sd, sds within 10%, SVI
15%) or, where the program allows it, be refused by name before any work; ``pyro.param`` under the
samplers must be refused.

KNOWN_FAILURES below is the one list of what fails today, with what was measured. As a fix lands, delete
its entries: ``strict=True`` makes a fixed case fail until its entry is gone.
"""

import functools

import pytest

from bmm_ppl.testing.idioms import PYRO_IDIOMS, Outcome, check_idiom, check_pyro_idioms, package_engines

ENGINES = package_engines("fast")

REQUIRED_REFUSALS = {("param_site", engine) for engine in ("NUTS", "HMC", "SGLD")}

# (program, engine) -> what fails today, as measured on 2026-12-03 at 12:00 UTC with the fast settings
# (the subsampled plate, positive-definite supports, improper priors, the obs_mask flat entries and the
# enumerated components-plate mixture under SVI were fixed by the program layer and left this table).
KNOWN_FAILURES = {
    ("obs_mask", "SVI(normal)"): "sd of 'mu' off by 31% (0.196 vs 0.286): mu and the imputed entries are "
                                 "correlated a posteriori, which a mean-field guide cannot hold; SVI(mvn) matches",
    ("ordered_vector", "SVI(normal)"): "sd of 'cutpoints'[0] off by 25%: a mean-field guide over correlated base "
                                       "coordinates (an approximation limit, not a bug)",
}


# (program, engine) -> why it may miss: the engine must then say so (a ChainDiagnosticsWarning), never
# return a wrong posterior silently. A chain initialised (uniformly in [-2, 2], as Pyro and NumPyro do)
# near the label-switched local mode locs = (1.4, -1.6), 15.7 nats below the main one, stays there; the
# chain checks report it (measured with 2 chains: split R-hat 1.83, bulk ESS 1.5 per chain).
FLAGGED_MISSES = {
    ("mixture_infer_enumerate", engine): "a chain can stick in the label-switched local mode"
    for engine in ("NUTS", "HMC", "SGLD")
}


@functools.cache
def _program(name):
    return PYRO_IDIOMS[name]()


# CI time: on 2 shared cores the whole matrix takes far longer than CI allows (measured 11:00 UTC, a busy
# machine: NUTS 1900 s, SGLD 1200 s, HMC 750 s, SVI 300 s per column of 32). CI runs the SVI and NUTS
# columns and the samplers' required refusals; the HMC and SGLD columns run with -m slow.
_SLOW_COLUMNS = ("HMC", "SGLD")
_SLOW_CASES: set = set()  # the enumerated mixtures under NUTS: 230-390 s eager, 13-21 s captured (ebea951)


def _cases():
    for program in PYRO_IDIOMS:
        for engine in ENGINES:
            reason = KNOWN_FAILURES.get((program, engine))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            slow = (engine in _SLOW_COLUMNS or (program, engine) in _SLOW_CASES) and (program, engine) not in REQUIRED_REFUSALS
            marks += [pytest.mark.slow] if slow else []
            yield pytest.param(program, engine, marks=marks, id=f"{program}-{engine}")


def _assert_expected(result, program):
    if (program.name, result.engine) in FLAGGED_MISSES and result.outcome is not Outcome.MATCH:
        assert result.outcome is Outcome.FAIL and any(w.startswith("ChainDiagnosticsWarning") for w in result.warnings), result.cell
    elif (program.name, result.engine) in REQUIRED_REFUSALS:
        assert result.outcome is Outcome.REFUSED, result.cell
    elif program.refusable:
        assert result.outcome in (Outcome.MATCH, Outcome.REFUSED), result.cell
    else:
        assert result.outcome is Outcome.MATCH, result.cell


def test_the_known_failures_name_real_cases():
    assert all(program in PYRO_IDIOMS and engine in ENGINES for program, engine in {**KNOWN_FAILURES, **FLAGGED_MISSES})


@pytest.mark.parametrize("program_name,engine_name", list(_cases()))
def test_engine_matches_or_refuses_the_idiom(program_name, engine_name):
    program = _program(program_name)
    # 4,000 draws from a distribution-backed posterior (SVI's guide; stored draws are used whole): the mean
    # check's floor of 0.1 sd binds from 1,600 draws on (4 MCSE = 4 sd / sqrt(n)), and the sd's own error is
    # about 1%, against a 10-15% tolerance, so the check is as strict as at the runner's 10,000. The draws
    # of enumerated sites come from one infer_discrete run per draw where the model does not broadcast
    # (the components-plate mixture: 80 of its 108 s under SVI at 10,000 draws).
    _assert_expected(check_idiom(ENGINES[engine_name], program, engine_name, num_samples=4000), program)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_full_size_matrix(engine_name):
    """Longer runs (``package_engines("full")``): every case outside KNOWN_FAILURES as expected."""
    matrix = check_pyro_idioms({engine_name: package_engines("full")[engine_name]})
    unexpected = []
    for (name, engine), result in matrix.results.items():
        if (name, engine) in KNOWN_FAILURES:
            continue
        try:
            _assert_expected(result, _program(name))
        except AssertionError:
            unexpected.append(f"{name}: {result.cell}")
    assert not unexpected, "\n" + matrix.table() + "\n" + "\n".join(unexpected)
