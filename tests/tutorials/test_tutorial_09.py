"""Tutorial 09 (architecture selection by the Laplace evidence on digits) runs in quick mode, and its
numbers are what they claim to be."""

import math
from pathlib import Path

import pytest

from tests.tutorials import load_tutorial


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tutorial_09_quick(tmp_path):
    tutorial = load_tutorial("09_laplace_architecture_selection.py")
    output = tutorial.main(tmp_path, quick=True)
    for figure in output["figures"]:
        assert Path(figure).exists() and Path(figure).stat().st_size > 0
    rows = output["rows"]
    assert [r["architecture"] for r in rows] == ["64-10", "64-8-10", "64-16-16-10"]
    for row in rows:
        assert math.isfinite(row["log_evidence"]) and math.isfinite(row["training_speed"])
        # a trained network predicts far better than chance (log 10 = 2.30 nats)
        assert 0.0 < row["test_nll"] < 1.0 and 0.0 < row["validation_nll"] < 1.0
    # the printed agreement is computed from the rows: each pick has the criterion's best score
    agreement = output["agreement"]
    best_evidence = max(rows, key=lambda r: r["log_evidence"])["architecture"]
    assert agreement["Laplace evidence"]["pick"] == best_evidence
    best_test = min(r["test_nll"] for r in rows)
    for a in agreement.values():
        assert -1.0 <= a["spearman"] <= 1.0 and a["pick_test_nll_ratio"] >= 1.0
        pick = next(r for r in rows if r["architecture"] == a["pick"])
        assert math.isclose(a["pick_test_nll_ratio"], pick["test_nll"] / best_test, rel_tol=1e-9)
