"""The deep Markov model trains by SVI with its amortised guide, handles missing entries, and rejects bad data."""

import math

import pyro
import pytest
import torch

from bmm_ppl.models.state_space.deep_markov import DeepMarkovModel


def noisy_sines(batch=8, steps=20):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(steps, dtype=torch.float32)
    phase = torch.rand(batch, 1, generator=g) * 6.28
    clean = torch.stack([torch.sin(0.3 * t + phase), torch.cos(0.3 * t + phase)], dim=-1)
    return clean + 0.1 * torch.randn(batch, steps, 2, generator=g)


def test_svi_lowers_the_negative_elbo():
    y = noisy_sines()
    y[0, 3, 1] = float("nan")
    dmm = DeepMarkovModel(obs_dim=2, state_dim=2, hidden_dim=16)
    svi = pyro.infer.SVI(dmm.model, dmm.guide, pyro.optim.Adam({"lr": 0.02}), pyro.infer.Trace_ELBO())
    losses = [svi.step(y) for _ in range(60)]
    assert all(math.isfinite(loss) for loss in losses)
    # Averages over 10 steps damp the Monte-Carlo noise of single-sample ELBO estimates.
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 20.0


def test_sites_and_bad_input():
    dmm = DeepMarkovModel(obs_dim=2, state_dim=3, hidden_dim=8)
    y = noisy_sines(batch=3, steps=4)
    trace = pyro.poutine.trace(pyro.poutine.replay(dmm.model, pyro.poutine.trace(dmm.guide).get_trace(y))).get_trace(y)
    assert trace.nodes["z_3"]["value"].shape == (3, 3)
    assert trace.nodes["y_3"]["is_observed"]
    with pytest.raises(ValueError, match="y must be"):
        dmm.model(torch.randn(4, 2))
