"""Tutorial 07 runs end to end (small settings) and shows what it claims."""

import importlib.util
import pathlib

TUTORIAL = pathlib.Path(__file__).parents[2] / "tutorials" / "07_multitask_structure.py"


def load():
    spec = importlib.util.spec_from_file_location("tutorial_07", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_07(tmp_path):
    results = load().main(tmp_path, quick=True)
    assert results["synthetic_best"] == "related"
    assert results["relation_agreement"] > 0.8
    curves = results["curves"]
    # Fewest examples: sharing beats independent tasks; most examples: the gap has shrunk.
    assert curves["hierarchical"][0] < curves["independent"][0]
    gap_first = curves["independent"][0] - curves["hierarchical"][0]
    gap_last = abs(curves["independent"][-1] - curves["hierarchical"][-1])
    assert gap_last < 0.5 * gap_first
    assert set(results["grunfeld_test_mse"]) == {"independent", "shared", "hierarchical", "related"}
    for name in ("synthetic_task_relation.png", "error_vs_examples.png", "grunfeld_firm_relation.png"):
        assert (tmp_path / name).exists()
