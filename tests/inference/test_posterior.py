"""Posterior: stored draws, thinning, evidence tags, persistence, and the vectorised model runs."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference import Evidence, EvidenceMethod, GaussianLatents, Posterior
from bmm_ppl.inference.program.runs import inspect_model, pointwise_log_likelihood, predictive_draws


def hierarchical_model(x, y=None):
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(0.0, scale))
    pyro.deterministic("w_squared", w**2)
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)


def stored_posterior(chains=2, draws=50):
    g = torch.Generator().manual_seed(0)
    samples = {
        "scale": torch.rand(chains, draws, generator=g) + 0.5,
        "w": torch.randn(chains, draws, generator=g),
    }
    x = torch.linspace(-1, 1, 7)
    return Posterior(hierarchical_model, (x, 0.5 * x), draws=samples, engine="test"), samples


def test_samples_flatten_chains_and_thin_evenly():
    post, samples = stored_posterior()
    flat = post.samples()
    assert flat["w"].shape == (100,)
    torch.testing.assert_close(flat["w"][:50], samples["w"][0])
    thinned = post.samples(10)["w"]
    assert thinned.shape == (10,)
    assert thinned[0] == samples["w"][0, 0] and thinned[-1] == samples["w"][1, -1]
    with pytest.raises(ValueError, match="exceeds the 100 stored draws"):
        post.samples(101)


def test_draws_must_carry_chain_and_draw_dims():
    with pytest.raises(ValueError, match=r"\(chain, draw, \*site_shape\)"):
        Posterior(hierarchical_model, draws={"w": torch.zeros(10)})
    with pytest.raises(ValueError, match="needs stored draws or a latent_distribution"):
        Posterior(hierarchical_model)


def test_pointwise_log_likelihood_matches_a_loop_over_draws():
    post, samples = stored_posterior()
    x, y = post.args
    loglik = post.log_likelihood()["obs"]
    assert loglik.shape == (2, 50, 7)
    expected = dist.Normal(samples["w"][1, 3] * x, 1.0).log_prob(y)
    torch.testing.assert_close(loglik[1, 3], expected)


def test_predictive_includes_deterministic_sites():
    post, _ = stored_posterior()
    predicted = post.predict(torch.linspace(0, 1, 4), num_samples=20)
    assert predicted["obs"].shape == (20, 4)
    assert predicted["w_squared"].shape == (20,)
    torch.testing.assert_close(predicted["w_squared"], post.samples(20)["w"] ** 2)


def test_model_that_does_not_broadcast_falls_back_to_a_loop():
    def scalar_only_model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        mean = torch.stack([w * xi for xi in x.tolist()])  # breaks under a batch of draws
        with pyro.plate("data", len(x)):
            return pyro.sample("obs", dist.Normal(mean, 1.0), obs=y)

    draws = {"w": torch.tensor([0.0, 1.0, 2.0])}
    x = torch.tensor([1.0, 2.0])
    predicted = predictive_draws(scalar_only_model, (x,), {}, draws)
    assert predicted["obs"].shape == (3, 2)
    loglik = pointwise_log_likelihood(scalar_only_model, (x, torch.tensor([1.0, 4.0])), {}, draws)["obs"]
    torch.testing.assert_close(loglik[2], dist.Normal(torch.tensor([2.0, 4.0]), 1.0).log_prob(torch.tensor([1.0, 4.0])))


def test_inspect_model_reports_sites_and_nesting():
    structure = inspect_model(hierarchical_model, (torch.ones(3), torch.ones(3)), {})
    assert structure.latent_sites == ["scale", "w"]
    assert structure.observed_sites == ["obs"]
    assert structure.deterministic_sites == {"w_squared": ()}
    assert structure.max_plate_nesting == 1


def test_state_dict_round_trip_with_weights_only(tmp_path):
    post, samples = stored_posterior()
    post.log_evidence = Evidence(-3.5, 0.2, "bridge")
    post.sample_stats = {"diverging": torch.zeros(2, 50, dtype=torch.bool)}
    post.diagnostics = {"note": "ok", "r_hat": [1.0, 1.01]}
    path = tmp_path / "post.pt"
    post.save(path)
    loaded = Posterior.load(path, model=hierarchical_model, args=post.args)
    assert loaded.log_evidence == Evidence(-3.5, 0.2, "bridge")
    assert loaded.diagnostics == {"note": "ok", "r_hat": [1.0, 1.01]}
    torch.testing.assert_close(loaded.draws()["w"], samples["w"])
    assert loaded.sample_stats["diverging"].dtype == torch.bool
    with pytest.raises(ValueError, match="not a saved Posterior"):
        loaded.load_state_dict({"format": "something else"})


def test_evidence_validates_and_tags_bounds():
    assert Evidence(-1.0, 0.1, "iwae").is_lower_bound
    assert not Evidence(-1.0, None, EvidenceMethod.LAPLACE).is_lower_bound
    with pytest.raises(ValueError, match="method='magic' is not one of"):
        Evidence(-1.0, None, "magic")
    with pytest.raises(ValueError, match="NaN"):
        Evidence(float("nan"))
    with pytest.raises(ValueError, match="stderr"):
        Evidence(-1.0, -0.1, "elbo")


def test_gaussian_latents_validate_shapes_and_move():
    with pytest.raises(ValueError, match=r"loc must be Tensor\[3\]"):
        GaussianLatents(torch.zeros(2), torch.eye(2), {"a": (3,)})
    q = GaussianLatents(torch.zeros(3), torch.eye(3), {"a": (1,), "b": (2,)})
    assert q.sample(4)["b"].shape == (4, 2)
    assert q.to(dtype=torch.float64).sample(1)["a"].dtype == torch.float64
