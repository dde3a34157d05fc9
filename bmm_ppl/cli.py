"""The ``bmm`` command: ``bmm --version`` and ``bmm demo``."""

from __future__ import annotations

import argparse
import sys

from bmm_ppl._version import __version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bmm", description="bmm_ppl: Bayesian multimodeling on Pyro")
    parser.add_argument("--version", action="version", version=f"bmm_ppl {__version__}")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="polynomial degree selection by exact evidence (writes figures)")
    demo.add_argument("--out", default="bmm_demo_output", help="folder for the figures (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from bmm_ppl.demo import main as run_demo

        run_demo(args.out)
        return 0
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
