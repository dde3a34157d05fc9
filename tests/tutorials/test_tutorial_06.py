"""Tutorial 06 (learned rotation invariance on digits) runs in quick mode and its numbers make sense."""

import math
from pathlib import Path

from tests.tutorials import load_tutorial


def test_tutorial_06_quick(tmp_path):
    output = load_tutorial("06_learned_invariances.py").main(tmp_path, quick=True)
    for figure in output["figures"]:
        assert Path(figure).exists() and Path(figure).stat().st_size > 0
    results = output["results"]
    assert set(results) == {"none", "learned", "full"}
    for row in results.values():
        assert math.isfinite(row["log_evidence"]) and 0.0 <= row["accuracy"] <= 1.0
    # the learned range moves from its 0.3 rad start into the data's range (true 60 deg = 1.05 rad)
    assert 0.5 < output["learned_range"] < math.pi
    # learned invariance is preferred by the evidence to none, and predicts better than chance by far
    assert results["learned"]["log_evidence"] > results["none"]["log_evidence"]
    assert results["learned"]["accuracy"] > results["none"]["accuracy"]
    assert results["full"]["range"] == math.pi and results["none"]["range"] == 0.0
