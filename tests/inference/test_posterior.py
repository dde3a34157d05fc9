"""Posterior: stored draws, thinning, evidence tags, persistence, and the vectorised model runs."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference import Evidence, EvidenceMethod, GaussianLatents, Posterior
from bmm_ppl.inference.evidence import NonFiniteEvidenceError
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


def test_evidence_refuses_non_finite_values_naming_the_method():
    for value, shown in ((float("-inf"), "-inf"), (float("inf"), "inf"), (float("nan"), "NaN")):
        with pytest.raises(NonFiniteEvidenceError, match=rf"log evidence \(elbo\) is {shown}") as caught:
            Evidence(value, 0.1, "elbo")
        assert caught.value.method == "elbo"
    assert issubclass(NonFiniteEvidenceError, ValueError)
    assert Evidence(-1e300).value == -1e300  # large but finite is a number


# ------------------------------------------------ loading checks the model and the save
def scale_is_real_model(x, y=None):
    scale = pyro.sample("scale", dist.Normal(1.0, 1.0))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(w * x, scale.abs()), obs=y)


def vector_w_model(x, y=None):
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(0.0, scale).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(w.sum(-1, keepdim=True) * x, 1.0), obs=y)


def renamed_model(x, y=None):
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    slope = pyro.sample("slope", dist.Normal(0.0, scale))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(slope * x, 1.0), obs=y)


def saved(tmp_path, post, name="post.pt"):
    path = tmp_path / name
    post.save(path)
    return path


def test_load_refuses_a_model_whose_sites_do_not_match(tmp_path):
    post, _ = stored_posterior()
    path = saved(tmp_path, post)
    with pytest.raises(ValueError, match="site 'scale' has support Real in the given model but GreaterThan"):
        Posterior.load(path, model=scale_is_real_model, args=post.args)
    with pytest.raises(ValueError, match=r"site 'w' has shape \(2,\) in the given model but \(\) in the saved"):
        Posterior.load(path, model=vector_w_model, args=post.args)
    with pytest.raises(ValueError, match="saved posterior has site 'w', which is not a latent site of the given model renamed_model"):
        Posterior.load(path, model=renamed_model, args=post.args)
    loaded = Posterior.load(path, model=hierarchical_model, args=post.args)
    assert loaded.predict(num_samples=5)["obs"].shape == (5, 7)


def test_load_refuses_a_model_with_a_latent_site_the_save_lacks(tmp_path):
    post, samples = stored_posterior()
    only_w = Posterior(None, draws={"w": samples["w"]}, engine="test")
    with pytest.raises(ValueError, match="has latent site 'scale', which the saved posterior does not hold"):
        Posterior.load(saved(tmp_path, only_w), model=hierarchical_model, args=post.args)


def test_load_checks_an_exact_posterior_against_another_regression(tmp_path):
    from bmm_ppl.inference import Exact
    from bmm_ppl.models import BayesianLinearRegression, polynomial_features

    x = torch.linspace(0, 1, 12, dtype=torch.float64)
    y = torch.sin(6 * x)
    post = Exact().fit(BayesianLinearRegression(polynomial_features(3), alpha=1e-2, beta=None), x, y)
    path = saved(tmp_path, post)
    with pytest.raises(ValueError, match=r"site 'w' has shape \(3,\) in the given model but \(4,\)"):
        Posterior.load(path, model=BayesianLinearRegression(polynomial_features(2), alpha=1e-2, beta=None), args=(x, y))
    # beta learned in the save but fixed in the given model: the hyperparameter has no site there
    with pytest.raises(ValueError, match="hyperparameter 'beta', which is not a pyro.param site"):
        Posterior.load(path, model=BayesianLinearRegression(polynomial_features(3), alpha=1e-2, beta=3.0), args=(x, y))
    same = Posterior.load(path, model=BayesianLinearRegression(polynomial_features(3), alpha=1e-2, beta=None), args=(x, y))
    torch.testing.assert_close(same.latent_distribution.loc, post.latent_distribution.loc)


def test_load_refuses_tampered_draws_naming_the_site(tmp_path):
    post, _ = stored_posterior()
    path = saved(tmp_path, post)
    state = torch.load(path, weights_only=True)
    state["draws"]["w"] = torch.zeros(2, 50, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"gives site 'w' shape \(3,\), but the save records \(\)"):
        Posterior.load(tmp_path / "shape.pt")  # refused even without a model
    state["draws"]["w"] = torch.zeros(2, 49)
    torch.save(state, tmp_path / "length.pt")
    with pytest.raises(ValueError, match=r"draws\['w'\] have \(chain, draw\) = \(2, 49\), other sites \(2, 50\)"):
        Posterior.load(tmp_path / "length.pt")
    state["draws"]["w"] = torch.zeros(2, 50)
    state["draws"]["scale"] = -torch.ones(2, 50)
    torch.save(state, tmp_path / "values.pt")
    with pytest.raises(ValueError, match="stored draws of site 'scale' lie outside its support"):
        Posterior.load(tmp_path / "values.pt", model=hierarchical_model, args=post.args)
    state = torch.load(path, weights_only=True)
    state["sample_stats"] = {"diverging": torch.zeros(2, 10, dtype=torch.bool)}
    torch.save(state, tmp_path / "stats.pt")
    with pytest.raises(ValueError, match=r"sample_stats\['diverging'\] is shaped \(2, 10\)"):
        Posterior.load(tmp_path / "stats.pt")


def test_load_refuses_a_tampered_latent_distribution(tmp_path):
    q = GaussianLatents(torch.zeros(3), torch.eye(3), {"a": (1,), "b": (2,)})
    path = saved(tmp_path, Posterior(None, latent_distribution=q))
    state = torch.load(path, weights_only=True)
    state["latent_distribution"]["site_shapes"] = [[2], [1]]
    torch.save(state, tmp_path / "latent.pt")
    with pytest.raises(ValueError, match=r"latent distribution gives site 'a' shape \(2,\), but the save records \(1,\)"):
        Posterior.load(tmp_path / "latent.pt")


def test_load_with_a_model_needs_its_data(tmp_path):
    post, _ = stored_posterior()
    with pytest.raises(ValueError, match="pass the data it was fitted to as args="):
        Posterior.load(saved(tmp_path, post), model=hierarchical_model)


def test_saving_leaves_the_rng_and_the_param_store_alone(tmp_path):
    from bmm_ppl.models import BayesianLinearRegression, polynomial_features

    x = torch.linspace(0, 1, 5)
    model = BayesianLinearRegression(polynomial_features(1), alpha=None, beta=2.0)
    post = Posterior(model, (x, x), draws={"w": torch.zeros(1, 3, 2)}, hyperparameters={"alpha": torch.tensor(0.5)})
    before = torch.get_rng_state()
    post.save(tmp_path / "p.pt")
    assert torch.equal(torch.get_rng_state(), before)
    assert "alpha" not in pyro.get_param_store()
    assert torch.load(tmp_path / "p.pt", weights_only=True)["sites"] == {"w": {"shape": [2], "support": "Real"}}


def test_load_accepts_deterministic_sites_stored_with_the_draws(tmp_path):
    # NUTS and SGLD store pyro.deterministic values next to the latent draws.
    post, samples = stored_posterior()
    with_record = Posterior(hierarchical_model, post.args, draws={**samples, "w_squared": samples["w"] ** 2})
    loaded = Posterior.load(saved(tmp_path, with_record), model=hierarchical_model, args=post.args)
    torch.testing.assert_close(loaded.draws()["w_squared"], samples["w"] ** 2)
    bad = Posterior(hierarchical_model, post.args, draws={**samples, "w_squared": torch.zeros(2, 50, 3)})
    with pytest.raises(ValueError, match=r"site 'w_squared' has shape \(\) in the given model but \(3,\)"):
        Posterior.load(saved(tmp_path, bad, "bad.pt"), model=hierarchical_model, args=post.args)
