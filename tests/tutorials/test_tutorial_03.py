"""Runs tutorial 03 (sampling engines) with quick settings."""

import math

from tests.tutorials import load_tutorial


def test_tutorial_03_quick(tmp_path):
    results = load_tutorial("03_sampling_engines.py").main(tmp_path, quick=True)
    assert results["figures"] == ["nuts_trace.png", "uncertainty.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in results["figures"])
    assert (tmp_path / "nuts_summary.csv").exists()
    # Epistemic uncertainty far outside the data dwarfs that inside it.
    assert results["epistemic_far"] > 5 * results["epistemic_inside"]
    assert math.isfinite(results["nuts_bridge_log_evidence"]) and results["nuts_bridge_stderr"] > 0
    assert results["nuts_max_rhat"] < 1.1 and results["nuts_divergences"] == 0
    assert math.isfinite(results["nuts_elpd_loo"]) and math.isfinite(results["sghmc_elpd_loo"])
    # Every flagged PSIS term of NUTS is replaced by the exact refit term (the tutorial prints both).
    if results["nuts_pareto_k_flagged"]:
        assert math.isfinite(results["nuts_elpd_loo_corrected"])
    # The tutorial's explanation of SGHMC's chain warning rests on near-collinear features.
    assert results["max_feature_correlation"] > 0.95
    assert set(results["chain_warnings"]) == {"nuts", "sghmc"}
