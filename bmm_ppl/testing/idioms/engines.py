"""The package's own engines as columns of the idiom matrix, in a fast and a full size.

Each entry is a factory ``program -> engine``; only SGLD reads the program (its fixed step size is set
from ``program.step_scale``, the smallest posterior sd in unconstrained coordinates: ``lr = 0.1 *
step_scale^2`` keeps the discretisation's variance inflation near 5%, i.e. the sd about 2.5% high).
"""

from __future__ import annotations

from bmm_ppl._enums import StrEnum


class MatrixSize(StrEnum):
    """How long each engine runs on each program."""

    FAST = "fast"
    """CI size: about a second or two per (program, engine) on one core."""
    FULL = "full"
    """Longer chains and more steps: tighter Monte-Carlo errors, for the benchmark table."""


_SETTINGS = {
    MatrixSize.FAST: {"svi_steps": 3000, "particles": 8, "evidence_particles": 1000, "chains": 4, "warmup": 200,
                      "draws": 300, "tree_depth": 8, "sgld_warmup": 1500, "sgld_draws": 4000},
    MatrixSize.FULL: {"svi_steps": 5000, "particles": 8, "evidence_particles": 4000, "chains": 4, "warmup": 500,
                      "draws": 1000, "tree_depth": 10, "sgld_warmup": 4000, "sgld_draws": 12000},
}


def package_engines(size: str | MatrixSize = MatrixSize.FAST) -> dict:
    """``{column: program -> engine}`` for SVI (``"normal"`` and ``"mvn"`` guides), NUTS, HMC and SGLD.

    Examples:
        >>> sorted(package_engines("fast"))
        ['HMC', 'NUTS', 'SGLD', 'SVI(mvn)', 'SVI(normal)']
    """
    from bmm_ppl.inference import HMC, NUTS, SGLD, SVI

    s = _SETTINGS[MatrixSize.parse(size, "size")]
    chains = {"num_chains": s["chains"], "warmup_steps": s["warmup"], "num_samples": s["draws"], "progress": False}
    svi = {"num_steps": s["svi_steps"], "num_particles": s["particles"], "evidence_particles": s["evidence_particles"],
           "progress": False}
    return {
        "SVI(normal)": lambda program: SVI("normal", **svi),
        "SVI(mvn)": lambda program: SVI("mvn", **svi),
        "NUTS": lambda program: NUTS(max_tree_depth=s["tree_depth"], **chains),
        "HMC": lambda program: HMC(**chains),
        "SGLD": lambda program: SGLD(num_samples=s["sgld_draws"], warmup_steps=s["sgld_warmup"],
                                     num_chains=s["chains"], lr=0.1 * program.step_scale**2, progress=False),
    }
