"""Hinton and Gaussian distillation losses: exact limits and conventions (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bmm_ppl.distillation.losses import (
    gaussian_distillation_loss,
    hinton_loss,
    mixture_moments,
    tempered_probabilities,
)


def logits_pair(n=7, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * 2, torch.randn(n, k, generator=g, dtype=torch.float64) * 2


def test_high_temperature_limit_is_centred_logit_matching():
    # T² KL(softmax(t/T) ‖ softmax(s/T)) → ‖s̄ − t̄‖² / (2K) (see losses.py); the next term is O(1/T),
    # so the relative error must shrink ~10× per decade of T.
    s, t = logits_pair()
    k = s.shape[1]
    centred = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    limit = ((centred(s) - centred(t)).pow(2).sum(-1) / (2 * k)).mean()
    errors = []
    for temperature in (1e2, 1e3, 1e4):
        value = hinton_loss(s, t, temperature=temperature)
        errors.append(abs(float(value / limit) - 1))
    assert errors[-1] < 1e-3
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5
    # Adding a constant to the logits changes nothing (only centred logits matter).
    assert torch.allclose(hinton_loss(s + 3.0, t - 1.0, temperature=1e3), hinton_loss(s, t, temperature=1e3))


def test_low_temperature_limit_is_cross_entropy_with_teacher_hard_labels():
    s, t = logits_pair()
    hard = t.argmax(-1)
    for temperature in (0.05, 0.01):
        soft_targets = tempered_probabilities(t, temperature=temperature)
        kl_over_t2 = hinton_loss(s, t, temperature=temperature) / temperature**2
        ce_hard = F.cross_entropy(s / temperature, hard)
        # The teacher's entropy and mass off the arg-max vanish like exp(-gap/T).
        gap = (t.topk(2, -1).values[:, 0] - t.topk(2, -1).values[:, 1]).min()
        bound = 10 * t.shape[1] * math.exp(-float(gap) / temperature) * (1 + float(ce_hard))
        assert torch.allclose(soft_targets, F.one_hot(hard, t.shape[1]).double(), atol=bound + 1e-12)
        assert abs(float(kl_over_t2 - ce_hard)) <= bound + 1e-9 * float(ce_hard)


def test_weight_convention_and_teacher_probs():
    s, t = logits_pair()
    y = torch.arange(s.shape[0]) % s.shape[1]
    soft = hinton_loss(s, t, temperature=2.0)
    hard = F.cross_entropy(s, y)
    assert torch.allclose(hinton_loss(s, t, y, temperature=2.0, weight=0.3), 0.3 * hard + 0.7 * soft)
    assert torch.allclose(hinton_loss(s, t, y, weight=1.0), hard)
    # Probabilities give the same loss as the logits they come from.
    assert torch.allclose(hinton_loss(s, teacher_probs=torch.softmax(t, -1), temperature=2.0), soft)
    assert float(hinton_loss(t, t, temperature=3.0)) == pytest.approx(0.0, abs=1e-12)


def test_hinton_bad_inputs():
    s, t = logits_pair()
    with pytest.raises(ValueError, match="teacher_logits"):
        hinton_loss(s, t[:, :3])
    with pytest.raises(ValueError, match="exactly one"):
        hinton_loss(s)
    with pytest.raises(ValueError, match="temperature"):
        hinton_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="weight"):
        hinton_loss(s, t, torch.zeros(7, dtype=torch.long), weight=2.0)
    with pytest.raises(ValueError, match="NaN"):
        hinton_loss(s, t.clone().fill_(float("nan")))


def test_gaussian_loss_is_expected_nll_under_the_mixture():
    # Monte-Carlo check: E_{y ~ mixture}[-log N(y; m, v)] equals the closed form from the mixture's moments.
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 3, generator=g, dtype=torch.float64)
    variances = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1
    mean, variance = mixture_moments(means, variances)
    student_mean = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    student_log_var = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    exact = gaussian_distillation_loss(student_mean, student_log_var, mean, variance)
    n = 200_000
    component = torch.randint(0, 4, (n, 3), generator=g)
    y = torch.gather(means.T, 1, component.T).T + torch.gather(variances.T, 1, component.T).T.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    nll = -torch.distributions.Normal(student_mean, (0.5 * student_log_var).exp()).log_prob(y).mean(-1)
    # Tolerance: 5 Monte-Carlo standard errors.
    assert abs(float(nll.mean() - exact)) < 5 * float(nll.std()) / math.sqrt(n)
    # The KL form is zero at a perfect moment match and differs from the NLL by a constant.
    assert float(gaussian_distillation_loss(mean, variance.log(), mean, variance, kind="kl")) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="kind"):
        gaussian_distillation_loss(mean, variance.log(), mean, variance, kind="l2")
    with pytest.raises(ValueError, match="same shape"):
        gaussian_distillation_loss(mean[:2], variance.log(), mean, variance)
