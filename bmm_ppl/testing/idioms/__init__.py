"""The Pyro-idiom conformance suite: small Pyro programs, written as Pyro's documentation writes them,
each with an exact posterior, and a runner that tells for an engine whether it matches each one,
refuses it by name, or fails (and by how much).

    from bmm_ppl.testing import PYRO_IDIOMS, check_pyro_idioms
    matrix = check_pyro_idioms({"mine": MyEngine(num_samples=2000)})
    print(matrix.table())

``package_engines()`` gives the package's own engines as columns; ``benchmarks/pyro_idiom_matrix.py``
prints their matrix.
"""

from bmm_ppl.testing.idioms.engines import MatrixSize, package_engines
from bmm_ppl.testing.idioms.references import Grid, IdiomProgram, SiteMoments, quadrature_moments, trace_program
from bmm_ppl.testing.idioms.runner import IdiomMatrix, IdiomResult, Outcome, check_idiom, check_pyro_idioms
from bmm_ppl.testing.idioms.structure import STRUCTURE_PROGRAMS
from bmm_ppl.testing.idioms.supports import SUPPORT_PROGRAMS

PYRO_IDIOMS = {**STRUCTURE_PROGRAMS, **SUPPORT_PROGRAMS}
"""``{name: builder}``; ``builder()`` returns the :class:`IdiomProgram` (float64, CPU)."""

__all__ = [
    "Grid", "IdiomMatrix", "IdiomProgram", "IdiomResult", "MatrixSize", "Outcome", "PYRO_IDIOMS", "SiteMoments",
    "check_idiom", "check_pyro_idioms", "package_engines", "quadrature_moments", "trace_program",
]
