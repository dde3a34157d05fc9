"""The Pyro-idiom conformance suite: small Pyro programs, written as Pyro's documentation writes them,
each with an exact posterior, and a runner that tells for an engine whether it matches each one,
refuses it by name, or fails (and by how much).

    from bmm_ppl.testing import PYRO_IDIOMS, check_pyro_idioms
    matrix = check_pyro_idioms({"mine": MyEngine(num_samples=2000)})
    print(matrix.table())
"""

from bmm_ppl.testing.idioms.references import Grid, IdiomProgram, SiteMoments, quadrature_moments
from bmm_ppl.testing.idioms.structure import STRUCTURE_PROGRAMS
from bmm_ppl.testing.idioms.supports import SUPPORT_PROGRAMS

PYRO_IDIOMS = {**STRUCTURE_PROGRAMS, **SUPPORT_PROGRAMS}
"""``{name: builder}``; ``builder()`` returns the :class:`IdiomProgram` (float64, CPU)."""

__all__ = ["Grid", "IdiomProgram", "PYRO_IDIOMS", "SiteMoments", "quadrature_moments"]
