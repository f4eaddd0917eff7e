"""Walks through the latent space: interpolations, linear and spherical, and traversals; and how
much of a path falls in the aggregated posterior's holes."""
import json
import math

import numpy as np

from lab import analysis
from lab import codes
from lab.gmm import gmm_log_density


def test_spherical_paths_start_and_end_at_the_codes_and_their_norm_moves_linearly():
    rng = np.random.default_rng(40)
    z0 = rng.standard_normal((6, 5)) * 3
    z1 = rng.standard_normal((6, 5))
    path = codes.interpolate(z0, z1, 9, "spherical")
    np.testing.assert_allclose(path[0], z0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(path[-1], z1, rtol=1e-12, atol=1e-12)
    t = np.linspace(0, 1, 9)[:, None]
    norms = np.linalg.norm(path, axis=-1)
    want = (1 - t) * np.linalg.norm(z0, axis=-1) + t * np.linalg.norm(z1, axis=-1)
    np.testing.assert_allclose(norms, want, rtol=1e-12)
    # and the direction moves along the great circle at a constant rate: equal angles per step
    u = path / norms[..., None]
    steps = np.arccos(np.clip((u[1:] * u[:-1]).sum(-1), -1, 1))
    np.testing.assert_allclose(steps, np.broadcast_to(steps[:1], steps.shape), rtol=1e-6)


def test_linear_paths_are_straight_and_spherical_paths_between_opposite_codes_too():
    z0 = np.array([1.0, 2.0])
    z1 = np.array([3.0, -2.0])
    path = codes.interpolate(z0, z1, 5, "linear")
    np.testing.assert_allclose(path[2], (z0 + z1) / 2)
    opposite = codes.interpolate(np.array([-2.0]), np.array([3.0]), 5, "spherical")
    np.testing.assert_allclose(opposite.ravel(), [-2.0, -0.75, 0.5, 1.75, 3.0])


def test_the_straight_midpoint_of_two_prior_draws_has_half_their_squared_norm():
    # For z0, z1 ~ N(0, I) independent, m = (z0 + z1) / 2 ~ N(0, I / 2): E|m|^2 = Z / 2, while
    # E|z0|^2 = Z. |m|^2 = chi^2_Z / 2 has variance Z / 2, so over n pairs the mean of |m|^2 is
    # within 5 standard errors, 5 sqrt(Z / (2 n)), of Z / 2 but for a chance of 6e-7. The
    # spherical midpoint keeps a norm between the two draws' (mean of |m|^2 near Z).
    latent = 20
    n = 4000
    rng = np.random.default_rng(41)
    z0 = rng.standard_normal((n, latent))
    z1 = rng.standard_normal((n, latent))
    linear_mid = codes.interpolate(z0, z1, 3, "linear")[1]
    spherical_mid = codes.interpolate(z0, z1, 3, "spherical")[1]
    bound = 5 * math.sqrt(latent / (2 * n))
    linear_square = (linear_mid ** 2).sum(-1).mean()
    assert abs(linear_square - latent / 2) < bound, (linear_square, latent / 2, bound)
    spherical_square = (spherical_mid ** 2).sum(-1).mean()
    assert spherical_square > 0.95 * latent, spherical_square


def two_clusters():
    """A mixture of two unit Gaussians at (-4, 0) and (4, 0): a hole between them."""
    return {"log_pi": np.log([0.5, 0.5]), "means": np.array([[-4.0, 0.0], [4.0, 0.0]]),
            "covs": np.stack([np.eye(2), np.eye(2)])}


def test_the_share_of_path_points_in_holes_is_that_of_the_points_beyond_the_threshold():
    # The straight path from one centre to the other crosses the hole; its 20 inner points are at
    # x = -4 + 8 t. The density on the axis is known in closed form, so the points in the hole are
    # those with |x| below the x* where it meets the threshold (found by bisection here).
    gmm = two_clusters()
    threshold = -6.0

    def log_density_on_axis(x):
        densities = np.exp(-0.5 * (x + 4) ** 2) + np.exp(-0.5 * (x - 4) ** 2)
        return np.log(0.5 * densities / (2 * np.pi))

    low, high = 0.0, 4.0                                # log density rises from x = 0 to 4
    for _ in range(60):
        middle = (low + high) / 2
        if log_density_on_axis(middle) < threshold:
            low = middle
        else:
            high = middle
    x_star = low
    t = np.arange(1, 21) / 21
    x = -4 + 8 * t
    want = float((np.abs(x) < x_star).mean())
    z0 = np.array([[-4.0, 0.0]])
    z1 = np.array([[4.0, 0.0]])
    found = analysis.path_measures(gmm, threshold, z0, z1, steps=20)
    assert found["linear"]["hole_fraction"] == want, (found, want)
    assert 0 < want < 1
    points = np.stack([x, np.zeros_like(x)], 1)
    mean_log_density = gmm_log_density(gmm, points).mean()
    assert math.isclose(found["linear"]["mean_log_density"], mean_log_density, rel_tol=1e-12)
    assert math.isclose(found["linear"]["midpoint_norm"], 0.0, abs_tol=1e-12)


def test_a_traversal_moves_one_unit_and_leaves_every_other_unit_as_it_was():
    z = np.array([0.5, -1.25, 2.0, 0.0])
    values = np.linspace(-3, 3, 7)
    walk = codes.traverse(z, 2, values)
    np.testing.assert_array_equal(walk[:, 2], values)
    others = np.delete(walk, 2, axis=1)
    np.testing.assert_array_equal(others, np.tile(np.delete(z, 2), (7, 1)))


def test_every_run_records_its_paths_in_holes_and_draws_interpolations_and_traversals(
        finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    walks = metrics["interpolation"]
    assert walks["pairs"] == 200 and walks["steps"] == 20
    assert math.isclose(walks["sqrt_latent"], 2.0)
    for between in ("codes", "prior"):
        for kind in ("linear", "spherical"):
            found = walks[between][kind]
            assert 0 <= found["hole_fraction"] <= 1
            assert math.isfinite(found["mean_log_density"]) and found["midpoint_norm"] > 0
    for name in ("interpolations.png", "traversals.png"):
        assert (finished_run / name).stat().st_size > 0
