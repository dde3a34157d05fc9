"""The chain checks against ArviZ 0.2x's rank-normalised split R-hat and bulk / tail ESS, and the warning.

The formulas are ArviZ's (Vehtari et al. 2021), so they are compared to ArviZ to 1e-8 relative on
autocorrelated chains (AR(1), with chain offsets and tied values). The total draw count S is chosen so
that (S - 1) * 0.05 is not an integer: at an integer the type-7 quantile lands on a draw, and the two
libraries' last-digit rounding can put that draw on either side of its indicator.
"""

import warnings

import arviz as az
import numpy as np
import pytest
import torch

from bmm_ppl.inference import ChainDiagnosticsWarning
from bmm_ppl.inference.chain_diagnostics import chain_diagnostics, check_chains, ess_bulk, ess_tail, rank_rhat


def ar1_chains(rng, chains, draws, coefficients):
    x = np.zeros((chains, draws, len(coefficients)))
    noise = rng.standard_normal(x.shape)
    for t in range(1, draws):
        x[:, t] = coefficients * x[:, t - 1] + noise[:, t]
    return x


@pytest.mark.parametrize("chains, draws", [(2, 250), (4, 250), (3, 130)])
def test_matches_arviz(chains, draws):
    rng = np.random.default_rng(chains * draws)
    x = ar1_chains(rng, chains, draws, np.array([0.9, -0.3, 0.5, 0.99]))
    x[..., 0] += rng.uniform(0, 1, (chains, 1))  # chains that disagree
    x[:, ::3, 2] = x[:, :1, 2]  # ties, as rejected proposals make
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = {
            "rhat": [float(az.rhat(x[..., j])) for j in range(4)],
            "bulk": [float(az.ess(x[..., j], method="bulk")) for j in range(4)],
            "tail": [float(az.ess(x[..., j], method="tail")) for j in range(4)],
        }
    np.testing.assert_allclose(rank_rhat(x), reference["rhat"], rtol=1e-8)
    np.testing.assert_allclose(ess_bulk(x), reference["bulk"], rtol=1e-8)
    np.testing.assert_allclose(ess_tail(x), reference["tail"], rtol=1e-8)


def test_one_chain_is_split_and_a_drift_is_caught():
    rng = np.random.default_rng(0)
    stationary = rng.standard_normal((1, 1000, 1))
    drifting = stationary + np.linspace(0, 3, 1000)[None, :, None]
    assert rank_rhat(stationary)[0] < 1.01
    assert rank_rhat(drifting)[0] > 1.2


def test_diagnostics_per_site_and_the_warning_names_the_site():
    torch.manual_seed(0)
    good = torch.randn(2, 400, 3)
    stuck = torch.cumsum(0.05 * torch.randn(2, 400), 1) + torch.tensor([[0.0], [3.0]])  # two chains apart
    result = chain_diagnostics({"w": good, "s": stuck})
    assert result["r_hat"]["w"].shape == (3,) and result["ess_bulk"]["s"].shape == ()
    assert result["max_r_hat"] == pytest.approx(float(result["r_hat"]["s"]))
    assert result["max_r_hat"] > 1.5 and result["min_ess_bulk"] < 20
    with pytest.warns(ChainDiagnosticsWarning, match=r"R-hat .* at s .*bulk ESS .* per chain at s"):
        check_chains("NUTS", result, num_chains=2)
    assert check_chains("NUTS", chain_diagnostics({"w": good}), num_chains=2) == []


def test_a_chain_that_never_moved_fails():
    result = chain_diagnostics({"m": torch.zeros(1, 100)})
    with pytest.warns(ChainDiagnosticsWarning, match="R-hat nan at m"):
        check_chains("HMC", result, num_chains=1)


@pytest.mark.parametrize("chains, draws, coefficient", [(1, 1000, 0.5), (2, 1000, 0.5), (4, 600, 0.5)])
def test_mixed_chains_with_many_parameters_pass(chains, draws, coefficient):
    """Stationary AR(1) chains, 200 parameters: plain R-hat > 1.01 somewhere in nearly every run (bulk ESS
    ~200-330 per chain), which is chance, not a mixing failure; the noise bound keeps the check quiet. Measured over
    60 runs of 1000 parameters, the largest (R-hat - 1) * ESS_bulk had 99th percentiles 11-14 (bound 17-20)."""
    rng = np.random.default_rng(7)
    x = ar1_chains(rng, chains, draws, np.full(200, coefficient))
    x[:, 0] = rng.standard_normal(x[:, 0].shape) / np.sqrt(1 - coefficient**2)  # start in the stationary law
    result = chain_diagnostics({"w": torch.from_numpy(x)})
    assert result["max_r_hat"] > 1.01  # the plain rule would have warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_chains("NUTS", result, num_chains=chains) == []


def test_the_r_hat_rule_at_its_edges():
    """R-hat 1.02 is chance at a bulk ESS of 450 over four chains ((R-hat - 1) * ESS = 9 <= 20) and a
    mixing failure at 2000 (40 > 20); with the ESS failing its own check R-hat is reported beside it."""
    def diagnostics(r_hat, ess):
        one = lambda v: {"m": torch.tensor([v], dtype=torch.float64)}
        return {"r_hat": one(r_hat), "ess_bulk": one(ess), "ess_tail": one(10_000.0)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_chains("NUTS", diagnostics(1.02, 450.0), num_chains=4) == []
    with pytest.warns(ChainDiagnosticsWarning, match=r"split R-hat 1.02 at m\[0\] \(> 1.01\)\. "):
        check_chains("NUTS", diagnostics(1.02, 2000.0), num_chains=4)
    with pytest.warns(ChainDiagnosticsWarning, match=r"split R-hat 1.02 at m\[0\] \(> 1.01\); bulk ESS 75"):
        check_chains("NUTS", diagnostics(1.02, 300.0), num_chains=4)
