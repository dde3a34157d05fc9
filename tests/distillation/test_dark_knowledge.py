"""Bayesian Dark Knowledge: the SGLD teacher samples the exact posterior; the student fits its predictive."""

import math

import pytest
import torch

from bmm_ppl.distillation.student import agreement
from bmm_ppl.distillation.dark_knowledge import BayesianDarkKnowledge
from tests.conftest import default_device


def regression_problem(n=20, sigma=0.5):
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1.5, 1.5, n, dtype=torch.float64).unsqueeze(1)
    y = 0.7 * x[:, 0] + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    precision = 1.0 + float((x[:, 0] ** 2).sum()) / sigma**2  # prior N(0, 1) on the slope
    mean = float(x[:, 0] @ y) / sigma**2 / precision
    return x, y, mean, 1.0 / precision


def test_regression_teacher_is_exact_posterior_and_student_its_predictive():
    torch.manual_seed(0)
    sigma, step_size, steps, burn_in = 0.5, 1e-3, 1500, 100
    x, y, post_mean, post_var = regression_problem(sigma=sigma)
    teacher = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    student = torch.nn.Sequential(
        torch.nn.Linear(1, 32, dtype=torch.float64), torch.nn.Tanh(), torch.nn.Linear(32, 2, dtype=torch.float64)
    )
    bdk = BayesianDarkKnowledge(
        teacher, student, task="regression", noise_scale=sigma, step_size=step_size, lr=1e-2, num_steps=steps,
        burn_in=burn_in, batch_size=x.shape[0], perturbation=0.0, store_every=1, progress=False,
    )
    result = bdk.fit(x, y)
    w = torch.stack([s["weight"].reshape(()) for s in result.teacher_samples])
    # Full-batch SGLD on a Gaussian target is an AR(1) chain with coefficient 1 - ε·precision (the
    # engine's convention), so its integrated autocorrelation time is about 2/(ε·precision) and
    # ESS = draws / that.
    ess = len(w) * step_size / post_var / 2
    assert abs(float(w.mean()) - post_mean) < 4 * math.sqrt(post_var / ess)
    assert abs(float(w.var()) / post_var - 1) < 4 * math.sqrt(2 / ess)
    # The student's predictive matches the exact posterior predictive N(x m, σ² + x² v): its error is the
    # student's own averaging noise (lr decays to 1e-4), measured at about 0.02 here.
    xs = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)
    out = result.student(xs).detach()
    assert (out[:, 0] - xs[:, 0] * post_mean).abs().max() < 0.1
    assert ((out[:, 1].exp() / (sigma**2 + xs[:, 0] ** 2 * post_var)) - 1).abs().max() < 0.15


def blobs(n=120):
    g = torch.Generator(device="cpu").manual_seed(1)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], device="cpu")
    labels = torch.arange(n, device="cpu") % 3
    return centres[labels] + torch.randn(n, 2, generator=g, device="cpu"), labels


def small_net(out=3, hidden=16, device="cpu"):
    return torch.nn.Sequential(
        torch.nn.Linear(2, hidden, device=device), torch.nn.ReLU(), torch.nn.Linear(hidden, out, device=device)
    )


def test_classification_student_matches_the_teacher_ensemble():
    torch.manual_seed(0)
    x, y = blobs()
    bdk = BayesianDarkKnowledge(
        small_net(), small_net(hidden=32), step_size=5e-4, lr=1e-2, num_steps=800, burn_in=100, batch_size=40,
        perturbation=0.3, store_every=20, progress=False,
    )
    result = bdk.fit(x, y)
    ensemble = result.teacher_ensemble()
    assert len(ensemble) == 35
    report = agreement(ensemble, result.student, x)
    assert report["top1_agreement"] > 0.95
    assert report["mean_kl"] < 0.1
    assert float(result.teacher_log_likelihood_trace[-100:].mean()) > -0.5


def test_teacher_step_is_the_sgmcmc_engines_kernel():
    """The teacher's step follows ``sgld_update``'s convention ``θ − ε ∇U + √(2ε) ξ``.

    Full-batch on the Gaussian slope posterior, ``θ' = θ − ε (P θ − b) + √(2ε) ξ`` is an AR(1) chain with
    lag-1 autocorrelation exactly ``1 − ε P`` (P the posterior precision). The old local convention
    ``θ + (ε/2) ĝ + √ε ξ`` would give ``1 − ε P / 2``: 0.83 instead of 0.66 here, 6 standard errors apart (800 draws).
    """
    torch.manual_seed(1)
    sigma, step_size = 0.5, 5e-3
    x, y, _, post_var = regression_problem(sigma=sigma)
    teacher = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    student = torch.nn.Sequential(torch.nn.Linear(1, 2, dtype=torch.float64))
    bdk = BayesianDarkKnowledge(
        teacher, student, task="regression", noise_scale=sigma, step_size=step_size, num_steps=900, burn_in=100,
        batch_size=x.shape[0], perturbation=0.0, store_every=1, progress=False,
    )
    w = torch.stack([s["weight"].reshape(()) for s in bdk.fit(x, y).teacher_samples])
    w = w - w.mean()
    lag1 = float((w[1:] * w[:-1]).sum() / (w * w).sum())
    rho = 1 - step_size / post_var
    # The lag-1 sample autocorrelation of an AR(1) chain has standard error sqrt((1 - ρ²) / N).
    assert abs(lag1 - rho) < 4 * math.sqrt((1 - rho**2) / len(w))


def test_bad_inputs():
    x, y = blobs(30)
    with pytest.raises(ValueError, match="student output has shape"):
        BayesianDarkKnowledge(small_net(), small_net(out=4), num_steps=5, burn_in=1, progress=False).fit(x, y)
    with pytest.raises(ValueError, match="integer labels"):
        BayesianDarkKnowledge(small_net(), small_net(), num_steps=5, burn_in=1, progress=False).fit(x, y.double())
    with pytest.raises(ValueError, match="noise_scale"):
        BayesianDarkKnowledge(small_net(1), small_net(2), task="regression", num_steps=5, burn_in=1, progress=False).fit(x, y.float())
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        BayesianDarkKnowledge(small_net(), small_net(), num_steps=5, burn_in=1, progress=False).fit(bad, y)
    with pytest.raises(ValueError, match="different lengths"):
        BayesianDarkKnowledge(small_net(), small_net(), num_steps=5, burn_in=1, progress=False).fit(x, y[:-1])
    with pytest.raises(ValueError, match="burn_in"):
        BayesianDarkKnowledge(small_net(), small_net(), num_steps=5, burn_in=5)
    from bmm_ppl.inference.errors import DivergenceError

    with pytest.raises(DivergenceError):
        BayesianDarkKnowledge(small_net(), small_net(), step_size=1e12, num_steps=20, burn_in=1, check_every=5, progress=False).fit(x, y)


def test_device_discipline_meta_default(meta_default_device):
    x, y = blobs(30)
    result = BayesianDarkKnowledge(small_net(), small_net(), num_steps=6, burn_in=2, store_every=2, progress=False).fit(x, y)
    assert result.student_loss_trace.device.type == "cpu"
    reg = BayesianDarkKnowledge(small_net(1), small_net(2), task="regression", noise_scale=0.3, num_steps=6, burn_in=2, progress=False)
    assert reg.fit(x, y.float()).student_loss_trace.device.type == "cpu"


@pytest.mark.gpu
def test_dark_knowledge_on_gpu():
    x, y = blobs(30)
    with default_device("meta"):
        result = BayesianDarkKnowledge(
            small_net(device="cuda"), small_net(device="cuda"), num_steps=6, burn_in=2, progress=False
        ).fit(x.cuda(), y.cuda())
    assert result.student_loss_trace.device.type == "cuda"
