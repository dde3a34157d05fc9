"""Tutorial 02 runs end to end with tiny settings and saves its figures."""

import math
import pathlib

import torch

from tests.tutorials import load_tutorial


def test_tutorial_02_quick(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = load_tutorial("02_bnn_type2.py").main(tmp_path, quick=True)
    finally:
        torch.set_num_threads(previous)
    for figure in results["figures"]:
        assert pathlib.Path(figure).is_file() and pathlib.Path(figure).stat().st_size > 1000
    for guide in ("normal", "mvn"):
        fit = results["one_d"][guide]
        assert math.isfinite(fit["elbo"]) and fit["elbo"] < 0
        assert all(v > 0 for v in fit["hyperparameters"].values())
        assert -1.0 < fit["explained_variance"] <= 1.0
    rows = results["diabetes"]["rows"]
    assert [(r["width"], r["depth"]) for r in rows] == [(8, 1), (32, 1)]
    for row in rows:
        # Standardised targets: a held-out log-likelihood per point between a useless and a perfect fit.
        assert -3.0 < row["heldout"] < 0.5
        assert row["elbo_stderr"] > 0
