"""The Gaussian mixture fitted by EM (gmm.py), with full and with diagonal covariances: what it
recovers, that it stays valid where the arithmetic cancels, and its density written out."""
import numpy as np
import pytest

from lab import gmm
from lab.gmm import fit_gmm, gmm_log_density


def component_variances(mixture, covariance):
    """The variances (K, Z) of each component: the covariances' diagonals, or 'diag' covs
    themselves."""
    if covariance == "diag":
        return mixture["covs"]
    return np.diagonal(mixture["covs"], axis1=1, axis2=2)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_well_separated_clusters_and_its_likelihood_never_decreases(covariance):
    rng = np.random.default_rng(6)
    means = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, -3.0]])
    weights = np.array([0.5, 0.3, 0.2])
    sd = np.array([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])
    labels = rng.choice(3, 6000, p=weights)
    z = means[labels] + rng.standard_normal((6000, 2)) * sd[labels]
    fit = fit_gmm(z, 3, covariance, rng=np.random.default_rng(0))
    order = [int(np.argmin(((fit["means"] - m) ** 2).sum(1))) for m in means]
    assert sorted(order) == [0, 1, 2], fit["means"]
    np.testing.assert_allclose(fit["means"][order], means, atol=0.1)
    np.testing.assert_allclose(np.exp(fit["log_pi"][order]), weights, atol=0.02)
    np.testing.assert_allclose(component_variances(fit, covariance)[order], sd ** 2, rtol=0.1)
    steps = np.diff(fit["log_likelihood"])
    assert np.all(steps >= -1e-10), steps.min()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_keeps_covariances_valid_where_the_shortcut_cancels(covariance):
    # Codes far from the origin with a tiny spread: E[z z^T] - m m^T loses every digit and can turn
    # indefinite (a Cholesky error, once a crash of the analysis). Centred, the fit finds the true
    # spread.
    rng = np.random.default_rng(15)
    z = 1e5 + rng.standard_normal((4000, 3)) * [1e-3, 2e-3, 5e-4]
    z[:, 1] += 3e-3 * z[:, 0] - 3e-3 * 1e5              # some correlation
    fit = fit_gmm(z, 2, covariance, rng=np.random.default_rng(0))
    variances = component_variances(fit, covariance)
    np.testing.assert_allclose(np.exp(fit["log_pi"]) @ variances, z.var(0), rtol=0.3)
    assert np.all(np.isfinite(gmm_log_density(fit, z)))
    identical = np.tile([2.0, -1.0, 0.5], (500, 1))     # no spread: the floor keeps S_k invertible
    fit_to_identical = fit_gmm(identical, 2, covariance)
    assert np.all(np.isfinite(gmm_log_density(fit_to_identical, identical)))


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recomputing_the_outer_products_chunk_by_chunk_fits_the_same_mixture_as_keeping_them(
        covariance, monkeypatch):
    # Above MAX_KEPT, c c^T's triangles (c^2 for 'diag') are recomputed a chunk of rows at a time
    # (N x 210 > 2^23): the same arrays, so the same fit to the last bit. Uneven chunks: 3000 rows
    # in 700s.
    rng = np.random.default_rng(23)
    z = rng.standard_normal((3000, 5)) * [1, 2, 0.5, 1, 3] + rng.choice([-4.0, 4.0], (3000, 1))
    fits = {}
    for name, limit in (("kept", gmm.MAX_KEPT), ("recomputed", 0)):
        monkeypatch.setattr(gmm, "MAX_KEPT", limit)
        fits[name] = fit_gmm(z, 3, covariance, rng=np.random.default_rng(1), chunk=700)
    assert len(fits["kept"]["log_likelihood"]) > 3
    for key in ("log_likelihood", "log_pi", "means", "covs"):
        assert np.array_equal(fits["kept"][key], fits["recomputed"][key]), key


def direct_em(z, b, covariance, iters):
    """EM as the textbook writes it, from the same start as fit_gmm: responsibilities from the
    densities, then N_j, pi_j, m_j and S_j from their sums (no centring, no triangles, no floor)."""
    n, d = z.shape
    components = len(b)
    means = b.copy()
    covs = np.tile(np.diag(z.var(axis=0) + 1e-6 * z.var(axis=0).mean()), (components, 1, 1))
    pi = np.full(components, 1 / components)
    for _ in range(iters):
        densities = np.empty((n, components))
        for j in range(components):
            diff = z - means[j]
            precision = np.linalg.inv(covs[j])
            quad = np.einsum("nd,de,ne->n", diff, precision, diff)
            log_det = np.linalg.slogdet(covs[j])[1]
            densities[:, j] = pi[j] * np.exp(-0.5 * (quad + log_det + d * np.log(2 * np.pi)))
        r = densities / densities.sum(1, keepdims=True)                  # r_nj
        n_j = r.sum(0)
        pi = n_j / n
        means = (r.T @ z) / n_j[:, None]
        for j in range(components):
            diff = z - means[j]
            covs[j] = (r[:, j, None] * diff).T @ diff / n_j[j]
            if covariance == "diag":
                covs[j] = np.diag(np.diag(covs[j]))
    return {"log_pi": np.log(pi), "means": means, "covs": covs}


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_over_triangles_of_centred_codes_equals_the_textbook_em(covariance):
    # fit_gmm computes both steps through the centred codes' outer products, upper triangles only;
    # after 5 iterations from the same start it must give the textbook EM's mixture.
    rng = np.random.default_rng(31)
    z = np.concatenate([rng.normal(3, 1, (150, 3)), rng.normal(-2, 0.5, (150, 3))]) + 40
    start = z[np.random.default_rng(5).choice(len(z), 3, replace=False)]
    fitted = fit_gmm(z, 3, covariance, iters=5, tol=-np.inf, rng=np.random.default_rng(5))
    want = direct_em(z, start, covariance, iters=5)
    np.testing.assert_allclose(np.exp(fitted["log_pi"]), np.exp(want["log_pi"]), rtol=1e-9)
    np.testing.assert_allclose(fitted["means"], want["means"], rtol=1e-9)
    fitted_covs = fitted["covs"]
    if covariance == "diag":
        fitted_covs = np.stack([np.diag(c) for c in fitted_covs])
    np.testing.assert_allclose(fitted_covs, want["covs"], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_mixture_density_matches_a_direct_computation(covariance):
    rng = np.random.default_rng(7)
    fit = fit_gmm(rng.standard_normal((500, 3)) * [1, 2, 0.5], 4, covariance, iters=5)
    z = rng.standard_normal((20, 3))
    direct = np.zeros(20)
    for k in range(len(fit["log_pi"])):
        cov = fit["covs"][k]
        if cov.ndim == 1:
            cov = np.diag(cov)
        diff = z - fit["means"][k]
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        normalizer = np.sqrt(np.linalg.det(2 * np.pi * cov))
        direct += np.exp(fit["log_pi"][k]) * np.exp(-0.5 * maha) / normalizer
    np.testing.assert_allclose(gmm_log_density(fit, z), np.log(direct), rtol=1e-10)
