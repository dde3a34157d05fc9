"""Tutorial 01 runs end to end (small settings) and shows what it claims."""

from tests.tutorials import load_tutorial

def test_tutorial_01(tmp_path):
    results = load_tutorial("01_polynomial_degree_selection.py").main(tmp_path, quick=True)
    assert "alpha -> +inf" in results["boundary_message"]
    # Noise sd 0.3 estimated from 100 points by type-II: within 15% (sd of the estimate ~ 7%).
    assert abs(results["type2_beta"] ** -0.5 / 0.3 - 1) < 0.15
    for name in ("evidence_vs_degree.png", "errors_vs_degree.png", "bma_predictive.png", "type2_evidence_surface.png"):
        assert (tmp_path / name).exists()
