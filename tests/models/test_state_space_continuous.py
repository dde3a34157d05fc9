"""The continuous-time SSM layer: discretisations against closed forms, convolution mode equal to the
recurrence, gradients, and its probabilistic form whose Kalman predictions are the layer's outputs. float64."""

import math

import pytest
import torch

from bmm_ppl.inference.kalman import Kalman, kalman_filter
from bmm_ppl.models.state_space.continuous import ContinuousTimeSSM, discretise

DT = torch.float64


def test_scalar_discretisations_match_closed_forms():
    a, b, dt = torch.tensor([[-2.0]], dtype=DT), torch.tensor([[3.0]], dtype=DT), torch.tensor(0.1, dtype=DT)
    ab, bb = discretise(a, b, dt, "zoh")
    assert math.isclose(float(ab), math.exp(-0.2), rel_tol=1e-12)
    assert math.isclose(float(bb), (math.exp(-0.2) - 1) / -2.0 * 3.0, rel_tol=1e-12)
    ab, bb = discretise(a, b, dt, "bilinear")
    assert math.isclose(float(ab), (1 - 0.1) / (1 + 0.1), rel_tol=1e-12)
    assert math.isclose(float(bb), 0.1 * 3.0 / (1 + 0.1), rel_tol=1e-12)
    with pytest.raises(ValueError, match="method"):
        discretise(a, b, dt, "euler")


def test_zoh_matches_matrix_exponential_for_invertible_a():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, dtype=DT, generator=g) - 2 * torch.eye(3, dtype=DT)
    b = torch.randn(3, 2, dtype=DT, generator=g)
    ab, bb = discretise(a, b, torch.tensor(0.3, dtype=DT))
    expected = torch.linalg.solve(a, (torch.linalg.matrix_exp(0.3 * a) - torch.eye(3, dtype=DT)) @ b)
    assert torch.allclose(ab, torch.linalg.matrix_exp(0.3 * a), atol=1e-12)
    assert torch.allclose(bb, expected, atol=1e-12)


@pytest.mark.parametrize("discretisation", ["zoh", "bilinear"])
def test_convolution_mode_equals_recurrence_and_has_gradients(discretisation):
    layer = ContinuousTimeSSM(4, 2, 3, discretisation=discretisation, dtype=DT)
    with torch.no_grad():
        layer.d.normal_()
    u = torch.randn(2, 37, 2, dtype=DT)
    conv, rec = layer(u, mode="convolution"), layer(u, mode="recurrent")
    assert conv.shape == (2, 37, 3)
    assert torch.allclose(conv, rec, atol=1e-10)
    conv.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with pytest.raises(ValueError, match="mode"):
        layer(u, mode="fft")


def test_probabilistic_form_predicts_the_layer_output():
    layer = ContinuousTimeSSM(3, 1, 1, dtype=DT)
    with torch.no_grad():
        layer.d.fill_(0.3)
    u = torch.randn(40, 1, dtype=DT)
    model, controls = layer.state_space_model(u, transition_cov=1e-3 * torch.eye(3, dtype=DT), observation_cov=0.1)
    form = model.state_space_form(torch.full((40, 1), float("nan"), dtype=DT), controls)
    # With every observation missing, the predicted observations are the noise-free layer outputs.
    predicted = kalman_filter(form.params, form.observations).predicted_means @ form.params.observation_matrix.mT
    predicted = predicted + form.params.observation_offset
    assert torch.allclose(predicted, layer(u).detach(), atol=1e-10)
    y = layer(u).detach() + 0.3 * torch.randn(40, 1, dtype=DT)
    post = Kalman(progress=False, num_steps=0).fit(model, y, controls)
    assert math.isfinite(post.log_evidence.value) and post.log_evidence.method.value == "exact"
