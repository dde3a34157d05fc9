"""Test helpers shipped with the package, so users can check their own engines."""

from bmm_ppl.testing.conformance import ORACLES, Oracle, check_engine, check_log_evidence, check_moments
from bmm_ppl.testing.idioms import PYRO_IDIOMS, IdiomMatrix, IdiomProgram, Outcome, check_pyro_idioms

__all__ = [
    "ORACLES", "Oracle", "check_engine", "check_log_evidence", "check_moments",
    "PYRO_IDIOMS", "IdiomMatrix", "IdiomProgram", "Outcome", "check_pyro_idioms",
]
