import math

import pytest
import torch

from rpo_lib import coverage


def test_global_coverage_is_one_over_the_rarest_reference_mass():
    ref = torch.tensor([0.5, 0.3, 0.2]).log()
    assert coverage.global_coverage(ref) == pytest.approx(5.0)
    # a point mass on the rarest response attains it
    point = torch.tensor([0.0, 0.0, 1.0]).log()
    assert coverage.density_ratios(point, ref).max().item() == pytest.approx(5.0)
    assert coverage.global_coverage(torch.tensor([1.0, 0.0]).log()) == math.inf


def test_point_mass_kl_matches_the_direct_kl():
    p, q = 0.4, 0.1
    pi = torch.tensor([p, (1 - p) * 0.3 / 0.9, (1 - p) * 0.6 / 0.9], dtype=torch.float64)
    ref = torch.tensor([q, 0.3, 0.6], dtype=torch.float64)
    direct = (pi * (pi / ref).log()).sum()
    assert coverage.point_mass_kl(p, q).item() == pytest.approx(direct.item())


@pytest.mark.parametrize("q,radius", [(0.01, 0.5), (0.001, 1.0), (0.2, 0.05)])
def test_kl_ball_ratio_is_the_largest_feasible_ratio(q, radius):
    ratio = coverage.kl_ball_ratio(q, radius).item()
    p = ratio * q
    assert coverage.point_mass_kl(p, q).item() == pytest.approx(radius, rel=1e-9)
    # any larger mass leaves the ball; random policies inside the ball never beat it
    assert coverage.point_mass_kl(min(1.0, p * 1.001), q).item() > radius
    generator = torch.Generator().manual_seed(0)
    ref = torch.tensor([q, (1 - q) / 2, (1 - q) / 2], dtype=torch.float64)
    for _ in range(2000):
        pi = torch.softmax(3 * torch.randn(3, generator=generator, dtype=torch.float64), 0)
        if (pi * (pi / ref).log()).sum() <= radius:
            assert pi[0] / q <= ratio + 1e-9


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_kl_ball_ratio_is_exponential_in_radius_over_mass_remark_4_1(p):
    # KL ~ p log(p/q): a response with q = p exp(-eps/p) can get mass p inside the ball, ratio exp(eps/p)
    for radius in (0.5, 1.0, 2.0):
        q = p * math.exp(-radius / p)
        assert coverage.kl_ball_ratio(q, radius).item() >= math.exp(radius / p)
    assert coverage.kl_ball_ratio(0.5, 10.0).item() == pytest.approx(2.0)  # a point mass fits: ratio 1/q


def test_kl_ball_coverage_is_finite_where_global_is_infinite_or_huge():
    ref = torch.tensor([0.495, 0.495, 0.01]).log()
    assert coverage.global_coverage(ref) == pytest.approx(100.0)
    assert coverage.kl_ball_coverage(ref, 0.1) < 10
    assert coverage.kl_ball_coverage(ref, 0.1) < coverage.kl_ball_coverage(ref, 1.0) <= 100.0 + 1e-9


def test_linear_coverage_finite_in_span_and_infinite_outside():
    data = torch.zeros(3, 3, dtype=torch.float64)
    data[0, 0], data[1, 1] = 1.0, 0.25
    inside = torch.zeros(3, 3, dtype=torch.float64)
    inside[1, 1] = 1.0
    assert coverage.linear_coverage(data, inside) == pytest.approx(4.0)
    outside = torch.zeros(3, 3, dtype=torch.float64)
    outside[2, 2] = 1e-3
    assert coverage.linear_coverage(data, outside) == math.inf


def test_feature_covariance_and_partial_coverage():
    phi = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    cov = coverage.feature_covariance(phi)
    assert torch.allclose(cov, torch.tensor([[0.5, 0.0], [0.0, 2.0]], dtype=torch.float64))
    gap = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert coverage.partial_coverage_linear(cov, gap, torch.zeros(2)) == pytest.approx(math.sqrt(2 + 2))
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert coverage.partial_coverage_linear(singular, gap, torch.zeros(2)) == math.inf
    assert coverage.partial_coverage_linear(singular, torch.tensor([3.0, 0.0]), torch.zeros(2)) == pytest.approx(3.0)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="radius"):
        coverage.kl_ball_ratio(0.1, -1.0)
    with pytest.raises(ValueError, match="ref_mass"):
        coverage.kl_ball_ratio(0.0, 1.0)
    with pytest.raises(ValueError, match="square"):
        coverage.linear_coverage(torch.eye(2), torch.eye(3))


@pytest.mark.parametrize("mass", [0.05, 0.1, 0.3])
def test_a_bounded_kl_allows_a_density_ratio_exponential_in_the_radius(mass):
    # Remark 4.1, the motivation of Song et al.'s conjecture on single-policy coverage (notebook 06)
    for kappa in (1.0, 2.0, 4.0):
        ref_mass = mass * math.exp(-kappa / mass)
        assert coverage.point_mass_kl(mass, ref_mass).item() <= kappa
        assert coverage.kl_ball_ratio(ref_mass, kappa).item() >= math.exp(kappa / mass) * (1 - 1e-9)
