"""Tutorial 04 runs end to end in quick mode, saves its figures and measures sensible numbers."""

import pathlib

import pytest

from tests.tutorials import load_tutorial


def test_tutorial_04_quick(tmp_path):
    pytest.importorskip("statsmodels")
    results = load_tutorial("04_state_space.py").main(tmp_path, quick=True)
    for key in ("nile_figure", "hmm_figure", "pendulum_figure"):
        assert pathlib.Path(results[key]).exists() and pathlib.Path(results[key]).stat().st_size > 0
    # The Nile MLE (known initialisation, see the tests of the Kalman engine) is about 15100 and 1460.
    assert 13000 < results["nile_observation_var"] < 17000
    assert 1000 < results["nile_level_var"] < 2000
    assert -660 < results["nile_log_evidence_local_level"] < -620
    # The Nile has no time-varying slope: the local linear trend's slope variance runs to its boundary
    # (reported, then kept as the limit fit), and its evidence is below the local level's.
    assert results["nile_log_evidence_local_linear_trend"] < results["nile_log_evidence_local_level"]
    boundary = results["nile_trend_boundary"]
    assert boundary is None or "transition_cov" in boundary
    assert results["hmm_viterbi_accuracy"] > 0.8
    assert results["pendulum_rmse_ekf"] < 0.05 and results["pendulum_rmse_ukf"] < 0.05
