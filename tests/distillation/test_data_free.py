"""Data-free distillation: activation records, input synthesis, serialisation, bad inputs, devices."""

import pytest
import torch

from bmm_ppl.distillation.data_free import (
    ActivationStatistics,
    record_activation_statistics,
    statistics_loss,
    statistics_of,
    synthesize_inputs,
)
from bmm_ppl.distillation.student import agreement, distill
from tests.conftest import default_device


def teacher_and_data(device="cpu", batchnorm=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    mixing = torch.randn(4, 4, generator=g, device="cpu")
    x = (torch.randn(400, 4, generator=g, device="cpu") @ mixing + 2.0).to(device)
    layers = [torch.nn.Linear(4, 16, device=device)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(16, device=device))
    layers += [torch.nn.ReLU(), torch.nn.Linear(16, 3, device=device)]
    return torch.nn.Sequential(*layers), x


def test_records_are_the_exact_moments_of_each_layer():
    torch.manual_seed(0)
    net, x = teacher_and_data()
    stats = record_activation_statistics(net, x, batch_size=64)
    assert sorted(stats.layers) == ["0", "2"] and statistics_of(net) is stats
    hidden = net[0](x).detach()
    assert torch.allclose(stats.layers["0"]["mean"], hidden.mean(0), atol=1e-5)
    assert torch.allclose(stats.layers["0"]["covariance"], torch.cov(hidden.T, correction=0), atol=1e-4)
    # A batch drawn like the data matches its records closely; noise does not.
    assert statistics_loss(hidden, stats.layers["0"]) < 0.01
    assert statistics_loss(net[0](torch.randn(400, 4)).detach(), stats.layers["0"]) > 0.5
    # Spectral summary for wide layers: the top eigenpairs of the same covariance.
    wide = record_activation_statistics(net, x, max_full_dim=8, rank=3, attach=False)
    eigenvalues = torch.linalg.eigvalsh(stats.layers["0"]["covariance"])[-3:]
    assert torch.allclose(wide.layers["0"]["eigenvalues"], eigenvalues, rtol=1e-3, atol=1e-5)
    assert "covariance" in wide.layers["2"]  # 3 features: kept in full
    # Serialisable with weights_only loading.
    state = ActivationStatistics.from_state_dict(stats.state_dict())
    assert torch.equal(state.layers["0"]["mean"], stats.layers["0"]["mean"]) and state.input_shape == (4,)


def test_synthesised_inputs_match_the_statistics_and_teach_a_student(tmp_path):
    torch.manual_seed(0)
    net, x = teacher_and_data(batchnorm=True)
    net.train()
    for _ in range(20):  # fill the BatchNorm running statistics
        net(x)
    stats = record_activation_statistics(net, x)
    assert stats.batchnorm == ["1"]
    path = tmp_path / "stats.pt"
    torch.save(stats.state_dict(), path)
    stats = ActivationStatistics.from_state_dict(torch.load(path, weights_only=True))
    synthetic = synthesize_inputs(net, stats, num_inputs=256, steps=150, lr=0.1, batch_size=128, progress=False)
    assert synthetic.shape == (256, 4)
    with torch.no_grad():
        hidden = net[0](synthetic)
    assert statistics_loss(hidden, stats.layers["0"]) < 0.1
    # Inputs land near the data (mean 2 per feature), far from the N(0, 1) noise they started from.
    assert (synthetic.mean(0) - x.mean(0)).abs().max() < 0.5
    student = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    result = distill(net.eval(), student, synthetic, lr=1e-2, batch_size=64, progress=False)  # to convergence
    assert result.converged
    assert agreement(net, result.student, x)["top1_agreement"] > 0.85


def test_bad_inputs():
    net, x = teacher_and_data()
    fresh, _ = teacher_and_data()
    with pytest.raises(ValueError, match="no recorded activation statistics"):
        synthesize_inputs(fresh, num_inputs=4, steps=1, progress=False)
    with pytest.raises(ValueError, match="not submodules"):
        record_activation_statistics(net, x, layers=["nope"])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="data contains NaN"):
        record_activation_statistics(net, bad)
    with pytest.raises(ValueError, match="no layers"):
        record_activation_statistics(torch.nn.ReLU(), x)
    stats = record_activation_statistics(net, x, attach=False)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="does not have"):
        synthesize_inputs(other, stats, num_inputs=4, steps=1, progress=False)
    with pytest.raises(TypeError, match="statistics must be"):
        synthesize_inputs(net, {"0": {}}, num_inputs=4, steps=1, progress=False)


def test_device_discipline_meta_default(meta_default_device):
    net, x = teacher_and_data(batchnorm=True)
    stats = record_activation_statistics(net, x)
    synthetic = synthesize_inputs(net, stats, num_inputs=10, steps=3, batch_size=8, class_weight=0.5, progress=False)
    assert synthetic.device.type == "cpu" and synthetic.shape == (10, 4)


@pytest.mark.gpu
def test_data_free_on_gpu():
    net, x = teacher_and_data(device="cuda")
    with default_device("meta"):
        stats = record_activation_statistics(net, x)
        synthetic = synthesize_inputs(net, stats, num_inputs=10, steps=3, progress=False)
    assert synthetic.device.type == "cuda"
