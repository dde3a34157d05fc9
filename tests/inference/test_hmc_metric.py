"""The dense metric's pieces against direct computation: momentum covariance, kinetic energy, Welford."""

import torch

from bmm_ppl.inference.hmc.adaptation import WelfordCovariance, WelfordVariance
from bmm_ppl.inference.hmc.integrator import kinetic_energy, sample_momentum, velocity


def random_covariance(dim, generator):
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(dim, dtype=torch.float64)


def test_dense_momentum_has_the_mass_matrix_as_covariance():
    """r ~ N(0, M) with M = inv(inv_mass): the sample covariance of 200k draws is within 5 standard errors
    of M entrywise (the standard error of a covariance entry is sqrt((M_ii M_jj + M_ij^2) / n))."""
    generator = torch.Generator().manual_seed(0)
    inv_mass = torch.stack([random_covariance(3, generator) for _ in range(2)])
    mass = torch.linalg.inv(inv_mass)
    n = 200_000
    torch.manual_seed(1)
    draws = sample_momentum(torch.zeros(n, 3, dtype=torch.float64), inv_mass[:1].expand(n, 3, 3))
    sample_cov = torch.cov(draws.T)
    m = mass[0]
    stderr = ((torch.outer(m.diagonal(), m.diagonal()) + m**2) / n).sqrt()
    assert ((sample_cov - m).abs() < 5 * stderr).all(), (sample_cov, m)


def test_kinetic_energy_and_velocity_of_both_metrics():
    generator = torch.Generator().manual_seed(2)
    inv_mass = torch.stack([random_covariance(4, generator) for _ in range(3)])
    r = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    expected = 0.5 * torch.einsum("ci,cij,cj->c", r, inv_mass, r)
    torch.testing.assert_close(kinetic_energy(r, inv_mass), expected)
    rk = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)  # K = 5 momenta per chain
    torch.testing.assert_close(velocity(rk, inv_mass), torch.einsum("cij,ckj->cki", inv_mass, rk))
    diagonal = inv_mass.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(kinetic_energy(r, diagonal), kinetic_energy(r, torch.diag_embed(diagonal)))
    torch.testing.assert_close(velocity(rk, diagonal), velocity(rk, torch.diag_embed(diagonal)))


def test_welford_estimates_match_torch_and_stan_regularisation():
    generator = torch.Generator().manual_seed(3)
    draws = torch.randn(50, 2, 3, generator=generator, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]], dtype=torch.float64
    )
    dense, diagonal = WelfordCovariance(draws[0]), WelfordVariance(draws[0])
    for z in draws:
        dense.update(z)
        diagonal.update(z)
    n = 50
    for chain in range(2):
        covariance = torch.cov(draws[:, chain].T)
        expected = n / (n + 5) * covariance + 1e-3 * 5 / (n + 5) * torch.eye(3, dtype=torch.float64)
        torch.testing.assert_close(dense.regularised_variance()[chain], expected)
        torch.testing.assert_close(diagonal.regularised_variance()[chain], expected.diagonal())
