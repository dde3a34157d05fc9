"""The dense metric's pieces against direct computation: momentum covariance, kinetic energy, Welford."""

import torch

from bmm_ppl.inference.hmc.adaptation import shrunk_covariance, shrunk_covariance_estimator, welford_variance
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


def test_diagonal_welford_matches_torch_and_stan_regularisation():
    generator = torch.Generator().manual_seed(3)
    draws = torch.randn(50, 2, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    init, update, final = welford_variance()
    estimate = init(draws[0])
    for z in draws:
        estimate = update(estimate, z)
    n = 50
    expected = n / (n + 5) * draws.var(0, unbiased=True) + 1e-3 * 5 / (n + 5)
    torch.testing.assert_close(final(estimate), expected)


def schafer_strimmer(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Direct (loop) computation for one chain, x: (n, D): the covariance with its correlations shrunk
    (Schafer & Strimmer 2005, target D: the intensity from the standardised data) and the intensity."""
    n, d = x.shape
    centred = x - x.mean(0)
    s = centred.T @ centred / (n - 1)
    standardised = centred / s.diagonal().sqrt()
    r = standardised.T @ standardised / (n - 1)
    numerator = denominator = 0.0
    for i in range(d):
        for j in range(d):
            if i == j:
                continue
            w = standardised[:, i] * standardised[:, j]
            numerator += n / (n - 1) ** 3 * float(((w - w.mean()) ** 2).sum())
            denominator += float(r[i, j] ** 2)
    intensity = min(max(numerator / denominator, 0.0), 1.0)
    shrunk = s * (1 - intensity) + torch.diag(s.diagonal()) * intensity
    return shrunk, intensity


def fill(draws, inv_mass=None):
    init, update, _ = shrunk_covariance_estimator()
    window = init(draws[0], inv_mass)
    for z in draws:
        window = update(window, z)
    return window


def test_shrunk_covariance_matches_the_direct_formula_and_stan_regularisation():
    generator = torch.Generator().manual_seed(4)
    mixing = torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.3], [0.0, 0.0, 2.0]], dtype=torch.float64)
    draws = torch.randn(30, 2, 3, generator=generator, dtype=torch.float64) @ mixing
    estimate = fill(draws)
    covariance, intensity = shrunk_covariance(estimate)
    n = 30
    for chain in range(2):
        expected, expected_intensity = schafer_strimmer(draws[:, chain])
        torch.testing.assert_close(covariance[chain], expected)
        assert abs(float(intensity[chain]) - expected_intensity) < 1e-12
        regularised = n / (n + 5) * expected + 1e-3 * 5 / (n + 5) * torch.eye(3, dtype=torch.float64)
        torch.testing.assert_close(shrunk_covariance_estimator()[2](estimate)[chain], regularised)


def test_shrinkage_happens_in_the_coordinates_the_current_metric_whitens():
    """With a current metric L L^T, the estimate is L S*(L^-1 z) L^T: a correlation the metric already
    holds is kept, and only the residual correlations are shrunk."""
    generator = torch.Generator().manual_seed(6)
    metric = random_covariance(3, generator).expand(2, 3, 3)
    lower = torch.linalg.cholesky(metric[0])
    draws = torch.randn(20, 2, 3, generator=generator, dtype=torch.float64) @ lower.T  # distributed as the metric
    covariance, intensity = shrunk_covariance(fill(draws, metric))
    for chain in range(2):
        whitened = torch.linalg.solve_triangular(lower, draws[:, chain].T, upper=False).T
        expected, expected_intensity = schafer_strimmer(whitened)
        torch.testing.assert_close(covariance[chain], lower @ expected @ lower.T)
        assert abs(float(intensity[chain]) - expected_intensity) < 1e-12
    # A diagonal current metric is taken as such.
    diagonal = metric[:, 0].abs() + 0.5
    torch.testing.assert_close(shrunk_covariance(fill(draws, diagonal))[0],
                               shrunk_covariance(fill(draws, torch.diag_embed(diagonal)))[0])


def test_shrinkage_does_not_depend_on_the_coordinates_scales():
    generator = torch.Generator().manual_seed(7)
    draws = torch.randn(15, 1, 3, generator=generator, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.7, 0.0], [0.0, 0.7, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    _, intensity = shrunk_covariance(fill(draws))
    covariance, scaled_intensity = shrunk_covariance(fill(draws * scales))
    torch.testing.assert_close(scaled_intensity, intensity)
    torch.testing.assert_close(covariance[0], shrunk_covariance(fill(draws))[0][0] * torch.outer(scales, scales))


def test_dense_momentum_factor_is_computed_once_per_metric():
    from bmm_ppl.inference.hmc import integrator

    generator = torch.Generator().manual_seed(8)
    metric = random_covariance(3, generator).expand(2, 3, 3).clone()
    z = torch.zeros(2, 3, dtype=torch.float64)
    sample_momentum(z, metric)
    factor = integrator._last_factor[1]
    sample_momentum(z, metric)
    assert integrator._last_factor[1] is factor  # reused
    other = metric * 2
    sample_momentum(z, other)
    assert integrator._last_factor[1] is not factor
    torch.testing.assert_close(integrator._last_factor[1], torch.linalg.cholesky(other).transpose(-1, -2))


def test_shrinkage_fades_with_many_draws_and_rescues_windows_shorter_than_the_dimension():
    generator = torch.Generator().manual_seed(5)
    mixing = torch.tensor([[1.0, 0.9], [0.0, 0.4]], dtype=torch.float64)
    many = fill(torch.randn(4000, 1, 2, generator=generator, dtype=torch.float64) @ mixing)
    _, intensity = shrunk_covariance(many)
    assert float(intensity) < 0.01  # correlation 0.91 from 4000 draws: nothing to shrink
    few = fill(torch.randn(6, 1, 20, generator=generator, dtype=torch.float64))  # 6 draws, 20 dimensions
    covariance, intensity = shrunk_covariance(few)
    assert float(intensity) > 0.5  # independent coordinates: the sample correlations are mostly noise
    # The raw sample covariance has rank 5 (20 - 5 zero eigenvalues); the shrunk one is well conditioned.
    centred = torch.stack(few.draws, 1)[0] - torch.stack(few.draws, 1)[0].mean(0)
    assert torch.linalg.matrix_rank(centred.T @ centred) == 5
    assert torch.linalg.eigvalsh(covariance[0]).min() > 0.05
