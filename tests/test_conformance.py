"""Every engine on the same exact oracles (bmm_ppl.testing.conformance). An engine joins with one line."""

import pytest

from bmm_ppl.inference import Exact
from bmm_ppl.inference.hmc import NUTS
from bmm_ppl.inference.kalman import Kalman
from bmm_ppl.inference.laplace import Laplace
from bmm_ppl.inference.svi.engine import SVI
from bmm_ppl.testing import check_engine

ENGINES = {
    "Exact": lambda: Exact(),
    "Kalman": lambda: Kalman(progress=False),
    "Laplace": lambda: Laplace(progress=False),
    "NUTS": lambda: NUTS(num_samples=400, warmup_steps=200, num_chains=4, evidence="bridge", progress=False),
    "SVI": lambda: SVI("mvn", progress=False),
}


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_engine_recovers_the_exact_oracles(engine_name):
    reports = check_engine(ENGINES[engine_name]())
    assert set(reports) == {"conjugate_gaussian", "linear_regression"}


class _ShiftedEngine:
    """Exact, but the posterior is moved by half a standard deviation: the suite must notice."""

    def fit(self, model, *args):
        from bmm_ppl.inference import GaussianLatents

        post = Exact().fit(model, *args)
        q = post.latent_distribution
        sd = q.covariance_matrix.diagonal().sqrt()
        post.latent_distribution = GaussianLatents(q.loc + 0.5 * sd, q.scale_factor, q.site_shapes)
        return post


class _WrongEvidenceEngine:
    def fit(self, model, *args):
        from bmm_ppl.inference import Evidence

        post = Exact().fit(model, *args)
        post.log_evidence = Evidence(post.log_evidence.value - 0.5, 0.01, "bridge")
        return post


def test_conformance_rejects_a_shifted_posterior():
    with pytest.raises(AssertionError, match="off by .* MCSE"):
        check_engine(_ShiftedEngine())


def test_conformance_rejects_a_wrong_evidence():
    with pytest.raises(AssertionError, match="bridge evidence off by"):
        check_engine(_WrongEvidenceEngine())
