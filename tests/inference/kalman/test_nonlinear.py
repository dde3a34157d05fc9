"""EKF and UKF (equal to the Kalman filter on a linear model; sensible on a nonlinear one) and the HMM
routines (evidence, marginals and Viterbi against brute-force enumeration). float64."""

import itertools
import math

import pytest
import torch

from bmm_ppl.inference.kalman import kalman_filter
from bmm_ppl.inference.hmm.forward_backward import hmm_forward, hmm_posterior_marginals, viterbi
from bmm_ppl.inference.kalman.nonlinear import extended_kalman_filter, unscented_kalman_filter
from bmm_ppl.models.state_space import LinearGaussianParams

DT = torch.float64


@pytest.mark.parametrize("nonlinear_filter", [extended_kalman_filter, unscented_kalman_filter])
def test_equal_to_the_kalman_filter_on_a_linear_model(nonlinear_filter):
    g = torch.Generator().manual_seed(0)
    f = 0.5 * torch.randn(3, 3, dtype=DT, generator=g)
    h = torch.randn(2, 3, dtype=DT, generator=g)
    q, r = 0.3 * torch.eye(3, dtype=DT), 0.5 * torch.eye(2, dtype=DT)
    m0, p0 = torch.randn(3, dtype=DT, generator=g), torch.eye(3, dtype=DT)
    y = torch.randn(2, 15, 2, dtype=DT, generator=g)
    y[0, 3, 1] = float("nan")
    exact = kalman_filter(LinearGaussianParams(f, h, q, r, m0, p0), y)
    approx = nonlinear_filter(lambda x: x @ f.T, lambda x: x @ h.T, q, r, m0, p0, y)
    assert torch.allclose(approx.log_likelihood, exact.log_likelihood, rtol=1e-10)
    assert torch.allclose(approx.filtered_means, exact.filtered_means, atol=1e-10)
    assert torch.allclose(approx.filtered_covs, exact.filtered_covs, atol=1e-10)


def pendulum(dt=0.05, g=9.81):
    def transition(x):
        velocity = x[..., 1] - dt * g * torch.sin(x[..., 0])  # semi-implicit Euler keeps the energy bounded
        return torch.stack([x[..., 0] + dt * velocity, velocity], dim=-1)

    def observation(x):
        return torch.sin(x[..., :1])

    return transition, observation


def test_pendulum_tracking_beats_the_prior():
    transition, observation = pendulum()
    gen = torch.Generator().manual_seed(1)
    q = torch.diag(torch.tensor([1e-5, 1e-4], dtype=DT))
    r = torch.tensor([[0.01]], dtype=DT)
    x = torch.tensor([1.2, 0.0], dtype=DT)
    states, ys = [], []
    for _ in range(100):
        states.append(x)
        ys.append(observation(x) + 0.1 * torch.randn(1, dtype=DT, generator=gen))
        x = transition(x) + torch.randn(2, dtype=DT, generator=gen) @ q.sqrt()
    states, y = torch.stack(states), torch.stack(ys)
    m0, p0 = torch.tensor([1.0, 0.0], dtype=DT), 0.1 * torch.eye(2, dtype=DT)
    for run in (extended_kalman_filter, unscented_kalman_filter):
        result = run(transition, observation, q, r, m0, p0, y)
        error = (result.filtered_means[:, 0] - states[:, 0]).pow(2).mean().sqrt()
        assert error < 0.05, run.__name__  # the angle swings over +-1.2 rad; both reach about 0.02
        assert math.isfinite(float(result.log_likelihood))


def hmm_problem(seed=0, k=3, steps=5):
    g = torch.Generator().manual_seed(seed)
    log_initial = torch.randn(k, dtype=DT, generator=g).log_softmax(-1)
    log_transition = torch.randn(k, k, dtype=DT, generator=g).log_softmax(-1)
    log_emission = torch.randn(steps, k, dtype=DT, generator=g)
    return log_initial, log_transition, log_emission


def brute_force(log_initial, log_transition, log_emission):
    steps, k = log_emission.shape
    joint = {}
    for path in itertools.product(range(k), repeat=steps):
        value = log_initial[path[0]] + log_emission[0, path[0]]
        for t in range(1, steps):
            value = value + log_transition[path[t - 1], path[t]] + log_emission[t, path[t]]
        joint[path] = value
    return joint


def test_hmm_evidence_marginals_and_viterbi_equal_enumeration():
    problem = hmm_problem()
    joint = brute_force(*problem)
    values = torch.stack(list(joint.values()))
    evidence = torch.logsumexp(values, 0)
    ours, marginals = hmm_posterior_marginals(*problem)
    assert torch.allclose(ours, evidence, rtol=1e-12)
    assert torch.allclose(hmm_forward(*problem)[0], evidence, rtol=1e-12)
    expected = torch.zeros(5, 3, dtype=DT)
    for path, value in joint.items():
        for t, state in enumerate(path):
            expected[t, state] += (value - evidence).exp()
    assert torch.allclose(marginals, expected, atol=1e-12)
    path, log_joint = viterbi(*problem)
    best = max(joint, key=lambda p: float(joint[p]))
    assert tuple(path.tolist()) == best
    assert torch.allclose(log_joint, joint[best])


def test_hmm_batches_and_bad_shapes():
    log_initial, log_transition, _ = hmm_problem()
    emissions = torch.randn(4, 6, 3, dtype=DT)
    batched = hmm_forward(log_initial, log_transition, emissions)[0]
    assert batched.shape == (4,)
    assert torch.allclose(batched[2], hmm_forward(log_initial, log_transition, emissions[2])[0])
    assert viterbi(log_initial, log_transition, emissions)[0].shape == (4, 6)
    with pytest.raises(ValueError, match="log_transition"):
        hmm_forward(log_initial, log_transition[:2], emissions)
    with pytest.raises(ValueError, match="log_emission"):
        hmm_forward(log_initial, log_transition, emissions[..., :2])
