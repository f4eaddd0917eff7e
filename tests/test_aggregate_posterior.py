"""The aggregated posterior q(z) against the prior: the log densities far below zero, the pairwise
log N(z; m, s^2), the moments, the ELBO surgery, the holes, and the analysis that measures them
against the model's own prior."""
import math

import numpy as np
import pytest

import priors
import vae

from lab import analysis
from lab.gmm import fit_gmm, gmm_log_density

from conftest import direct_log_normal, make_flat_images, quiet


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_floored_stays_normal_and_logsumexp_is_exact_far_below_zero(dtype):
    # exp_floored never returns a subnormal (NumPy's slow path) and is exp itself above its floor;
    # logsumexp, which floors the differences a_i - max, still sums terms exactly where every a_i is
    # far below 0.
    a = np.array([0.0, -5.0, -80.0, -300.0, -706.0, -708.0, -745.0, -1e4, -np.inf], dtype)
    got = priors.exp_floored(a.copy())
    assert np.all(got >= np.finfo(dtype).tiny), got
    above = a >= np.log(np.finfo(dtype).tiny) + 2
    np.testing.assert_array_equal(got[above], np.exp(a[above]))
    far = np.array([[-1e3, -1e3 - 1.0, -1e3 - 800.0], [-2.0, -3e4, -np.inf]], dtype)
    want = [-1e3 + math.log1p(math.exp(-1.0)), -2.0]     # exp(-800) and exp(-3e4) vanish beside 1
    if dtype == np.float64:
        rtol = 1e-15
    else:
        rtol = 1e-7
    np.testing.assert_allclose(priors.logsumexp(far, 1), want, rtol=rtol)
    np.testing.assert_allclose(priors.logsumexp(far.copy(), 1, overwrite=True), want, rtol=rtol)


def direct_pairs(z, means, log_vars):
    """log N(z_i; m_k, exp(lv_k)) for every row z_i and every component k, one pair at a time."""
    return np.array([[direct_log_normal(zi, m, np.exp(lv)) for m, lv in zip(means, log_vars)]
                     for zi in z])


def test_log_normal_pairs_equals_the_direct_form():
    rng = np.random.default_rng(16)
    z = rng.standard_normal((7, 4))
    m = rng.standard_normal((5, 4))
    lv = rng.uniform(-2, 1, (5, 4))
    direct = direct_pairs(z, m, lv)
    pairs = np.concatenate(list(analysis.log_normal_pairs(z, m, lv, rows=3)))
    np.testing.assert_allclose(pairs, direct, rtol=1e-12)
    np.testing.assert_allclose(vae.log_normal(z[:, None, :], m, lv), direct, rtol=1e-12)
    # Variances near 0 (a model trained with no KL term): the expansion would cancel every digit.
    lv = np.full((5, 4), -45.0)
    z = m[[0, 0, 1, 3, 4, 4, 2]] + 1e-10 * rng.standard_normal((7, 4))
    direct = direct_pairs(z, m, lv)
    pairs = np.concatenate(list(analysis.log_normal_pairs(z, m, lv, rows=3)))
    np.testing.assert_allclose(pairs, direct, rtol=1e-9)


def test_aggregate_posterior_moments_match_a_hand_computation():
    mu = np.array([[1.0, 0.0], [3.0, 0.0]])
    log_var = np.log(np.array([[1.0, 4.0], [3.0, 4.0]]))
    got = analysis.aggregate_posterior_moments(mu, log_var)
    # dim 0: E[z] = 2, E[z^2] = mean(1 + 1, 9 + 3) = 7, Var = 7 - 4 = 3, Var(mu) = 1 (active)
    # dim 1: E[z] = 0, Var = 4, Var(mu) = 0 (inactive)
    np.testing.assert_allclose(got["mean"], [2.0, 0.0])
    np.testing.assert_allclose(got["variance"], [3.0, 4.0])
    assert got["active_units"] == 1
    assert got["activity"] == [1.0, 0.0]


def log_standard_normal(z):
    """log N(z; 0, I), written out: the prior the ELBO surgery is measured against."""
    return direct_log_normal(z, 0.0, 1.0)


def test_elbo_surgery_matches_its_known_values():
    # Every posterior the same N(m, s^2): z says nothing about x (I = 0), and q(z) is that Gaussian,
    # so KL(q(z) || p(z)) is its closed form.
    m = np.array([0.5, -1.0, 0.0])
    lv = np.array([-1.0, 0.0, 0.5])
    same = analysis.elbo_surgery(np.tile(m, (2000, 1)), np.tile(lv, (2000, 1)),
                                 np.random.default_rng(2), log_standard_normal)
    closed = vae.kl_normal_forward(m[None], lv[None])[0][0]
    assert abs(same["mutual_information"]) < 1e-9
    assert same["kl_aggregate_prior"] == pytest.approx(closed, abs=0.05)
    # Narrow posteriors far apart: z identifies x, so I(x; z) reaches its ceiling log N.
    apart = analysis.elbo_surgery(np.arange(500)[:, None] * [1.0, 0.0], np.full((500, 2), -8.0),
                                  np.random.default_rng(3), log_standard_normal)
    assert apart["mutual_information"] == pytest.approx(np.log(500), abs=1e-6)
    # In general the two terms add up to the average KL, within the Monte Carlo error of one draw
    # per point.
    rng = np.random.default_rng(9)
    mu = rng.standard_normal((3000, 3)) * 1.5
    log_var = rng.uniform(-3, 0, (3000, 3))
    s = analysis.elbo_surgery(mu, log_var, np.random.default_rng(1), log_standard_normal)
    average_kl = vae.kl_normal_forward(mu, log_var)[0].mean()
    assert s["mutual_information_plus_kl_aggregate_prior"] == pytest.approx(average_kl, abs=0.15)


def test_prior_hole_fraction_is_one_percent_when_codes_fill_the_prior_and_all_when_they_miss_it():
    rng = np.random.default_rng(10)
    z_prior = rng.standard_normal((20000, 2))
    covering = rng.standard_normal((20000, 2))
    mixture = fit_gmm(covering, 3, "full", rng=rng)
    covered, _, _ = analysis.prior_hole_fraction(mixture, covering, z_prior)
    assert covered == pytest.approx(0.01, abs=0.004)
    far = rng.standard_normal((20000, 2)) * 0.3 + 5
    mixture = fit_gmm(far, 3, "full", rng=rng)
    missed, _, _ = analysis.prior_hole_fraction(mixture, far, z_prior)
    assert missed > 0.99


def test_the_hole_threshold_comes_from_codes_the_mixture_was_not_fitted_on(monkeypatch):
    rng = np.random.default_rng(20)
    x_train = make_flat_images(300, rng)
    x_test = make_flat_images(80, rng)
    seen = {}
    real_fit = analysis.fit_gmm
    real_holes = analysis.prior_hole_fraction
    def fit(z, *args, **kwargs):
        seen["fitted"] = z
        seen["gmm"] = real_fit(z, *args, **kwargs)
        return seen["gmm"]
    def holes(mixture, z_codes, z_draws, *args):
        seen.setdefault("codes", z_codes)
        return real_holes(mixture, z_codes, z_draws, *args)
    monkeypatch.setattr(analysis, "fit_gmm", fit)
    monkeypatch.setattr(analysis, "prior_hole_fraction", holes)
    model = vae.VAE(784, 16, 2, seed=2)
    metrics, _ = analysis.analyze(model, x_train, x_test, 0, 2, 3, "full", log=quiet)
    fitted = {tuple(z) for z in seen["fitted"]}
    assert len(seen["codes"]) == 80                     # the test codes
    assert not any(tuple(z) in fitted for z in seen["codes"])
    held_out = gmm_log_density(seen["gmm"], seen["codes"]).mean()
    fitted_mixture = metrics["aggregate_posterior"]["gmm"]
    assert fitted_mixture["held_out_log_likelihood"] == pytest.approx(held_out)


def test_analysis_measures_a_learned_prior_against_that_prior():
    # Moving a mixture prior's means far from every code must show in every measurement that uses
    # p(z): prior draws land in holes, KL(q(z) || p(z)) and iw_nll grow. A measurement that used
    # N(0, I) would not move.
    rng = np.random.default_rng(17)
    x_train = make_flat_images(400, rng)
    x_test = make_flat_images(100, rng)
    model = priors.MixturePriorVAE(784, 16, 2, seed=1, components=3)
    model.prior["means"][...] *= 0.3
    near, _ = analysis.analyze(model, x_train, x_test, 0, 5, 3, "full", log=quiet)
    model.prior["means"][...] += 30
    far, _ = analysis.analyze(model, x_train, x_test, 0, 5, 3, "full", log=quiet)
    a = near["aggregate_posterior"]
    b = far["aggregate_posterior"]
    assert a["prior_hole_fraction"] < 0.5
    assert b["prior_hole_fraction"] > 0.99
    assert b["kl_aggregate_prior"] > a["kl_aggregate_prior"] + 100
    assert far["iw_nll"] > near["iw_nll"] + 100
    assert b["average_kl"] > a["average_kl"] + 100
