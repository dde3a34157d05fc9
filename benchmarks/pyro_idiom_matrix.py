"""The Pyro-idiom matrix: every engine of the package on every program of ``bmm_ppl.testing.idioms``.

Each cell says whether the engine matched the program's exact posterior (means within 4 MCSE or 0.1
posterior sd, sds within 10%, 15% for SVI), refused it by name before doing work, or failed, with the
measured discrepancy or the error. The full size runs longer chains and more SVI steps than the CI tests
(``tests/testing/test_pyro_idioms.py``); below the table each failure is listed whole, with the warnings
the fit raised and the seconds it took.

Run: ``python benchmarks/pyro_idiom_matrix.py [--size full|fast] [--engines NUTS,SVI(mvn)] [--programs a,b]``
"""

from __future__ import annotations

import argparse

import torch

from bmm_ppl.testing.idioms import PYRO_IDIOMS, check_pyro_idioms, package_engines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["fast", "full"])
    parser.add_argument("--engines", default=None, help="comma-separated columns (default: all)")
    parser.add_argument("--programs", default=None, help="comma-separated programs (default: all)")
    parser.add_argument("--width", type=int, default=60, help="failure cells are cut to this many characters")
    options = parser.parse_args()
    torch.set_num_threads(1)
    engines = package_engines(options.size)
    if options.engines:
        engines = {name: engines[name] for name in options.engines.split(",")}
    programs = options.programs.split(",") if options.programs else list(PYRO_IDIOMS)
    matrix = check_pyro_idioms(engines, programs=programs)
    print(matrix.table(width=options.width))
    print()
    for (program, engine), result in matrix.results.items():
        if result.outcome.value != "match":
            print(f"{program} x {engine} ({result.seconds:.1f} s): {result.cell}")
            for warning in result.warnings:
                print(f"    warned {warning[:200]}")
    counts = {}
    for result in matrix.results.values():
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    print("\n" + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
