"""Tests that run each tutorial in quick mode."""

import importlib.util
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"


def load_tutorial(filename: str):
    """The tutorial script ``tutorials/<filename>`` as a module (its ``main`` not yet run)."""
    spec = importlib.util.spec_from_file_location(f"tutorial_{Path(filename).stem}", TUTORIALS / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
